"""`ella cache`: encode a dataset once — VAE latents, optionally LLM features — so training skips those models.

This module is the cache's *writer*; the layout and its reader (:class:`~ella.train.data.CachedDataset`)
live in ``data.py`` with the other dataset kinds. Latents are stored in fp16 because that halves the
disk and the VAE is not accurate to more digits anyway. Crops and flips are drawn once, with the seed,
when caching: cached training sees the same crop every epoch (caption dropout still varies per epoch).

An interrupted run resumes: ``cache.partial.json`` records the settings, the finished shards and
where in the (fixed-order) dataset they end, after every shard.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..devices import default_device, resolve_dtype
from ..errors import EllaError
from ..hub import SINGLE_FILE_SUFFIXES, check_offline, loading
from ..io import atomic_path
from ..llm import load_llm
from ..text import PromptTruncatedWarning, encode_text
from .checkpoint import writable_dir
from .config import MAX_SEED, require_train_extra
from .data import CACHE_VERSION, Augment, CachedDataset, collate, open_dataset, read_cache_index
from .models import encode_latents


def _collate_flags(samples: list[dict | None]) -> tuple[dict, list[bool]]:
    """collate, plus which entries were readable: the resume point is counted in entries, not samples."""
    return collate(samples), [s is not None for s in samples]


def _json_safe(value):
    """``value`` as it reads back from JSON (tuples become lists), so settings compare equal across runs."""
    return json.loads(json.dumps(value, allow_nan=False))


def _dumps(value, **kwargs) -> str:
    """Strict JSON: a NaN or infinity is a bug upstream, and other JSON readers reject them."""
    return json.dumps(value, allow_nan=False, **kwargs)


def _start(out: Path, settings: dict) -> dict | None:
    """Where to begin: None if a finished cache with these settings is already there, else the resume state."""
    if (out / "cache.json").is_file():
        index = read_cache_index(out)
        if index.get("settings") == settings:
            return None
        raise EllaError(
            f"{out} already holds a finished cache made with other settings; pick another --output "
            "or delete that directory"
        )
    state = {"settings": settings, "shards": [], "batch": 0, "offset": 0, "skipped": 0, "truncated": 0}
    partial = out / "cache.partial.json"
    if partial.is_file():
        try:
            state = json.loads(partial.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            state = err
        if not isinstance(state, dict) or not {"settings", "shards", "batch", "offset"} <= state.keys():
            raise EllaError(
                f"{partial} is not the resume state of an interrupted `ella cache` run (unreadable or "
                "incomplete); delete the directory and re-run"
            )
        if state["settings"] != settings:
            differ = sorted(
                k for k in settings.keys() | state["settings"].keys() if settings.get(k) != state["settings"].get(k)
            )
            raise EllaError(
                f"{out} holds an interrupted cache made with other settings (differs in: "
                f"{', '.join(differ)}); re-run with the same settings to resume, or delete it"
            )
        for shard in state["shards"]:
            if not (out / f"{shard['name']}.safetensors").is_file() or not (out / f"{shard['name']}.json").is_file():
                raise EllaError(f"{out} lost {shard['name']} of an interrupted cache; delete the directory and re-run")
    elif any(out.glob("shard-*.safetensors")):
        raise EllaError(
            f"{out} holds shard files but no cache.partial.json to resume from; pick another --output "
            "or delete that directory"
        )
    return state


def _save_shard(out: Path, name: str, rows: list[dict]) -> None:
    tensors = {
        "latents": torch.stack([r["latents"] for r in rows]).to(torch.float16),
        "original_size": torch.stack([r["original_size"] for r in rows]).long(),
        "crop_top_left": torch.stack([r["crop_top_left"] for r in rows]).long(),
    }
    if "features" in rows[0]:
        tensors["features"] = torch.stack([r["features"] for r in rows]).to(torch.float16)
        tensors["feature_mask"] = torch.stack([r["feature_mask"] for r in rows]).to(torch.uint8)
    with atomic_path(out / f"{name}.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with atomic_path(out / f"{name}.json") as tmp:
        tmp.write_text(_dumps({"keys": [r["key"] for r in rows], "captions": [r["caption"] for r in rows]}))


def _features(llm, tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Fixed-length features (as the release computes them), the tokenizer's mask, and which captions were cut.

    encode_text's per-prompt truncation warnings would flood a large run; they are counted instead.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        states = encode_text(llm, tokenizer, captions, max_length=max_length).hidden_states
    mask = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")[
        "attention_mask"
    ]
    cut = [len(ids) > max_length for ids in tokenizer(captions)["input_ids"]]
    return states.to(torch.float16).cpu(), mask.to(torch.uint8), cut


def write_cache(
    dataset,
    out_dir: str | os.PathLike,
    vae,
    *,
    llm=None,
    tokenizer=None,
    max_length: int = 128,
    batch_size: int = 16,
    shard_size: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    source: str = "",
    base: str = "",
    llm_name: str = "",
    progress: bool = True,
) -> dict:
    """Encode ``dataset`` (from :func:`open_dataset`, opened with ``caption_dropout=0``) into ``out_dir``.

    Returns the ``cache.json`` index. The dataset is read in a fixed order (epoch 0, no shuffle) so an
    interrupted run can resume where its last finished shard ended; a finished cache with the same
    settings is returned as is. The VAE (and LLM) are moved to ``device``; a float16 VAE whose config
    asks for ``force_upcast`` encodes in float32, as diffusers' pipelines do.
    """
    aug = getattr(dataset, "aug", None)
    if isinstance(dataset, CachedDataset) or aug is None:
        raise EllaError("write_cache needs a raw dataset from open_dataset (images), not an `ella cache` directory")
    if aug.caption_dropout != 0:
        raise EllaError(
            f"write_cache needs the dataset opened with caption_dropout=0 (got {aug.caption_dropout}): "
            "the cache stores real captions and dropout happens when training reads it"
        )
    if (llm is None) != (tokenizer is None):
        raise EllaError("write_cache needs both llm and tokenizer to cache features, or neither")
    if batch_size < 1 or shard_size < 1:
        raise EllaError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    if iterable and getattr(dataset, "world_size", 1) != 1:
        raise EllaError("write_cache reads all tar shards in one process: open the dataset with world_size=1")
    out = writable_dir(out_dir, "the cache directory")
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    vae_info = {
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": shift,
        "latent_channels": int(vae.config.latent_channels),
    }
    settings = _json_safe(
        {
            "version": CACHE_VERSION,
            "source": source,
            "base": base,
            "resolution": aug.resolution,
            "center_crop": aug.center_crop,
            "random_flip": aug.random_flip,
            "seed": aug.seed,
            "vae": vae_info,
            "llm": {"name": llm_name, "max_length": max_length} if llm is not None else None,
            "shard_size": shard_size,
            "batch_size": batch_size,
            "samples": None if iterable else len(dataset),
            "shards": getattr(dataset, "num_shards", None),
            "num_workers": num_workers if iterable else None,
        }
    )
    state = _start(out, settings)
    if state is None:
        return read_cache_index(out)

    vae_dtype = torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype
    vae.to(device)
    if vae.dtype != vae_dtype:
        vae.to(dtype=vae_dtype)
    if llm is not None:
        llm.to(device)
        empty, empty_mask, _ = _features(llm, tokenizer, [""], max_length)
        with atomic_path(out / "empty.safetensors") as tmp:
            save_file({"features": empty[0].contiguous(), "feature_mask": empty_mask[0].contiguous()}, str(tmp))

    dataset.set_epoch(0)
    first = 0 if iterable else state["batch"]
    source_data = dataset if iterable else torch.utils.data.Subset(dataset, range(first * batch_size, len(dataset)))
    loader = torch.utils.data.DataLoader(
        source_data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate_flags
    )
    total = None if iterable else len(dataset)
    bar = tqdm(
        total=total,
        initial=min(first * batch_size, total or 0),
        desc="cache",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    rows: list[dict] = []

    def flush(batch_index: int, offset: int) -> None:
        name = f"shard-{len(state['shards']):05d}"
        _save_shard(out, name, rows)
        state["shards"].append({"name": name, "count": len(rows)})
        state.update(batch=batch_index, offset=offset)
        with atomic_path(out / "cache.partial.json") as tmp:
            tmp.write_text(_dumps(state))
        rows.clear()

    with torch.inference_mode():
        for b, (batch, readable) in enumerate(loader, start=first):
            bar.update(len(readable))
            if b < state["batch"]:
                continue  # a tar stream can't seek: batches before the resume point are read and dropped
            if batch["captions"]:
                latents = encode_latents(vae, batch["pixel_values"]).to(torch.float16).cpu()
                if llm is not None:
                    features, masks, cut = _features(llm, tokenizer, batch["captions"], max_length)
            j = -1
            for e, ok in enumerate(readable):
                j += ok
                if b == state["batch"] and e < state["offset"]:
                    continue  # in a shard already written
                if not ok:
                    state["skipped"] += 1
                    continue
                row = {
                    "key": batch["keys"][j],
                    "caption": batch["captions"][j],
                    "latents": latents[j],
                    "original_size": batch["original_size"][j],
                    "crop_top_left": batch["crop_top_left"][j],
                }
                if llm is not None:
                    row.update(features=features[j], feature_mask=masks[j])
                    state["truncated"] += cut[j]
                rows.append(row)
                if len(rows) == shard_size:
                    flush(b, e + 1)
        if rows:
            flush(b + 1, 0)
    bar.close()
    count = sum(s["count"] for s in state["shards"])
    if count == 0:
        raise EllaError(
            f"no readable samples in {source or 'the dataset'}: all {state['skipped']} were unreadable "
            "or had no caption"
        )
    with safe_open(str(out / f"{state['shards'][0]['name']}.safetensors"), framework="pt") as f:
        latent_shape = f.get_slice("latents").get_shape()[1:]
        hidden = f.get_slice("features").get_shape()[-1] if llm is not None else None
    index = {
        "version": CACHE_VERSION,
        "count": count,
        "skipped": state["skipped"],
        "shards": state["shards"],
        "resolution": aug.resolution,
        "center_crop": aug.center_crop,
        "random_flip": aug.random_flip,
        "latent_shape": list(latent_shape),
        "vae": vae_info,
        "base": base,
        "source": source,
        "llm": {
            "name": llm_name,
            "hidden_size": hidden,
            "max_length": max_length,
            "truncated_captions": state["truncated"],
        }
        if llm is not None
        else None,
        "seed": aug.seed,
        "settings": settings,
    }
    with atomic_path(out / "cache.json") as tmp:
        tmp.write_text(_dumps(index, indent=1))
    (out / "cache.partial.json").unlink(missing_ok=True)
    return index


def check_cache_args(args) -> Path:
    """Every ``ella cache`` number and the output path, checked before the dataset is scanned or a model loads.

    Returns the output directory (created if missing). One line per problem, naming the flag.
    """
    if not isinstance(args.resolution, int) or args.resolution < 8 or args.resolution % 8:
        raise EllaError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}"
        )
    for name in ("batch_size", "shard_size", "llm_max_length"):
        if getattr(args, name) < 1:
            raise EllaError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.dataloader_num_workers < 0:
        workers = args.dataloader_num_workers
        raise EllaError(f"--dataloader_num_workers must be 0 (load in this process) or more, got {workers}")
    if not 0 <= args.seed < MAX_SEED:
        raise EllaError(f"--seed must be in [0, 2**32), got {args.seed}")
    if bool(args.train_data_dir) == bool(args.dataset_name):
        raise EllaError("give exactly one of --train_data_dir or --dataset_name")
    return writable_dir(args.output, "--output")


def cache_command(args) -> str:
    """``ella cache``: open the source raw (no caption dropout), load the VAE (and LLM), write; one summary line."""
    require_train_extra()
    out = check_cache_args(args)
    source = args.train_data_dir or args.dataset_name
    aug = Augment(
        resolution=args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        caption_dropout=0.0,
        seed=args.seed,
    )
    dataset = open_dataset(
        source, aug, image_column=args.image_column, caption_column=args.caption_column, split=args.dataset_split
    )
    if isinstance(dataset, CachedDataset):
        raise EllaError(f"{source} is already an `ella cache` directory; point --train_data_dir at the images")
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    base = args.pretrained_model_name_or_path
    needed = [("base model", str(base), "vae/config.json")]
    if args.features:
        needed.append(("LLM", str(args.llm_name_or_path), "config.json"))
    check_offline(needed)
    with loading("base model", str(base)):
        if str(base).endswith(SINGLE_FILE_SUFFIXES):
            vae = AutoencoderKL.from_single_file(str(base))
        else:
            vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    llm = tokenizer = None
    if args.features:
        llm, tokenizer = load_llm(args.llm_name_or_path, dtype=dtype, device=device)
    local = Path(source).expanduser()
    index = write_cache(
        dataset,
        out,
        vae,
        llm=llm,
        tokenizer=tokenizer,
        max_length=args.llm_max_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device=device,
        dtype=dtype,
        num_workers=args.dataloader_num_workers,
        base=str(base),
        source=str(local.resolve()) if local.exists() else str(source),
        llm_name=str(args.llm_name_or_path) if args.features else "",
    )
    cut = (index["llm"] or {}).get("truncated_captions", 0)
    return (
        f"{args.output}: {index['count']} samples in {len(index['shards'])} shards"
        + (f", {index['skipped']} unreadable samples skipped" if index["skipped"] else "")
        + (f", {cut} captions truncated to {args.llm_max_length} tokens" if cut else "")
    )
