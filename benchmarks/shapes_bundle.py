"""Carry a shapes recipe run's *trained* stages between machines in at most 8 files of at most 16 MiB each.

    python benchmarks/shapes_bundle.py write RUN DIR      # RUN's trained stages -> DIR
    python benchmarks/shapes_bundle.py restore DIR RUN    # -> a run dir; `ella shapes reproduce --out RUN` resumes

The GPU machines this project trains on hand back only a few small files per call, and one session
may not have the GPU time for every stage (``benchmarks/shapes_gpu_job.sh``). The world and the
latent cache are deterministic and cheap to rebuild, so a bundle holds only what training produced:
the VAE (fp32), the base UNet and each connector (fp16 — the precision the model ships in) and a
``meta.tar`` with configs, logs and scores. Restored into a run directory, ``reproduce`` skips the
stages they cover and rebuilds only what a remaining stage needs (``benchmarks/shapes/bundle-base/``
is the committed VAE + base of the published run).

The base UNet is rounded to fp16 when the base is written (``recipe.write_base``), so storing it in
fp16 here loses nothing: the connectors are trained against exactly the weights that ship. The base's
weak text encoder is MiniLM's embedding layer, rebuilt from the installed package rather than carried.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ella.connector import TimestepAwareSemanticConnector
from ella.errors import EllaError
from ella.io import atomic_path
from ella.shapes import models as M

MAX_FILES, MAX_BYTES = 8, 16 * 2**20
WEIGHTS = "diffusion_pytorch_model.safetensors"


def write_bundle(run: Path, out: Path) -> list[Path]:
    """Trained stages of ``run`` -> ``out`` (≤ 8 files, each ≤ 16 MiB); refuses to write over a bundle."""
    if not (run / "vae" / "config.json").is_file():
        raise EllaError(f"{run} has no trained stage (no vae/config.json): nothing to bundle")
    if out.exists() and any(out.iterdir()):
        raise EllaError(f"{out} is not empty; write the bundle into a new directory")
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
    with atomic_path(out / "vae.safetensors") as tmp:
        shutil.copyfile(run / "vae" / WEIGHTS, tmp)
    written.append(out / "vae.safetensors")
    if (run / "base" / "unet" / WEIGHTS).is_file():
        fp16_copy(run / "base" / "unet" / WEIGHTS, "unet.safetensors")
    for connector in sorted(run.glob("connector-*/ella.safetensors")):
        model = TimestepAwareSemanticConnector.from_single_file(connector, torch_dtype=torch.float16)
        model.save_single_file(out / f"{connector.parent.name}.safetensors")
        written.append(out / f"{connector.parent.name}.safetensors")
    too_big = [f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in written if p.stat().st_size > MAX_BYTES]
    if too_big or len(written) > MAX_FILES:
        raise EllaError(f"bundle of {len(written)} files does not fit 8 x 16 MiB: {', '.join(too_big) or 'too many'}")
    return written


def restore_bundle(bundle: Path, run: Path) -> list[str]:
    """Put a bundle's stages into ``run``; returns the stages restored (vae, base, connector-*).

    Each stage directory is assembled aside and moved in whole. A stage ``run`` already has is kept
    if it holds the bundle's very weights (several bundles of one run restore into one directory, e.g.
    one connector each) and refused otherwise: a bundle never overwrites another run's output.
    """
    if not (bundle / "meta.tar").is_file() or not (bundle / "vae.safetensors").is_file():
        raise EllaError(f"{bundle} is not a shapes bundle (no meta.tar / vae.safetensors); write one with `write`")
    stages = ["vae"] + (["base"] if (bundle / "unet.safetensors").is_file() else [])
    stages += [c.stem for c in sorted(bundle.glob("connector-*.safetensors"))]
    present = [s for s in stages if (run / s).exists()]
    differ = [s for s in present if not _holds(run, bundle, s)]
    if differ:
        raise EllaError(f"{run} already has other weights for {', '.join(differ)}; restore into a new run directory")
    todo = [s for s in stages if s not in present]
    run.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run, prefix=".restore-") as tmp:
        staging = Path(tmp)
        with tarfile.open(bundle / "meta.tar") as tar:
            tar.extractall(staging, filter="data")
        shutil.copyfile(bundle / "vae.safetensors", staging / "vae" / WEIGHTS)
        if "base" in todo:
            save_file(_bundled_unet(bundle), str(staging / "base" / "unet" / WEIGHTS))
            shutil.copyfile(bundle / "vae.safetensors", staging / "base" / "vae" / WEIGHTS)
            encoder, _ = M.weak_text_encoder()  # MiniLM's embeddings: rebuilt rather than carried (46 MB)
            encoder.save_pretrained(staging / "base" / "text_encoder", safe_serialization=True)
        for stage in todo:
            if stage.startswith("connector-"):
                (staging / stage).mkdir(exist_ok=True)
                shutil.copyfile(bundle / f"{stage}.safetensors", staging / stage / "ella.safetensors")
            os.replace(staging / stage, run / stage)
        for f in sorted(staging.glob("*.json")):  # the bundled run's records, where this run has none
            if not (run / f.name).exists():
                os.replace(f, run / f.name)
        if (staging / "eval").is_dir() and not (run / "eval").exists():
            os.replace(staging / "eval", run / "eval")
    with atomic_path(run / "restored.json") as tmp:
        tmp.write_text(json.dumps({"bundle": str(bundle), "restored": todo, "already_there": present}) + "\n")
    return todo


def _bundled_unet(bundle: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(bundle / "unet.safetensors").items()}


def _holds(run: Path, bundle: Path, stage: str) -> bool:
    """Whether ``run``'s ``stage`` has exactly the weights the bundle carries for it."""
    if stage == "vae":
        mine, theirs = run / "vae" / WEIGHTS, bundle / "vae.safetensors"
    elif stage == "base":
        mine = run / "base" / "unet" / WEIGHTS
        if not mine.is_file():
            return False
        have, carried = load_file(mine), _bundled_unet(bundle)
        return have.keys() == carried.keys() and all(torch.equal(have[k], carried[k]) for k in have)
    else:
        mine, theirs = run / stage / "ella.safetensors", bundle / f"{stage}.safetensors"
    return mine.is_file() and mine.read_bytes() == theirs.read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    write = actions.add_parser("write", help="a run's trained stages -> a bundle directory")
    write.add_argument("run", type=Path)
    write.add_argument("dir", type=Path)
    restore = actions.add_parser("restore", help="a bundle -> a run directory")
    restore.add_argument("dir", type=Path)
    restore.add_argument("run", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.action == "write":
            print("bundle:", [p.name for p in write_bundle(args.run, args.dir)])
        else:
            print("restored:", restore_bundle(args.dir, args.run))
    except EllaError as err:
        print(f"shapes_bundle: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
