"""Benchmark image generation: one 2x2 grid per prompt, resumable, sharded across processes.

Seed protocol: tile ``k`` (0..3: top-left, top-right, bottom-left, bottom-right) of every item
is generated with ``torch.Generator(device).manual_seed(base_seed + k)``, so any tile can be
regenerated alone and two models are compared on the same noise.

Resume: an item whose ``<item_id>.png`` exists is skipped; images are written atomically, so an
existing file is always complete. A ``manifest.json`` records the settings; resuming into a folder
made with different settings is refused (mixed settings would silently corrupt the benchmark).

Sharding: items are sorted and process ``i`` of ``n`` takes every ``n``-th item starting at ``i``
(``accelerate launch`` sets ``i``/``n``), so the union of any shard count is exactly one run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..errors import EllaError
from ..io import atomic_path
from ..prompts import literal
from ..sample import versions
from .data import item_sort_key

TILES = 4


def shard_items(item_ids: list[str], index: int, count: int) -> list[str]:
    """Deterministic shard ``index`` of ``count`` (natural sort: "2" before "10")."""
    if not 0 <= index < count:
        raise EllaError(f"shard index {index} is outside 0..{count - 1}")
    return sorted(item_ids, key=item_sort_key)[index::count]


def make_grid(images: list[Image.Image]) -> Image.Image:
    """2x2 grid in the official order (top-left, top-right, bottom-left, bottom-right)."""
    w, h = images[0].size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % 2) * w, (k // 2) * h))
    return grid


def check_manifest(out_dir: Path, manifest: dict, write: bool) -> None:
    """Refuse to resume into a folder generated with other settings; write the manifest if asked."""
    path = out_dir / "manifest.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))["settings"]
            changed = {k: (old.get(k), v) for k, v in manifest["settings"].items() if old.get(k) != v}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EllaError(
                f"{path} is not a manifest written by `ella bench dpg generate`; use another output folder"
            ) from None
        if changed:
            detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise EllaError(f"{out_dir} was generated with other settings ({detail}); use another output folder")
        return
    if write:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2, default=str, allow_nan=False) + "\n")


def generate_grids(
    pipe,
    prompts: dict[str, str],
    out_dir: str | Path,
    *,
    settings: dict,
    base_seed: int = 0,
    tile_size: int = 512,
    call_kwargs: dict | None = None,
    shard: tuple[int, int] = (0, 1),
    is_main: bool = True,
    progress: bool = True,
    items_per_call: int = 1,
) -> list[Path]:
    """Generate the missing grids of this process's shard; returns the paths written.

    ``items_per_call`` items (4 tiles each) go through the pipeline in one batched call.

    ``pipe`` is any diffusers text-to-image pipeline (ours or a plain baseline);
    ``call_kwargs`` go to every call (steps, guidance, negative prompt ...); ``settings``
    (model ids, etc.) go into the manifest beside the images.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    call_kwargs = dict(call_kwargs or {})
    if hasattr(pipe, "connector"):  # an ELLA pipeline parses A1111 markup; a benchmark's sentences are literal
        prompts = {item_id: literal(text) for item_id, text in prompts.items()}
    seeds = [base_seed + k for k in range(TILES)]
    manifest = {
        "settings": {**settings, "tile_size": tile_size, "seeds": seeds, "call_kwargs": call_kwargs},
        "seed_protocol": "tile k uses torch.Generator(device).manual_seed(base_seed + k); tiles TL, TR, BL, BR",
        "versions": versions(),
    }
    check_manifest(out_dir, manifest, write=is_main)
    todo = [i for i in shard_items(list(prompts), *shard) if not (out_dir / f"{i}.png").is_file()]
    chunks = [todo[j : j + items_per_call] for j in range(0, len(todo), items_per_call)]
    if progress:
        chunks = tqdm(chunks, desc=f"generating (shard {shard[0]}/{shard[1]})", unit="call")
    device = pipe._execution_device
    written = []
    for chunk in chunks:
        # Several items per call fill a large GPU; each tile still has its own seed, so the images do not
        # depend on the chunking (beyond the last bits of batched arithmetic).
        generators = [torch.Generator(device=device).manual_seed(s) for _ in chunk for s in seeds]
        images = pipe(
            [prompts[item_id] for item_id in chunk for _ in seeds],
            generator=generators,
            height=tile_size,
            width=tile_size,
            output_type="pil",
            **call_kwargs,
        ).images
        for j, item_id in enumerate(chunk):
            with atomic_path(out_dir / f"{item_id}.png") as tmp:
                make_grid(images[j * TILES : (j + 1) * TILES]).save(tmp, format="PNG")
            written.append(out_dir / f"{item_id}.png")
    return written
