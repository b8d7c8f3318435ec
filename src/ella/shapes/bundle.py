"""Carry a recipe run's *trained* stages between machines in at most 8 files of at most 16 MiB each.

The GPU machines this project trains on hand back only a few small files per call, and one session
may not have the GPU time for every stage. The world and the latent cache are deterministic and
cheap to rebuild, so a bundle holds only what training produced: the VAE (fp32), the base UNet and
each connector (fp16 — the precision the model ships in) and a ``meta.tar`` with configs, logs and
scores. ``restore_bundle`` puts them back into a run directory, where ``reproduce`` then skips the
stages they cover and runs the rest.

The base UNet is rounded to fp16 when the base is written (``recipe.write_base``), so storing it in
fp16 here loses nothing: the connectors are trained against exactly the weights that ship.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import torch

from ..errors import EllaError
from ..io import atomic_path

MAX_FILES, MAX_BYTES = 8, 16 * 2**20


def write_bundle(run: Path, out: Path) -> list[Path]:
    """Trained stages of ``run`` -> ``out`` (≤ 8 files, each ≤ 16 MiB)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def fp16_copy(src: Path, name: str) -> None:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(src).items()}
        with atomic_path(out / name) as tmp:
            save_file(tensors, str(tmp))
        written.append(out / name)

    meta = io.BytesIO()
    with tarfile.open(fileobj=meta, mode="w") as tar:
        for sub in ("vae", "base"):  # configs, tokenizer, scheduler: everything but the weights
            for f in sorted((run / sub).rglob("*")):
                if f.is_file() and f.suffix != ".safetensors":
                    tar.add(f, arcname=str(f.relative_to(run)))
        extras = sorted(run.glob("*.json")) + sorted(run.glob("connector-*/training.json"))
        for f in extras + sorted((run / "eval").glob("*.md")) + sorted((run / "eval").glob("*.png")):
            tar.add(f, arcname=str(f.relative_to(run)))
        if (run / "eval" / "results.json").is_file():
            tar.add(run / "eval" / "results.json", arcname="eval/results.json")
    with atomic_path(out / "meta.tar") as tmp:
        tmp.write_bytes(meta.getvalue())
    written.append(out / "meta.tar")
    if (run / "vae" / "diffusion_pytorch_model.safetensors").is_file():
        shutil.copyfile(run / "vae" / "diffusion_pytorch_model.safetensors", out / "vae.safetensors")
        written.append(out / "vae.safetensors")
    if (run / "base" / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        fp16_copy(run / "base" / "unet" / "diffusion_pytorch_model.safetensors", "unet.safetensors")
    for connector in sorted(run.glob("connector-*/ella.safetensors")):
        from ..connector import TimestepAwareSemanticConnector

        model = TimestepAwareSemanticConnector.from_single_file(connector, torch_dtype=torch.float16)
        model.save_single_file(out / f"{connector.parent.name}.safetensors")
        written.append(out / f"{connector.parent.name}.safetensors")
    too_big = [f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in written if p.stat().st_size > MAX_BYTES]
    if too_big or len(written) > MAX_FILES:
        raise EllaError(f"bundle of {len(written)} files does not fit 8 x 16 MiB: {', '.join(too_big) or 'too many'}")
    return written


def restore_bundle(bundle: Path, run: Path) -> list[str]:
    """Put a bundle's stages into ``run``; returns the stages restored (vae, base, connector-*)."""
    from safetensors.torch import load_file, save_file

    if not (bundle / "meta.tar").is_file():
        raise EllaError(
            f"{bundle} is not a shapes bundle (no meta.tar); write one with `ella shapes reproduce --bundle`"
        )
    run.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle / "meta.tar") as tar:
        tar.extractall(run, filter="data")
    restored = []
    if (bundle / "vae.safetensors").is_file():
        shutil.copyfile(bundle / "vae.safetensors", run / "vae" / "diffusion_pytorch_model.safetensors")
        restored.append("vae")
    if (bundle / "unet.safetensors").is_file():
        tensors = {k: v.float() for k, v in load_file(bundle / "unet.safetensors").items()}
        save_file(tensors, str(run / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
        shutil.copyfile(bundle / "vae.safetensors", run / "base" / "vae" / "diffusion_pytorch_model.safetensors")
        restored.append("base")
    for connector in sorted(bundle.glob("connector-*.safetensors")):
        target = run / connector.stem
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(connector, target / "ella.safetensors")
        restored.append(connector.stem)
    if (run / "base").is_dir() and not (run / "base" / "text_encoder" / "model.safetensors").is_file():
        _rebuild_text_encoder(run / "base")
    (run / "restored.json").write_text(json.dumps(restored))
    return restored


def _rebuild_text_encoder(base: Path) -> None:
    """The base's weak encoder weights are MiniLM's embeddings: rebuilt here rather than carried (46 MB)."""
    from . import models as M

    encoder, _ = M.weak_text_encoder()
    encoder.save_pretrained(base / "text_encoder", safe_serialization=True)
