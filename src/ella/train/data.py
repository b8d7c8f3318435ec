"""Training data: image folders, webdataset tar shards, Hugging Face datasets and `ella cache` directories.

Every source yields the same sample dicts, so the trainer never knows where its data came from. The
cache's *formats* (their layouts and readers: :class:`CachedDataset` for safetensors, random access;
:class:`CachedTarShards` for webdataset tars, streamed) live here with the other kinds; ``cache.py``
writes them. Two rules hold everywhere:

* **one bad sample never stops a run** — an undecodable image or a missing caption becomes ``None``,
  which :func:`collate` drops and counts; an empty or misnamed source fails in :func:`open_dataset`,
  before any model loads, and a source where nothing is readable stops the trainer with an error
  (``TrainConfig.max_consecutive_skipped``) instead of spinning at step 0;
* **every random decision is a function of (seed, epoch, sample key)** — crops, flips, caption
  dropout and the choice among several captions come from :func:`sample_rng`, never from a global
  RNG, so they don't depend on worker count, batch order or where a run resumed.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import EllaError, require

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_KEYS = ("caption", "text", "prompt", "txt")  # json caption field lookup order
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets' save_to_disk writes
HF_DATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # an `imagefolder` with captions beside
EXPECTED = (
    "expected images (.jpg/.jpeg/.png/.webp) with same-name .txt captions, webdataset *.tar shards, "
    "a datasets save_to_disk directory, an `ella cache` output directory or a Hub dataset id"
)

logger = logging.getLogger(__name__)


@dataclass
class Augment:
    """How a raw image becomes a training sample; ``seed`` fixes every random choice (see :func:`sample_rng`)."""

    resolution: int = 512  # square output side
    center_crop: bool = False  # False = random crop (diffusers' train_text_to_image default)
    random_flip: bool = False
    caption_dropout: float = 0.1  # probability a caption becomes "" (classifier-free guidance)
    seed: int = 0

    def __post_init__(self):
        if self.resolution < 1:
            raise EllaError(f"resolution must be a positive number of pixels, got {self.resolution}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise EllaError(f"caption_dropout is a probability in [0, 1], got {self.caption_dropout}")


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The RNG of one sample in one epoch, from sha256 of (seed, epoch, key).

    Nothing else feeds it, so a sample's crop, flip and dropout are the same whichever worker loads
    it, in whatever order, before or after a resume — that is what makes resumed training bit-identical.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def load_image(source) -> Image.Image:
    """A decoded RGB image from a path, bytes, a PIL image or a datasets ``{"bytes", "path"}`` dict.

    Decoding is forced here (PIL is lazy), so a truncated file fails now, where the caller turns it
    into a skipped sample. Transparent images are put on white: black is what ``convert("RGB")``
    would leave under a logo's transparent pixels.
    """
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    image = source if isinstance(source, Image.Image) else Image.open(source)
    image.load()
    image = ImageOps.exif_transpose(image)  # phone photos store "rotate me" in EXIF, not in the pixels
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def prepare_image(
    image: Image.Image, aug: Augment, rng: random.Random
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``aug.resolution``, crop a square, maybe flip; scale to [-1, 1].

    Returns ``(pixel_values [3, R, R] float32, original_size (h, w), crop_top_left (top, left))``:
    the last two are SDXL's micro-conditioning. A flipped crop records its left edge in the flipped
    image (``resized_width - left - R``), as diffusers' SDXL training script does.
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    r = aug.resolution
    width, height = image.size
    scale = r / min(width, height)
    new_w, new_h = max(r, round(width * scale)), max(r, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if aug.center_crop:
        top, left = round((new_h - r) / 2), round((new_w - r) / 2)
    else:
        top, left = rng.randint(0, new_h - r), rng.randint(0, new_w - r)
    image = image.crop((left, top, left + r, top + r))
    if aug.random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - left - r
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    return pixels.contiguous(), (height, width), (top, left)


def make_sample(key: str, image_source, captions, aug: Augment, epoch: int) -> dict | None:
    """One raw sample, or None if its image can't be decoded or it has no caption.

    The RNG is drawn in a fixed order (caption choice, dropout, crop, flip) whatever the settings,
    so turning caption dropout on or off doesn't move anyone's crop.
    """
    rng = sample_rng(aug.seed, epoch, key)
    pick, dropped = rng.random(), rng.random() < aug.caption_dropout
    if isinstance(captions, (list, tuple)):
        captions = captions[int(pick * len(captions))] if captions else None
    if not isinstance(captions, str):
        logger.debug("skipping %s: no caption", key)
        return None
    try:
        image = load_image(image_source)
    except Exception as err:
        logger.debug("skipping %s: %s: %s", key, type(err).__name__, err)
        return None
    pixels, original, crop = prepare_image(image, aug, rng)
    return {
        "key": key,
        "pixel_values": pixels,
        "caption": "" if dropped else captions.strip(),
        "original_size": torch.tensor(original),
        "crop_top_left": torch.tensor(crop),
    }


class _Epoch:
    """``set_epoch`` for every dataset: the trainer calls it at each epoch start."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class FolderDataset(_Epoch, torch.utils.data.Dataset):
    """Images found recursively under ``root``, each captioned by the ``.txt`` file with the same stem."""

    def __init__(self, root: str | os.PathLike, aug: Augment):
        self.root, self.aug = Path(root), aug
        files = [p for p in self.root.rglob("*") if p.is_file()]
        self.images = sorted(p.relative_to(self.root).as_posix() for p in files if p.suffix.lower() in IMAGE_EXTS)
        if not self.images:
            raise EllaError(f"no training samples in {root}: {EXPECTED}")
        texts = {p.relative_to(self.root).with_suffix("").as_posix() for p in files if p.suffix == ".txt"}
        if not any(Path(name).with_suffix("").as_posix() in texts for name in self.images):
            raise EllaError(
                f"no training samples in {root}: {len(self.images)} images but none has a caption file "
                f"(expected IMAGE.txt beside each IMAGE.jpg/.png)"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict | None:
        name = self.images[index]
        try:
            caption = (self.root / name).with_suffix(".txt").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            caption = None
        return make_sample(name, self.root / name, caption, self.aug, self.epoch)


class HFImageDataset(_Epoch, torch.utils.data.Dataset):
    """A ``datasets.Dataset`` with an image column and a caption column (a string or a list of strings)."""

    def __init__(
        self,
        dataset,
        aug: Augment,
        *,
        image_column: str = "image",
        caption_column: str = "text",
        name: str = "the dataset",
    ):
        datasets = require("datasets", "train")  # optional, and slow to import: only HF sources need it

        for what, column in (("image", image_column), ("caption", caption_column)):
            if column not in dataset.column_names:
                raise EllaError(
                    f"{name} has no {what} column {column!r}; its columns are "
                    f"{', '.join(dataset.column_names)} (pick one with --{what}_column)"
                )
        if len(dataset) == 0:
            raise EllaError(f"no training samples in {name}: the split is empty")
        if isinstance(dataset.features[image_column], datasets.Image):  # decode ourselves: a bad image -> None
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.aug = dataset, aug
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        row = self.dataset[int(index)]
        return make_sample(str(index), row[self.image_column], row[self.caption_column], self.aug, self.epoch)


class TarShards(_Epoch, torch.utils.data.IterableDataset):
    """webdataset / img2dataset tar shards (``KEY.jpg`` + ``KEY.txt`` or ``KEY.json``), streamed.

    Each epoch shuffles the shard order with an RNG seeded by (seed, epoch) — the same on every
    rank — then gives rank ``r`` the shards ``i % world_size == r`` and splits those among the
    DataLoader's workers, so no two readers ever see the same shard. Within the stream, samples pass
    through webdataset's shuffle buffer, seeded by (seed, epoch, rank, worker): without it a shard's
    samples would meet the same neighbours in the same batches every epoch. Seeded, so a resumed run
    (which re-reads the epoch up to where it stopped) sees the same order.
    """

    #: Samples the shuffle buffer holds (it starts yielding once it holds ``SHUFFLE_INITIAL``). A cached
    #: sample with T5-XL features is ~0.5 MB, so this is ~32 MB per loader worker.
    SHUFFLE_BUFFER = 64
    SHUFFLE_INITIAL = 16

    def __init__(self, shards: list[str], aug: Augment, *, rank: int = 0, world_size: int = 1):
        if len(shards) < world_size:
            raise EllaError(
                f"{len(shards)} tar shards cannot feed {world_size} processes (each needs at least one); "
                "split the data into more shards or train on fewer processes"
            )
        self.shards, self.aug, self.rank, self.world_size = list(shards), aug, rank, world_size

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """This epoch's shards for this rank and DataLoader worker, in reading order."""
        order = list(self.shards)
        random.Random(f"shards:{self.aug.seed}:{self.epoch}").shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self):
        wds = require("webdataset", "train")
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        seed = f"samples:{self.aug.seed}:{self.epoch}:{self.rank}:{worker}"
        shuffle = wds.filters.shuffle(self.SHUFFLE_BUFFER, self.SHUFFLE_INITIAL, seed=seed)
        yield from shuffle(self.samples(self.shards_for(worker, workers)))

    def samples(self, shards: list[str]):
        """The samples (None where unreadable) of ``shards``, in order: ``ella cache`` reads one shard at a time."""
        wds = require("webdataset", "train")  # optional, and slow to import: only tar sources need it

        for raw in wds.tariterators.tarfile_samples([{"url": url} for url in shards], handler=_warn_and_continue):
            key = f"{Path(raw['__url__']).stem}/{raw['__key__']}"
            image = next((raw[ext[1:]] for ext in IMAGE_EXTS if ext[1:] in raw), None)
            if image is None:
                logger.debug("skipping %s: no image member", key)
                yield None
                continue
            yield make_sample(key, image, _tar_caption(raw), self.aug, self.epoch)


def _warn_and_continue(err: Exception) -> bool:
    """A shard that can't be opened or read to the end: say so, keep going with the next one."""
    logger.warning("tar shard read error (rest of that shard skipped): %s", err)
    return True


def _tar_caption(raw: dict):
    if "txt" in raw:
        try:
            return raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except ValueError:
        return None
    return next((meta[k] for k in CAPTION_KEYS if isinstance(meta, dict) and meta.get(k) is not None), None)


def _tar_shards(source: str) -> list[str]:
    """Brace patterns and ``::`` lists expanded as webdataset does; local shards must exist."""
    shardlists = require("webdataset.shardlists", "train")  # optional, slow to import: only tar sources need it
    shards = shardlists.expand_urls(source)
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not Path(s).is_file()]
    if missing:
        raise EllaError(
            f"no training samples in {source}: {len(missing)} of its {len(shards)} tar shards do not "
            f"exist (first: {missing[0]})"
        )
    return shards


def _has_parquet(path: Path) -> bool:
    """A Hub dataset repo downloaded with ``hf download --local-dir``: parquet files at the top or one level down."""
    return any(path.glob("*.parquet")) or any(path.glob("*/*.parquet"))


def _hf_dataset(source: str, split: str, *, local: bool):
    """``load_from_disk`` for a save_to_disk directory, else ``load_dataset`` (local data files or the Hub)."""
    datasets = require("datasets", "train")  # optional, and slow to import: only HF sources need it

    path = Path(source).expanduser()
    try:
        if local and any((path / marker).is_file() for marker in HF_MARKERS):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise EllaError(f"{source} has no split {split!r}; its splits are {', '.join(data)}")
                data = data[split]
            return data
        return datasets.load_dataset(str(path) if local else source, split=split)
    except EllaError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        hint = (
            ""
            if local
            else (
                f" If {source!r} is a Hub dataset, on a machine with internet run `hf download {source} --repo-type "
                f"dataset` (or pass the --local-dir it wrote)"
            )
        )
        raise EllaError(
            f"could not load dataset {source!r} (split {split!r}): {type(err).__name__}: {first}.{hint}"
        ) from err


# ------------------------------------------------------------------------------ `ella cache` directories

#: The cache layout ``ella cache`` writes; bumped when the layout changes. Version 2 added the webdataset
#: format, per-shard ``skipped``/``bytes`` records and shards cut from fixed slices of the source.
CACHE_VERSION = 2
#: Every layout this version reads: a version 1 cache (safetensors, one process) reads as version 2's safetensors.
CACHE_VERSIONS_READ = (1, 2)
#: ``safetensors``: random access (exact per-epoch shuffle); ``webdataset``: tar shards read as a stream.
CACHE_FORMATS = ("safetensors", "webdataset")
CACHE_SUFFIX = {"safetensors": ".safetensors", "webdataset": ".tar"}


def read_cache_index(path: str | os.PathLike) -> dict:
    """``cache.json`` of the cache directory ``path``, checked to be one this version can read."""
    file = Path(path) / "cache.json"
    try:
        index = json.loads(file.read_text())
    except FileNotFoundError:
        raise EllaError(
            f"{path} has no cache.json: not a finished `ella cache` directory (re-run `ella cache` "
            "with the same arguments to finish it)"
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise EllaError(f"{file} is not valid JSON ({err}); re-run `ella cache` into a new directory") from None
    if not isinstance(index, dict) or index.get("version") not in CACHE_VERSIONS_READ:
        raise EllaError(
            f"{file} has cache format version {index.get('version') if isinstance(index, dict) else '?'}"
            f", this ella reads versions {', '.join(map(str, CACHE_VERSIONS_READ))}; re-run `ella cache` "
            "into a new directory"
        )
    if cache_format(index) not in CACHE_FORMATS:
        raise EllaError(
            f"{file} has cache format {cache_format(index)!r}, this ella reads {' and '.join(CACHE_FORMATS)}; "
            "re-run `ella cache` into a new directory"
        )
    return index


def cache_format(index: dict) -> str:
    """``safetensors`` or ``webdataset``; a version 1 index names none (it could only be safetensors)."""
    return index.get("format", "safetensors")


def _check_cache_files(root: Path, index: dict) -> dict[str, torch.Tensor] | None:
    """Every shard ``cache.json`` lists is there at its recorded size, found before any model loads.

    Returns the empty prompt's features (caption dropout) when the cache holds LLM features, else None.
    """
    suffix = CACHE_SUFFIX[cache_format(index)]
    shards = index["shards"]
    if sum(s["count"] for s in shards) == 0:
        raise EllaError(f"no training samples in {root}: the cache is empty")
    names = [f"{s['name']}{suffix}" for s in shards]
    if cache_format(index) == "safetensors":
        names += [f"{s['name']}.json" for s in shards]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise EllaError(
            f"{root} is missing {missing[0]}"
            + (f" and {len(missing) - 1} more files" if len(missing) > 1 else "")
            + "; re-run the same `ella cache` command to rewrite what is missing, or cache into a new directory"
        )
    for shard in shards:
        file = root / f"{shard['name']}{suffix}"
        if "bytes" in shard and file.stat().st_size != shard["bytes"]:
            raise EllaError(
                f"{file} is {file.stat().st_size} bytes, cache.json says {shard['bytes']}: it is truncated or "
                "damaged; delete it and re-run the same `ella cache` command to rewrite it"
            )
    if not index.get("llm"):
        return None
    if not (root / "empty.safetensors").is_file():
        raise EllaError(
            f"{root} is missing empty.safetensors (the empty prompt's features); re-run the same `ella cache` command"
        )
    return load_file(root / "empty.safetensors")


def _cached_sample(aug: Augment, epoch: int, key: str, caption: str, get, empty: dict | None) -> dict:
    """One training sample of a cache, whatever its format; ``get(name)`` reads that tensor of the sample.

    Caption dropout draws like the raw datasets do (the caption-choice draw, then dropout), so a sample
    dropped in uncached training, in a safetensors cache or in a webdataset cache is dropped in all three.
    """
    rng = sample_rng(aug.seed, epoch, key)
    rng.random()  # the raw datasets' caption-choice draw: dropout decisions match uncached training
    dropped = rng.random() < aug.caption_dropout
    sample = {"key": key, "caption": "" if dropped else caption, "latents": get("latents").float()}
    for name in ("original_size", "crop_top_left"):
        sample[name] = get(name).long()
    if empty is not None:
        if dropped:
            sample["features"], mask = empty["features"].float(), empty["feature_mask"]
        else:
            sample["features"], mask = get("features").float(), get("feature_mask")
        sample["feature_mask"] = mask.long()
    return sample


class CachedDataset(_Epoch, torch.utils.data.Dataset):
    """Samples from a safetensors `ella cache` directory, read lazily: one ``safe_open`` per shard and worker.

    Layout of a cache directory::

        shard-00000.safetensors  latents [n, C, h, w] fp16, original_size / crop_top_left [n, 2] int64,
                                 and with an LLM: features [n, max_length, D] fp16, feature_mask [n, max_length] uint8
        shard-00000.json         {"keys": [...], "captions": [...]} (+ what the writer needs to resume)
        empty.safetensors        features + feature_mask of the empty prompt (caption dropout), with an LLM only
        cache.json               the index, written last: its presence means the cache is complete

    Latents are stored already shifted and scaled (``(z - shift_factor) * scaling_factor``): exactly
    what the UNet trains on. Crops and flips were drawn once, when caching, so every epoch sees the
    same crop; caption dropout still varies per (seed, epoch, key), with the same draws as raw data.
    """

    def __init__(self, root: str | os.PathLike, aug: Augment):
        self.root, self.aug = Path(root), aug
        self.index = read_cache_index(root)
        if cache_format(self.index) != "safetensors":
            raise EllaError(f"{root} is a {cache_format(self.index)} cache: open it with open_dataset")
        shards = self.index["shards"]
        self.starts = list(itertools.accumulate((s["count"] for s in shards), initial=0))
        self.empty = _check_cache_files(self.root, self.index)
        self._files, self._meta, self._pid = {}, {}, None

    def __getstate__(self) -> dict:  # open files don't cross into worker processes; each opens its own
        return {**self.__dict__, "_files": {}, "_pid": None}

    def __len__(self) -> int:
        return self.starts[-1]

    def _shard(self, s: int):
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if s not in self._files:
            name = self.index["shards"][s]["name"]
            self._files[s] = safe_open(str(self.root / f"{name}.safetensors"), framework="pt")
            if s not in self._meta:
                self._meta[s] = json.loads((self.root / f"{name}.json").read_text())
        return self._files[s], self._meta[s]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a cache with {len(self)}")
        s = bisect.bisect_right(self.starts, index) - 1
        j = index - self.starts[s]
        file, meta = self._shard(s)
        return _cached_sample(
            self.aug, self.epoch, meta["keys"][j], meta["captions"][j], lambda name: file.get_slice(name)[j], self.empty
        )


class CachedTarShards(TarShards):
    """Samples from a webdataset `ella cache` directory, streamed shard by shard (an IterableDataset).

    Layout of a cache directory::

        shard-00000.tar     one sample per ``__key__`` (its position in the shard): latents.npy fp16 [C, h, w],
                            original_size.npy / crop_top_left.npy int64 [2], key.txt, caption.txt, and with an
                            LLM features.npy fp16 [max_length, D] and feature_mask.npy uint8 [max_length];
                            arrays written by ``numpy.save(allow_pickle=False)``, so any webdataset reader reads them
        shard-00000.json    the writer's record of the shard (keys, captions, skipped samples, size); not read here
        empty.safetensors   features + feature_mask of the empty prompt (caption dropout), with an LLM only
        cache.json          the index (``"format": "webdataset"``), written last

    Shards are split over ranks and DataLoader workers, in an order shuffled per epoch, exactly as
    :class:`TarShards` splits raw tar shards; samples keep their order within a shard. The samples are
    :class:`CachedDataset`'s, key for key, with the same caption dropout.
    """

    def __init__(self, root: str | os.PathLike, aug: Augment, *, rank: int = 0, world_size: int = 1):
        self.root = Path(root)
        self.index = read_cache_index(root)
        if cache_format(self.index) != "webdataset":
            raise EllaError(f"{root} is a {cache_format(self.index)} cache: open it with open_dataset")
        self.empty = _check_cache_files(self.root, self.index)
        shards = self.index["shards"]
        if len(shards) < world_size:
            raise EllaError(
                f"{root} has {len(shards)} shards, too few for {world_size} processes (each reads whole shards); "
                "re-run `ella cache` with a smaller --shard_size into a new directory, or train on fewer processes"
            )
        self.counts = {str(self.root / f"{s['name']}.tar"): s["count"] for s in shards}
        super().__init__(list(self.counts), aug, rank=rank, world_size=world_size)

    def samples(self, shards: list[str]):
        """The samples of ``shards``, in order; a shard that doesn't read to its recorded count is an error."""
        wds = require("webdataset", "train")  # optional, and slow to import: only tar sources need it

        for url in shards:
            seen = 0
            try:
                for raw in wds.tariterators.tarfile_samples([{"url": url}]):
                    arrays = {}

                    def get(name: str, raw=raw, arrays=arrays) -> torch.Tensor:
                        if name not in arrays:
                            arrays[name] = torch.tensor(np.load(io.BytesIO(raw[f"{name}.npy"]), allow_pickle=False))
                        return arrays[name]

                    key, caption = raw["key.txt"].decode("utf-8"), raw["caption.txt"].decode("utf-8")
                    sample = _cached_sample(self.aug, self.epoch, key, caption, get, self.empty)
                    seen += 1
                    yield sample
            except (OSError, ValueError, KeyError, EOFError, tarfile.TarError) as err:
                what = str(err.args[0] if err.args else err).split(" @ ")[0]  # webdataset appends the stream
                raise EllaError(
                    f"{url} is damaged ({type(err).__name__}: {what}); delete it and re-run the same "
                    "`ella cache` command to rewrite it"
                ) from None
            if seen != self.counts[url]:
                raise EllaError(
                    f"{url} holds {seen} samples but cache.json says {self.counts[url]}: it is truncated or "
                    "damaged; delete it and re-run the same `ella cache` command to rewrite it"
                )


def open_cache(
    root: str | os.PathLike, aug: Augment, *, rank: int = 0, world_size: int = 1
) -> CachedDataset | CachedTarShards:
    """The reader of the cache directory ``root``, by the format its ``cache.json`` names."""
    if cache_format(read_cache_index(root)) == "webdataset":
        return CachedTarShards(root, aug, rank=rank, world_size=world_size)
    return CachedDataset(root, aug)


# ------------------------------------------------------------------------------------- any source


def open_dataset(
    source: str,
    aug: Augment,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.Dataset | torch.utils.data.IterableDataset:
    """The dataset behind ``source``, recognised by what it contains (see the module docstring for the kinds).

    An empty source, missing shards or a misnamed column raise :class:`EllaError` here, before any
    model loads. ``rank``/``world_size`` matter only for tar shards (raw or a webdataset cache);
    map-style datasets are split by the trainer's sampler.
    """
    if not source:
        raise EllaError(f"no training data given: {EXPECTED}")
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir() and (path / "cache.json").is_file():
        return open_cache(path, aug, rank=rank, world_size=world_size)
    if source.endswith(".tar"):
        return TarShards(_tar_shards(source), aug, rank=rank, world_size=world_size)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar") if p.is_file())
        if shards:
            return TarShards(shards, aug, rank=rank, world_size=world_size)
        if any((path / marker).is_file() for marker in HF_MARKERS + HF_DATA_FILES) or _has_parquet(path):
            data = _hf_dataset(source, split, local=True)
            return HFImageDataset(data, aug, image_column=image_column, caption_column=caption_column, name=source)
        return FolderDataset(path, aug)
    if path.exists():
        raise EllaError(f"{source} is a file, not training data: {EXPECTED}")
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise EllaError(f"{source} does not exist: {EXPECTED}")
    data = _hf_dataset(source, split, local=False)
    return HFImageDataset(data, aug, image_column=image_column, caption_column=caption_column, name=source)


def collate(samples: list[dict | None]) -> dict:
    """Stack the readable samples; ``skipped`` counts the rest (a batch may end up empty: the loop skips it)."""
    good = [s for s in samples if s is not None]
    batch = {
        "skipped": len(samples) - len(good),
        "keys": [s["key"] for s in good],
        "captions": [s["caption"] for s in good],
    }
    for name in ("pixel_values", "latents", "features", "feature_mask", "original_size", "crop_top_left"):
        if good and name in good[0]:
            batch[name] = torch.stack([s[name] for s in good])
    return batch
