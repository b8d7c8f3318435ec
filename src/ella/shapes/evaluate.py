"""Shapes-DPG: the issue-3 benchmark pipeline run on the shapes world, for the base and each connector.

Held-out scenes (a seed the training set never used), the same 2x2 grid protocol and the same
scorer as DPG-Bench, with the pixel oracle (``ShapesOracle``) as the VQA model. Every row uses the
same prompts, seeds, steps and guidance, so the table isolates what the text condition does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..loading import atomic_path
from . import models as M

EVAL_SEED_OFFSET = 1_000_003  # held-out scenes: never produced by the training seed


def load_rows(base: Path, connectors: dict[str, Path], device: str, dtype: torch.dtype) -> dict:
    """``{"base": plain pipeline (weak encoder), "+mlp": ..., "+resampler": ..., "+tsc": ...}`` (lazily built)."""
    from diffusers import StableDiffusionPipeline

    from .ship import ella_pipeline

    rows = {"base (weak encoder)": lambda: StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype)}
    for variant, run in connectors.items():
        rows[f"+{variant}"] = (lambda run=run, variant=variant: ella_pipeline(
            base, Path(run) / "ella.safetensors", device=device, dtype=dtype, flexible=variant == "mlp"))
    return rows


def evaluate(base: Path, connectors: dict[str, Path], out: Path, *, n_items: int = 200, seed: int = 0,
             steps: int = 25, guidance: float = 5.0, device: str = "cpu", progress: bool = True) -> dict:
    """Generate + score every row; writes ``out/<row>/`` grids, ``out/results.json`` and ``out/results.md``."""
    from ..bench.dpg import aggregate, score_items
    from ..bench.generate import generate_grids
    from .oracle import ShapesOracle
    from .questions import shapes_benchmark

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    benchmark, _ = shapes_benchmark(n_items, seed + EVAL_SEED_OFFSET)
    oracle = ShapesOracle()
    settings = {"n_items": n_items, "seed": seed, "steps": steps, "guidance": guidance}
    results = _scored_rows(out / "results.json", settings)  # rows a cut-off run already scored
    for name, build in load_rows(base, connectors, device, dtype).items():
        if name in results:
            continue
        pipe = build().to(device)
        pipe.set_progress_bar_config(disable=True)
        row_dir = out / slug(name)
        generate_grids(pipe, benchmark.prompts, row_dir, settings={"row": name, "base": str(base)}, base_seed=seed,
                       tile_size=M.RESOLUTION, call_kwargs={"num_inference_steps": steps, "guidance_scale": guidance},
                       progress=progress)
        items, errors = score_items(benchmark, row_dir, oracle)
        result = aggregate(benchmark, items, errors, official_compat=False)
        results[name] = {k: result[k] for k in ("overall", "categories", "subcategories", "num_items")}
        montage(row_dir, list(benchmark.prompts)[:8], out / f"{slug(name)}.png")
        del pipe
        # Written after every row, so a run cut off (GPU-time limit) keeps what it scored.
        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(json.dumps({"settings": settings, "rows": results}, indent=2))
        with atomic_path(out / "results.md") as tmp:
            tmp.write_text(to_markdown(results))
    return results


def _scored_rows(path: Path, settings: dict) -> dict:
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return dict(saved["rows"]) if saved.get("settings") == settings else {}


def montage(row_dir: Path, item_ids: list[str], path: Path) -> Path:
    """The first items' 2x2 grids side by side: one picture per table row, same prompts in every row."""
    from PIL import Image

    grids = [Image.open(row_dir / f"{i}.png") for i in item_ids]
    sheet = Image.new("RGB", (sum(g.width for g in grids) + 4 * (len(grids) - 1), grids[0].height), "white")
    x = 0
    for g in grids:
        sheet.paste(g, (x, 0))
        x += g.width + 4
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def slug(name: str) -> str:
    """``"base (weak encoder)"`` -> ``"base-weak-encoder"``, ``"+tsc"`` -> ``"tsc"``."""
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def to_markdown(results: dict) -> str:
    categories = sorted({c for r in results.values() for c in r["categories"]})
    lines = ["| row | overall | " + " | ".join(categories) + " |", "|---" * (len(categories) + 2) + "|"]
    for name, r in results.items():
        cells = [f"{r['categories'].get(c, float('nan')):.1f}" for c in categories]
        lines.append(f"| {name} | {r['overall']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
