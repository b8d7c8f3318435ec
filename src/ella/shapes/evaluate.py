"""Shapes-DPG: the DPG-Bench pipeline (``ella.bench``) run on the shapes world, for the base and each connector.

Held-out scenes (a seed the training set never used), the same 2x2 grid protocol and the same
scorer as DPG-Bench, with the pixel oracle (``ShapesOracle``) as the VQA model. Every row uses the
same prompts, seeds, steps and guidance, so the table isolates what the text condition does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image

from ..bench.dpg import aggregate, score_items
from ..bench.generate import TILES, generate_grids, make_grid, shard_items
from ..io import atomic_path
from . import gpus
from . import models as M
from .gpus import Group
from .oracle import ShapesOracle
from .questions import questions, shapes_benchmark
from .ship import ella_pipeline
from .world import Scene, render, scene_for

EVAL_SEED_OFFSET = 1_000_003  # held-out scenes: never produced by the training seed
CEILING = "VAE round-trip of the true scene (ceiling)"


def load_rows(base: Path, connectors: dict[str, Path], device: str, dtype: torch.dtype) -> dict[str, Callable]:
    """``{"base (weak encoder)": plain pipeline, "+tsc": ..., ...}``, each built only when its row is drawn."""
    rows = {"base (weak encoder)": lambda: StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype)}
    for variant, run in connectors.items():
        rows[f"+{variant}"] = lambda run=run, variant=variant: ella_pipeline(
            base, Path(run) / "ella.safetensors", device=device, dtype=dtype, flexible=variant == "mlp"
        )
    return rows


def evaluate(
    base: Path,
    connectors: dict[str, Path],
    out: Path,
    *,
    n_items: int = 200,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    device: str = "cpu",
    progress: bool = True,
    group: Group | None = None,
) -> dict:
    """Generate + score every row; writes ``out/<row>/`` grids, ``out/results.json`` and ``out/results.md``.

    Under a launcher (``group``) every process draws its share of each row's items, then rank 0 scores
    the row (the oracle is cheap) and writes the results; every process returns them.
    """
    group = group or Group(device=torch.device(device))
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    benchmark, scenes = shapes_benchmark(n_items, seed + EVAL_SEED_OFFSET)
    settings = {"n_items": n_items, "seed": seed, "steps": steps, "guidance": guidance}
    results = gpus.from_main(group, _scored_rows(out / "results.json", settings))  # what a cut-off run scored
    rows = {CEILING: None, **load_rows(base, connectors, device, dtype)}
    oracle = ShapesOracle()
    for name, build in rows.items():
        if name in results:
            continue
        row_dir = out / slug(name)
        mine = shard_items(list(benchmark.prompts), group.rank, group.world)
        if build is None:
            write_ceiling_grids(base / "vae", {i: scenes[i] for i in mine}, row_dir)
        else:
            draw_row(name, build, benchmark.prompts, out, base, settings, device, progress, group)
        gpus.barrier(group)
        if group.main:
            items, errors = score_items(benchmark, row_dir, oracle)
            result = aggregate(benchmark, items, errors, official_compat=False)
            results[name] = {k: result[k] for k in ("overall", "categories", "subcategories", "num_items")}
            montage(row_dir, list(benchmark.prompts)[:8], out / f"{slug(name)}.png")
            # Written after every row, so a run cut off (GPU-time limit) keeps what it scored.
            with atomic_path(out / "results.json") as tmp:
                tmp.write_text(json.dumps({"settings": settings, "rows": results}, indent=2, allow_nan=False))
            with atomic_path(out / "results.md") as tmp:
                tmp.write_text(to_markdown(results))
    return gpus.from_main(group, results)


def draw_row(
    name: str,
    build: Callable,
    prompts: dict,
    out: Path,
    base: Path,
    settings: dict,
    device: str,
    progress: bool,
    group: Group | None = None,
) -> None:
    """This process's share of one row's 2x2 grids (items already drawn are skipped)."""
    group = group or Group()
    pipe = build().to(device)
    pipe.set_progress_bar_config(disable=True)
    generate_grids(
        pipe,
        prompts,
        out / slug(name),
        settings={"row": name, "base": str(base)},
        base_seed=settings["seed"],
        tile_size=M.RESOLUTION,
        progress=progress,
        call_kwargs={"num_inference_steps": settings["steps"], "guidance_scale": settings["guidance"]},
        shard=(group.rank, group.world),
        is_main=group.main,
    )


def write_ceiling_grids(vae_path: Path, scenes: dict[str, Scene], row_dir: Path) -> None:
    """Each item's true render, encoded and decoded by the base's VAE, in all four tiles.

    Every row draws through this VAE, so what the oracle still sees after a round trip is the most
    any row can score: a low ceiling means the autoencoder, not the text condition, is the limit.
    """
    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    row_dir.mkdir(parents=True, exist_ok=True)
    for item_id, scene in scenes.items():
        if not (row_dir / f"{item_id}.png").is_file():
            with atomic_path(row_dir / f"{item_id}.png") as tmp:
                make_grid([roundtrip(vae, render(scene, size=M.RESOLUTION))] * TILES).save(tmp, format="PNG")


@torch.no_grad()
def roundtrip(vae, image: Image.Image) -> Image.Image:
    """``image`` encoded (posterior mode) and decoded by ``vae``: what a diffusion model on its latents can draw."""
    param = next(vae.parameters())
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].to(param.device, param.dtype)
    y = vae.decode(vae.encode(x / 127.5 - 1).latent_dist.mode()).sample[0].float().cpu()
    return Image.fromarray(((y.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())


def roundtrip_accuracy(vae, n_scenes: int = 100, seed: int = 0) -> float:
    """% of held-out questions the oracle still answers "yes" to after a VAE round trip (100 = lossless)."""
    oracle, right, total = ShapesOracle(), 0, 0
    for i in range(n_scenes):
        scene = scene_for(seed + EVAL_SEED_OFFSET, i)
        image = roundtrip(vae, render(scene, size=M.RESOLUTION))
        for q in questions(scene):
            right += oracle(image, q.question) == "yes"
            total += 1
    return 100.0 * right / max(1, total)


def _scored_rows(path: Path, settings: dict) -> dict:
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return dict(saved["rows"]) if saved.get("settings") == settings else {}


def montage(row_dir: Path, item_ids: list[str], path: Path) -> Path:
    """The first items' 2x2 grids side by side: one picture per table row, same prompts in every row."""
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
