"""`ella cache`: encode a dataset once — VAE latents, optionally LLM features — so training skips those models.

This module is the cache's *writer*; the layouts and their readers (:class:`~ella.train.data.CachedDataset`
for ``--format safetensors``, :class:`~ella.train.data.CachedTarShards` for ``--format webdataset``) live in
``data.py`` with the other dataset kinds. Latents are stored in fp16 because that halves the disk and
the VAE is not accurate to more digits anyway. Crops and flips are drawn once, with the seed, when
caching: cached training sees the same crop every epoch (caption dropout still varies per epoch).

**One job, any number of processes.** The source is cut into fixed *chunks* that don't depend on how
many processes run — a map-style source (image folder, Hugging Face dataset): samples
``[s * shard_size, (s + 1) * shard_size)`` in its fixed order; tar shards: one chunk per input tar, in
the shard order of epoch 0 — and chunk ``s`` becomes output shard ``s``. Under ``torchrun
--nproc_per_node N -m ella.cli cache ...`` (or ``accelerate launch``) process ``r`` encodes the chunks
``s % N == r``; every chunk is cut into the same batches whatever N, so the files are byte-identical
for any N. Each shard is written atomically, data first and its ``shard-XXXXX.json`` record last (keys,
captions, unreadable samples, size), so a re-run skips every shard whose record and data file are
complete: a killed job, or a deleted or truncated shard, costs only those shards. ``cache.partial.json``
holds the settings of an unfinished job (a re-run with others is refused, naming them); after every
process is done, rank 0 writes ``cache.json`` last, from the records.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..devices import default_device, resolve_dtype
from ..errors import EllaError, require
from ..hub import SINGLE_FILE_SUFFIXES, check_offline, loading
from ..io import atomic_path
from ..llm import load_llm
from ..text import encode_tokens, tokenize
from .checkpoint import writable_dir
from .config import MAX_SEED, require_train_extra
from .data import (
    CACHE_FORMATS,
    CACHE_SUFFIX,
    CACHE_VERSION,
    Augment,
    CachedDataset,
    CachedTarShards,
    collate,
    open_dataset,
    read_cache_index,
)
from .models import encode_latents

#: How long a process waits at the barrier for the others: a resumed job can leave one process far more
#: chunks than another, and a gloo barrier's default (30 minutes) would fail a job that is working fine.
BARRIER_TIMEOUT = timedelta(hours=24)
RECORD_FIELDS = {"keys", "captions", "skipped", "truncated", "bytes", "latent_shape", "hidden_size"}


def _collate_flags(samples: list[dict | None]) -> tuple[dict, list[bool]]:
    """collate, plus which entries were readable: the skipped count is in entries, not samples."""
    return collate(samples), [s is not None for s in samples]


def _as_is(item):
    """The DataLoader's collate_fn for batches the dataset already made (a module function: workers pickle it)."""
    return item


def _json_safe(value):
    """``value`` as it reads back from JSON (tuples become lists), so settings compare equal across runs."""
    return json.loads(json.dumps(value, allow_nan=False))


def _dumps(value, **kwargs) -> str:
    """Strict JSON: a NaN or infinity is a bug upstream, and other JSON readers reject them."""
    return json.dumps(value, allow_nan=False, **kwargs)


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


# ------------------------------------------------------------------------------------ settings


def cache_settings(
    dataset,
    *,
    format: str,
    shard_size: int,
    batch_size: int,
    source: str,
    base: str,
    vae_info: dict | None,
    llm_name: str | None,
    max_length: int,
) -> dict:
    """Everything that shapes the cache's bytes (not the number of processes or loader workers, which don't).

    A re-run must match these to resume or to be a no-op; ``llm_name`` None means no features.
    """
    aug = dataset.aug
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    return _json_safe(
        {
            "version": CACHE_VERSION,
            "format": format,
            "source": source,
            "base": base,
            "resolution": aug.resolution,
            "center_crop": aug.center_crop,
            "random_flip": aug.random_flip,
            "seed": aug.seed,
            "vae": vae_info,
            "llm": {"name": llm_name, "max_length": max_length} if llm_name is not None else None,
            "shard_size": shard_size,
            "batch_size": batch_size,
            "samples": None if iterable else len(dataset),
            "shards": getattr(dataset, "num_shards", None),
        }
    )


def check_existing(out: Path, settings: dict, *, ignore: tuple[str, ...] = ()) -> str:
    """What ``out`` holds: ``"fresh"``, ``"resume"`` (an unfinished job with these settings) or ``"finished"``.

    Anything else — a cache made with other settings (named), an older ella's, shard files with no
    settings beside them — is one line, before anything is written; ``ignore`` skips settings not
    known yet (``ella cache`` checks before the VAE loads, without its config).
    """

    def differing(old: dict) -> str:
        keys = settings.keys() | old.keys()
        return ", ".join(sorted(k for k in keys if k not in ignore and settings.get(k) != old.get(k)))

    if (out / "cache.json").is_file():
        old = read_cache_index(out).get("settings") or {}
        if old.get("version") != CACHE_VERSION:
            raise EllaError(
                f"{out} holds a finished cache of an older ella (cache version {old.get('version')}), which trains "
                "as it is; to cache again pick another --output or delete that directory"
            )
        if differing(old):
            raise EllaError(
                f"{out} already holds a finished cache made with other settings (differs in: {differing(old)}); "
                "pick another --output or delete that directory"
            )
        return "finished"
    partial = out / "cache.partial.json"
    if partial.is_file():
        try:
            state = json.loads(partial.read_text())
        except (ValueError, UnicodeDecodeError):
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
            raise EllaError(
                f"{partial} is not the resume state of an interrupted `ella cache` run (unreadable or "
                "incomplete); delete the directory and re-run"
            )
        old = state["settings"]
        if old.get("version") != CACHE_VERSION:
            raise EllaError(
                f"{out} holds a cache an older ella (cache version {old.get('version')}) did not finish, which "
                "this one can't resume; delete that directory and re-run"
            )
        if differing(old):
            raise EllaError(
                f"{out} holds an interrupted cache made with other settings (differs in: {differing(old)}); "
                "re-run with the same settings to resume, or delete it"
            )
        return "resume"
    if any(out.glob("shard-*")):
        raise EllaError(
            f"{out} holds shard files but no cache.partial.json to resume from; pick another --output "
            "or delete that directory"
        )
    return "fresh"


# ------------------------------------------------------------------------------------ chunks


def source_chunks(dataset, shard_size: int) -> list:
    """The fixed chunks of ``dataset``: ``(start, stop)`` sample ranges, or one tar path each for tar shards."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.set_epoch(0)
        return list(dataset.shards_for())
    return [(a, min(a + shard_size, len(dataset))) for a in range(0, len(dataset), shard_size)]


class _ChunkReader(torch.utils.data.IterableDataset):
    """One process's pending chunks, each read whole by one loader worker, in batches that never span two chunks.

    A chunk is cut into the same batches whatever the number of processes or workers, so its latents
    come from the same VAE calls: that is what makes the output independent of N. Yields
    ``(chunk, last, batch, readable)``; a chunk's last item may be an empty batch.
    """

    def __init__(self, dataset, chunks: list[tuple[int, object]], batch_size: int):
        self.dataset, self.chunks, self.batch_size = dataset, chunks, batch_size

    def _entries(self, spec):
        if isinstance(spec, str):
            return self.dataset.samples([spec])
        return (self.dataset[i] for i in range(*spec))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for s, spec in self.chunks[info.id :: info.num_workers] if info else self.chunks:
            entries = []
            for entry in self._entries(spec):
                entries.append(entry)
                if len(entries) == self.batch_size:
                    yield s, False, *_collate_flags(entries)
                    entries = []
            yield s, True, *_collate_flags(entries)


def _npy(tensor: torch.Tensor) -> bytes:
    """``numpy.save`` bytes, never pickled: any webdataset reader (and ``numpy.load``) reads them safely."""
    buf = io.BytesIO()
    np.save(buf, tensor.contiguous().numpy(), allow_pickle=False)
    return buf.getvalue()


def _save_safetensors(path: Path, rows: list[dict]) -> None:
    tensors = {
        "latents": torch.stack([r["latents"] for r in rows]).to(torch.float16),
        "original_size": torch.stack([r["original_size"] for r in rows]).long(),
        "crop_top_left": torch.stack([r["crop_top_left"] for r in rows]).long(),
    }
    if "features" in rows[0]:
        tensors["features"] = torch.stack([r["features"] for r in rows]).to(torch.float16)
        tensors["feature_mask"] = torch.stack([r["feature_mask"] for r in rows]).to(torch.uint8)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _save_tar(path: Path, rows: list[dict]) -> None:
    """A webdataset shard: the ``__key__`` is the sample's position (keys like ``sub/a.png`` would be split at
    their dot and slash), the sample's own key is ``key.txt``. ``mtime=0`` makes the bytes reproducible."""
    wds = require("webdataset", "train")  # optional, and slow to import: only this format needs it

    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as tar:
        for j, r in enumerate(rows):
            sample = {
                "__key__": f"{j:06d}",
                "key.txt": r["key"].encode("utf-8"),
                "caption.txt": r["caption"].encode("utf-8"),
                "latents.npy": _npy(r["latents"].to(torch.float16)),
                "original_size.npy": _npy(r["original_size"].long()),
                "crop_top_left.npy": _npy(r["crop_top_left"].long()),
            }
            if "features" in r:
                sample["features.npy"] = _npy(r["features"].to(torch.float16))
                sample["feature_mask.npy"] = _npy(r["feature_mask"].to(torch.uint8))
            tar.write(sample)


def _write_shard(out: Path, s: int, format: str, rows: list[dict], skipped: int, truncated: int) -> None:
    """Chunk ``s``'s data file, then its record: the record, written last, says the shard is complete."""
    name = _shard_name(s)
    data = out / f"{name}{CACHE_SUFFIX[format]}"
    if rows:
        with atomic_path(data) as tmp:
            (_save_safetensors if format == "safetensors" else _save_tar)(tmp, rows)
    else:  # nothing readable in this chunk: a record, no data file, no entry in cache.json
        data.unlink(missing_ok=True)
    record = {
        "keys": [r["key"] for r in rows],
        "captions": [r["caption"] for r in rows],
        "skipped": skipped,
        "truncated": truncated,
        "bytes": data.stat().st_size if rows else 0,
        "latent_shape": list(rows[0]["latents"].shape) if rows else None,
        "hidden_size": rows[0]["features"].shape[-1] if rows and "features" in rows[0] else None,
    }
    with atomic_path(out / f"{name}.json") as tmp:
        tmp.write_text(_dumps(record))


def shard_record(out: Path, s: int, format: str) -> dict | None:
    """Chunk ``s``'s record if the shard is complete (record readable, data file there at its recorded size)."""
    name = _shard_name(s)
    try:
        record = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not record.keys() >= RECORD_FIELDS:
        return None
    if record["keys"]:
        data = out / f"{name}{CACHE_SUFFIX[format]}"
        if not data.is_file() or data.stat().st_size != record["bytes"]:
            return None
    return record


def _clear_leftovers(out: Path, rank: int, world_size: int) -> None:
    """Temporary files a killed job left (``.shard-00003.tar.*.tmp``): each process clears its own chunks'."""
    for tmp in out.glob(".*.tmp"):
        name = tmp.name[1:].split(".")[0]
        if name.startswith("shard-") and name[6:].isdigit():
            mine = int(name[6:]) % world_size == rank
        else:
            mine = rank == 0  # cache.json, cache.partial.json, empty.safetensors
        if mine:
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ the job


def _features(llm, tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Fixed-length features (as the release computes them), the tokenizer's mask, and which captions were cut.

    One tokenization gives all three (ids, mask, untruncated lengths). No per-prompt truncation warning
    (``encode_text``'s would flood a large run): the cut captions are counted instead.
    """
    tokens = tokenize(tokenizer, captions, max_length=max_length)
    states = encode_tokens(llm, tokens).hidden_states
    cut = [n > max_length for n in tokens.lengths]
    return states.to(torch.float16).cpu(), tokens.attention_mask.to(torch.uint8), cut


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
    format: str = "safetensors",
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
) -> dict:
    """Encode ``dataset`` (from :func:`open_dataset`, opened with ``caption_dropout=0``) into ``out_dir``.

    Returns the ``cache.json`` index. Shards already complete are kept (a resumed or repaired job
    recomputes only the others); a finished cache with the same settings comes back as is. With
    ``world_size`` > 1, call this in every process with its ``rank`` and a ``barrier`` that waits for
    all of them (``ella cache`` passes torch.distributed's): this process encodes the chunks
    ``s % world_size == rank`` and rank 0 writes ``cache.json``. The VAE (and LLM) are moved to
    ``device`` only if there is work; a float16 VAE whose config asks for ``force_upcast`` encodes
    in float32, as diffusers' pipelines do.
    """
    aug = getattr(dataset, "aug", None)
    if isinstance(dataset, (CachedDataset, CachedTarShards)) or aug is None:
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
    if format not in CACHE_FORMATS:
        raise EllaError(f"the cache format must be one of {', '.join(CACHE_FORMATS)}, got {format!r}")
    if not 0 <= rank < world_size or (world_size > 1 and barrier is None):
        raise EllaError(
            f"write_cache needs 0 <= rank < world_size (got {rank} of {world_size}) and, with several processes, "
            "a barrier that waits for all of them"
        )
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    if iterable and getattr(dataset, "world_size", 1) != 1:
        raise EllaError("write_cache splits tar shards itself: open the dataset with world_size=1")
    barrier = barrier or (lambda: None)
    out = writable_dir(out_dir, "the cache directory")
    vae_info = {
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
        "latent_channels": int(vae.config.latent_channels),
    }
    settings = cache_settings(
        dataset,
        format=format,
        shard_size=shard_size,
        batch_size=batch_size,
        source=source,
        base=base,
        vae_info=vae_info,
        llm_name=llm_name if llm is not None else None,
        max_length=max_length,
    )
    state = check_existing(out, settings)  # every process, before anyone writes
    barrier()

    if rank == 0 and state == "fresh":
        with atomic_path(out / "cache.partial.json") as tmp:
            tmp.write_text(_dumps({"settings": settings}))
    _clear_leftovers(out, rank, world_size)
    chunks = source_chunks(dataset, shard_size)
    pending = [(s, spec) for s, spec in enumerate(chunks) if s % world_size == rank]
    pending = [(s, spec) for s, spec in pending if shard_record(out, s, format) is None]
    need_empty = rank == 0 and llm is not None and not (out / "empty.safetensors").is_file()
    if pending or need_empty:
        vae_dtype = torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype
        vae.to(device)
        if vae.dtype != vae_dtype:
            vae.to(dtype=vae_dtype)
        if llm is not None:
            llm.to(device)
    if need_empty:
        empty, empty_mask, _ = _features(llm, tokenizer, [""], max_length)
        with atomic_path(out / "empty.safetensors") as tmp:
            save_file({"features": empty[0].contiguous(), "feature_mask": empty_mask[0].contiguous()}, str(tmp))
    if pending:
        _encode(dataset, out, pending, vae, llm, tokenizer, max_length, batch_size, num_workers, format, progress, rank)
    barrier()  # every shard is on disk

    if rank == 0:
        index = _index(out, settings, len(chunks), source)
        text = _dumps(index, indent=1)
        if not (out / "cache.json").is_file() or (out / "cache.json").read_text() != text:
            with atomic_path(out / "cache.json") as tmp:
                tmp.write_text(text)
        (out / "cache.partial.json").unlink(missing_ok=True)
    barrier()  # cache.json is on disk
    return read_cache_index(out)


def _encode(dataset, out, pending, vae, llm, tokenizer, max_length, batch_size, num_workers, format, progress, rank):
    """Encode ``pending`` chunks, writing each shard as soon as its last batch is done."""
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(
        _ChunkReader(dataset, pending, batch_size), batch_size=None, num_workers=num_workers, collate_fn=_as_is
    )
    sizes = [spec[1] - spec[0] for _, spec in pending if not isinstance(spec, str)]
    bar = tqdm(
        total=sum(sizes) if len(sizes) == len(pending) else None,
        desc="cache",
        unit="img",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    rows: dict[int, list[dict]] = {}
    counts: dict[int, list[int]] = {}  # chunk -> [skipped, truncated]
    with torch.inference_mode(), bar:
        for s, last, batch, readable in loader:
            bar.update(len(readable))
            chunk_rows, chunk_counts = rows.setdefault(s, []), counts.setdefault(s, [0, 0])
            chunk_counts[0] += len(readable) - sum(readable)
            if batch["captions"]:
                latents = encode_latents(vae, batch["pixel_values"]).to(torch.float16).cpu()
                if llm is not None:
                    features, masks, cut = _features(llm, tokenizer, batch["captions"], max_length)
                    chunk_counts[1] += sum(cut)
                for j, key in enumerate(batch["keys"]):
                    row = {
                        "key": key,
                        "caption": batch["captions"][j],
                        "latents": latents[j],
                        "original_size": batch["original_size"][j],
                        "crop_top_left": batch["crop_top_left"][j],
                    }
                    if llm is not None:
                        row.update(features=features[j], feature_mask=masks[j])
                    chunk_rows.append(row)
            if last:
                _write_shard(out, s, format, rows.pop(s), *counts.pop(s))


def _index(out: Path, settings: dict, num_chunks: int, source: str) -> dict:
    """``cache.json`` from the shard records, once every process has written its shards.

    Records are read one at a time and only their counts kept: a large cache's keys and captions
    (gigabytes at tens of millions of samples) never sit in memory together.
    """
    fmt = settings["format"]
    shards, missing, skipped, truncated, first = [], [], 0, 0, None
    for s in range(num_chunks):
        record = shard_record(out, s, fmt)
        if record is None:
            missing.append(s)
            continue
        skipped, truncated = skipped + record["skipped"], truncated + record["truncated"]
        if record["keys"]:
            shards.append({"name": _shard_name(s), "count": len(record["keys"]), "bytes": record["bytes"]})
            first = first or {k: record[k] for k in ("latent_shape", "hidden_size")}
    if missing:
        raise EllaError(
            f"{len(missing)} shards of {out} were not written (first: {_shard_name(missing[0])}); "
            "re-run the same `ella cache` command to finish them"
        )
    if not shards:
        raise EllaError(
            f"no readable samples in {source or 'the dataset'}: all {skipped} were unreadable or had no caption"
        )
    llm = settings["llm"]
    return {
        "version": CACHE_VERSION,
        "format": fmt,
        "count": sum(s["count"] for s in shards),
        "skipped": skipped,
        "shards": shards,
        "resolution": settings["resolution"],
        "center_crop": settings["center_crop"],
        "random_flip": settings["random_flip"],
        "latent_shape": first["latent_shape"],
        "vae": settings["vae"],
        "base": settings["base"],
        "source": settings["source"],
        "llm": {
            "name": llm["name"],
            "hidden_size": first["hidden_size"],
            "max_length": llm["max_length"],
            "truncated_captions": truncated,
        }
        if llm is not None
        else None,
        "seed": settings["seed"],
        "settings": settings,
    }


# ------------------------------------------------------------------------------------ the command


@dataclass
class ProcessGroup:
    """This process's place in a ``torchrun`` / ``accelerate launch`` job (world 1 when launched plainly).

    The processes only ever wait for each other, never exchange tensors, so gloo serves on GPUs too.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # this process started the group, so it ends it

    @classmethod
    def join(cls) -> ProcessGroup:
        """Join the launcher's group (``WORLD_SIZE`` > 1 in the environment), else a group of one."""
        if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
            return cls()
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0), owned)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owned:
            torch.distributed.destroy_process_group()
            self.owned = False


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
    if getattr(args, "format", "safetensors") not in CACHE_FORMATS:
        raise EllaError(f"--format must be one of {', '.join(CACHE_FORMATS)}, got {args.format!r}")
    if bool(args.train_data_dir) == bool(args.dataset_name):
        raise EllaError("give exactly one of --train_data_dir or --dataset_name")
    return writable_dir(args.output, "--output")


def cache_command(args) -> str:
    """``ella cache``: open the source raw (no caption dropout), check the output, load the VAE (and LLM), write.

    Returns the summary line on rank 0 and "" on the other processes of a multi-process job.
    """
    require_train_extra()
    out = check_cache_args(args)
    source = args.train_data_dir or args.dataset_name
    fmt = getattr(args, "format", "safetensors")
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
    if isinstance(dataset, (CachedDataset, CachedTarShards)):
        raise EllaError(f"{source} is already an `ella cache` directory; point --train_data_dir at the images")
    base = args.pretrained_model_name_or_path
    local = Path(source).expanduser()
    source_name = str(local.resolve()) if local.exists() else str(source)
    llm_name = str(args.llm_name_or_path) if args.features else None
    known = dict(shard_size=args.shard_size, batch_size=args.batch_size, source=source_name, base=str(base))
    settings = cache_settings(
        dataset, format=fmt, **known, vae_info=None, llm_name=llm_name, max_length=args.llm_max_length
    )
    state = check_existing(out, settings, ignore=("vae",))  # other settings: refused before any model loads
    needed = [("base model", str(base), "vae/config.json")]
    if args.features:
        needed.append(("LLM", str(args.llm_name_or_path), "config.json"))
    check_offline(needed)
    chunks = source_chunks(dataset, args.shard_size)
    if state == "finished" and all(shard_record(out, s, fmt) is not None for s in range(len(chunks))):
        index = read_cache_index(out)  # finished and whole: nothing to load, nothing to write
        rank = int(os.environ.get("RANK", "0") or 0)
    else:
        index, rank = _run_job(args, dataset, out, fmt, llm_name, known)
    if rank != 0:
        return ""
    cut = (index["llm"] or {}).get("truncated_captions", 0)
    return (
        f"{args.output}: {index['count']} samples in {len(index['shards'])} shards ({fmt})"
        + (f", {index['skipped']} unreadable samples skipped" if index["skipped"] else "")
        + (f", {cut} captions truncated to {args.llm_max_length} tokens" if cut else "")
    )


def _run_job(args, dataset, out: Path, fmt: str, llm_name: str | None, known: dict) -> tuple[dict, int]:
    """Join the launcher's processes, load the VAE (and LLM) in each, write; returns (the index, this rank)."""
    base = args.pretrained_model_name_or_path
    group = ProcessGroup.join()
    try:
        device = args.device or default_device()
        if group.world_size > 1 and torch.device(device).type == "cuda" and torch.device(device).index is None:
            device = f"cuda:{group.local_rank}"  # one GPU per process
        dtype = resolve_dtype(args.dtype, device)
        with loading("base model", str(base)):
            if str(base).endswith(SINGLE_FILE_SUFFIXES):
                vae = AutoencoderKL.from_single_file(str(base))
            else:
                vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        llm = tokenizer = None
        if args.features:
            llm, tokenizer = load_llm(args.llm_name_or_path, dtype=dtype, device=device)
        index = write_cache(
            dataset,
            out,
            vae,
            llm=llm,
            tokenizer=tokenizer,
            max_length=args.llm_max_length,
            device=device,
            dtype=dtype,
            num_workers=args.dataloader_num_workers,
            llm_name=llm_name or "",
            format=fmt,
            rank=group.rank,
            world_size=group.world_size,
            barrier=group.barrier,
            **known,
        )
    finally:
        group.close()
    return index, group.rank
