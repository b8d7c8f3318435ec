"""Shapes-DPG: the DPG-Bench pipeline (``ella.bench``) run on the shapes world, for the base and each connector.

Held-out scenes (a seed the training set never used), the same 2x2 grid protocol and the same
scorer as DPG-Bench, with the pixel oracle (``ShapesOracle``) as the VQA model. Every row uses the
same prompts, seeds, steps and guidance, so the table isolates what the text condition does.

ELLA's claim is language understanding, so each row is scored on four kinds of prompt for the same
scenes (``captions.KINDS``): ``train`` (training-style wording), ``heldout`` (sentence families and
position phrases no training caption uses), ``terse`` (comma-separated tags) and ``underspecified``
(some facts left out: only what the prompt states is asked, and how much the unstated facts vary
over the four seeds is measured — a model that understands "a red circle" should place it anywhere,
not always in the same cell). Each kind has ``items_per_count`` scenes of every object count 1-5,
so the table also shows where dense scenes break.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image

from ..bench.data import Benchmark
from ..bench.dpg import aggregate, score_items, split_grid
from ..bench.generate import TILES, generate_grids, make_grid, shard_items
from ..io import atomic_path
from . import gpus
from . import models as M
from .captions import Specified, prompt_for
from .gpus import Group
from .oracle import ShapesOracle
from .questions import item_id, questions, shapes_benchmark
from .ship import ella_pipeline
from .world import Scene, render, scene_for

EVAL_SEED_OFFSET = 1_000_003  # held-out scenes: never produced by the training seed
CEILING = "VAE round-trip of the true scene (ceiling)"
#: The prompt kinds every row is scored on (``captions.KINDS`` has two more, diagnostic ones).
EVAL_KINDS = ("train", "heldout", "terse", "underspecified")
COUNTS = (1, 2, 3, 4, 5)
ITEMS_PER_CALL = 64  # items (4 tiles each) per pipeline call on a GPU: 256 images of 64x64


@dataclass
class KindBench:
    """One prompt kind over every object count: item ``n3-shapes-00007`` is scene 7 of the 3-object scenes."""

    benchmark: Benchmark
    scenes: dict[str, Scene]
    specified: dict[str, Specified]


def kind_benchmark(kind: str, items_per_count: int, seed: int, counts: tuple[int, ...] = COUNTS) -> KindBench:
    """The held-out scenes (``seed + EVAL_SEED_OFFSET``) with ``kind`` prompts and their questions."""
    prompts, asked, scenes, specified, blobs = {}, {}, {}, {}, []
    for count in counts:
        bench, found = shapes_benchmark(items_per_count, seed + EVAL_SEED_OFFSET, n_objects=count, kind=kind)
        blobs.append(bench.csv_blob)
        for i in range(items_per_count):
            key = f"n{count}-{item_id(i)}"
            prompts[key] = bench.prompts[item_id(i)]
            asked[key] = bench.questions[item_id(i)]
            scenes[key] = found[item_id(i)]
            specified[key] = prompt_for(seed + EVAL_SEED_OFFSET, i, kind, count).specified
    name = "shapes" if kind == "train" else f"shapes-{kind}"
    benchmark = Benchmark(
        name, prompts, asked, Path(f"{name}-seed{seed}-{items_per_count}x{len(counts)}.csv"), "+".join(blobs)
    )
    return KindBench(benchmark, scenes, specified)


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
    n_items: int = 100,
    kinds: tuple[str, ...] = EVAL_KINDS,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    device: str = "cpu",
    progress: bool = True,
    group: Group | None = None,
) -> dict:
    """Generate + score every row on every prompt kind; writes ``out/<row>/<kind>/`` grids, ``out/results.json``
    and ``out/results.md``. ``n_items`` scenes per object count and kind.

    A row's ``overall`` is its score on training-style prompts (the shapes-DPG score of earlier runs);
    ``kinds`` holds every kind's overall, per object count, categories and (underspecified) seed diversity.
    Under a launcher (``group``) every process draws its share of each row's items, then rank 0 scores
    the row with a process pool (the oracle is CPU work) and writes the results; every process returns them.
    """
    group = group or Group(device=torch.device(device))
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    benches = {kind: kind_benchmark(kind, n_items, seed) for kind in kinds}
    settings = {
        "n_items_per_count": n_items,
        "counts": list(COUNTS),
        "kinds": list(kinds),
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
    }
    results = gpus.from_main(group, _scored_rows(out / "results.json", settings))  # what a cut-off run scored
    rows = {CEILING: None, **load_rows(base, connectors, device, dtype)}
    for name, build in rows.items():
        if name in results:
            continue
        row_dir = out / slug(name)
        if build is None:  # the true scenes' round trip: the same pictures for every kind
            scenes = benches[kinds[0]].scenes
            mine = shard_items(list(scenes), group.rank, group.world)
            write_ceiling_grids(base / "vae", {i: scenes[i] for i in mine}, row_dir)
        else:
            pipe = build().to(device)
            pipe.set_progress_bar_config(disable=True)
            for kind, kb in benches.items():
                generate_grids(
                    pipe,
                    kb.benchmark.prompts,
                    row_dir / kind,
                    settings={"row": name, "base": str(base), "kind": kind},
                    base_seed=seed,
                    tile_size=M.RESOLUTION,
                    progress=progress,
                    shard=(group.rank, group.world),
                    is_main=group.main,
                    items_per_call=ITEMS_PER_CALL if device.startswith("cuda") else 4,
                    call_kwargs={"num_inference_steps": steps, "guidance_scale": guidance},
                )
            del pipe
        gpus.barrier(group)
        if group.main:
            results[name] = score_row(benches, row_dir, shared=build is None)
            montage(
                row_dir / ("" if build is None else kinds[0]),
                sample_items(benches[kinds[0]]),
                out / f"{slug(name)}.png",
            )
            # Written after every row, so a run cut off (GPU-time limit) keeps what it scored.
            with atomic_path(out / "results.json") as tmp:
                tmp.write_text(json.dumps({"settings": settings, "rows": results}, indent=2, allow_nan=False))
            with atomic_path(out / "results.md") as tmp:
                tmp.write_text(to_markdown(results))
    return gpus.from_main(group, results)


def sample_items(kb: KindBench, per_count: int = 2) -> list[str]:
    """The first items of every object count: the montage's columns."""
    return [k for c in COUNTS for k in [key for key in kb.scenes if key.startswith(f"n{c}-")][:per_count]]


def score_row(benches: dict[str, KindBench], row_dir: Path, shared: bool = False) -> dict:
    """Every kind's scores for one row, the items scored in parallel (one oracle per worker process).

    ``shared``: the grids are one set for every kind (the ceiling), in ``row_dir`` itself."""
    jobs = []
    for kind, kb in benches.items():
        images = row_dir if shared else row_dir / kind
        ids = list(kb.benchmark.questions)
        jobs += [(kind, kb, images, ids[j : j + 25]) for j in range(0, len(ids), 25)]
    # fork: the workers only read PNGs and run numpy/scipy (no CUDA), and inherit the benchmarks for free
    with multiprocessing.get_context("fork").Pool(max(1, min(32, os.cpu_count() or 1))) as pool:
        parts = pool.map(_score_chunk, jobs)
    kinds = {}
    for kind, kb in benches.items():
        items, errors, diversity = {}, [], []
        for (job_kind, _, _, _), (part_items, part_errors, part_diversity) in zip(jobs, parts):
            if job_kind == kind:
                items.update(part_items)
                errors += part_errors
                diversity += part_diversity
        result = aggregate(kb.benchmark, items, errors, official_compat=False)
        by_count = {  # string keys, as they come back from results.json
            str(c): 100.0 * float(np.mean(scores))
            for c in COUNTS
            if (scores := [r["score"] for k, r in items.items() if k.startswith(f"n{c}-")])
        }
        kinds[kind] = {
            "overall": result["overall"],
            "by_count": by_count,
            "categories": result["categories"],
            "subcategories": result["subcategories"],
            "num_items": result["num_items"],
        }
        if diversity:
            kinds[kind]["diversity"] = summarise_diversity(diversity)
    first = next(iter(kinds))
    return {"overall": kinds[first]["overall"], "categories": kinds[first]["categories"], "kinds": kinds}


def _score_chunk(job: tuple) -> tuple[dict, list, list]:
    _, kb, images, ids = job
    oracle = ShapesOracle()
    items, errors = score_items(kb.benchmark, images, oracle, item_ids=ids)
    diversity = [
        seed_diversity(kb.scenes[i], kb.specified[i], images / f"{i}.png", oracle)
        for i in ids
        if i in items and not kb.specified[i].full
    ]
    return items, errors, diversity


def seed_diversity(scene: Scene, specified: Specified, grid: Path, oracle: ShapesOracle) -> dict[str, int]:
    """For each fact a prompt left out, how many different choices the four seeds made (1 = always the same).

    ``background``: distinct backgrounds; ``size`` / ``position``: per group whose size / cells went
    unstated, the distinct sizes / cell sets the oracle finds for that shape (a tile that lost the
    shape counts as one more choice, "none")."""
    with Image.open(grid) as image:
        seen = [oracle.analyse(tile) for tile in split_grid(image.convert("RGB"), TILES)]
    out = {}
    if not specified.background:
        out["background"] = len({a.background for a in seen})
    for group, spec in zip(scene.groups(), specified.groups):
        if not spec.size:
            out[f"size/{group.shape}"] = len({tuple(sorted({b.size for b in a.of(group.shape)})) for a in seen})
        if not all(spec.cells):
            out[f"position/{group.shape}"] = len(
                {tuple(sorted((b.row, b.col) for b in a.of(group.shape))) for a in seen}
            )
    return out


def summarise_diversity(records: list[dict[str, int]]) -> dict:
    """Per kind of unstated fact: how many such facts, the mean number of distinct choices over 4 seeds, and
    the share of facts on which the seeds disagreed at all."""
    summary = {}
    for what in ("background", "size", "position"):
        values = [v for r in records for k, v in r.items() if k.split("/")[0] == what]
        if values:
            summary[what] = {
                "facts": len(values),
                "mean_distinct": round(float(np.mean(values)), 2),
                "varied_percent": round(100.0 * float(np.mean([v > 1 for v in values])), 1),
            }
    return summary


def write_ceiling_grids(vae_path: Path, scenes: dict[str, Scene], row_dir: Path) -> None:
    """Each item's true render, encoded and decoded by the base's VAE, in all four tiles.

    Every row draws through this VAE, so what the oracle still sees after a round trip is the most
    any row can score: a low ceiling means the autoencoder, not the text condition, is the limit.
    """
    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    row_dir.mkdir(parents=True, exist_ok=True)
    for key, scene in scenes.items():
        if not (row_dir / f"{key}.png").is_file():
            with atomic_path(row_dir / f"{key}.png") as tmp:
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
    """The items' 2x2 grids side by side: one picture per table row, same prompts in every row."""
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
    """One table per prompt kind (overall and per object count), the categories of training-style prompts,
    and how much the seeds vary what an under-specified prompt left out."""
    first = next(iter(results.values()))
    kinds = list(first.get("kinds", {}))
    lines = []
    for kind in kinds:
        lines += [
            f"### {kind} prompts",
            "",
            "| row | overall | " + " | ".join(f"{c} obj" for c in COUNTS) + " |",
            "|---" * (len(COUNTS) + 2) + "|",
        ]
        for name, r in results.items():
            k = r["kinds"][kind]
            cells = [f"{k['by_count'][str(c)]:.1f}" if str(c) in k["by_count"] else "—" for c in COUNTS]
            lines.append(f"| {name} | **{k['overall']:.1f}** | " + " | ".join(cells) + " |")
        lines.append("")
    categories = sorted({c for r in results.values() for c in r["categories"]})
    lines += [
        f"### categories ({kinds[0] if kinds else 'train'} prompts)",
        "",
        "| row | overall | " + " | ".join(categories) + " |",
        "|---" * (len(categories) + 2) + "|",
    ]
    for name, r in results.items():
        cells = [f"{r['categories'].get(c, float('nan')):.1f}" for c in categories]
        lines.append(f"| {name} | {r['overall']:.1f} | " + " | ".join(cells) + " |")
    diverse = [
        (name, r["kinds"][k]["diversity"]) for name, r in results.items() for k in kinds if "diversity" in r["kinds"][k]
    ]
    if diverse:
        lines += [
            "",
            "### unstated facts: distinct choices over 4 seeds (mean; % of facts that varied)",
            "",
            "| row | background | size | position |",
            "|---|---|---|---|",
        ]
        for name, d in diverse:
            cells = [
                f"{d[w]['mean_distinct']:.2f} ({d[w]['varied_percent']:.0f}%)" if w in d else "—"
                for w in ("background", "size", "position")
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
