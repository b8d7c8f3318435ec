"""Training data sources and the latent/feature cache: counts, determinism, bad samples, sharding, resume."""

from __future__ import annotations

import io
import json
import random
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ella.errors import EllaError
from ella.train.cache import write_cache
from ella.train.data import (
    Augment,
    CachedDataset,
    FolderDataset,
    HFImageDataset,
    TarShards,
    collate,
    open_dataset,
    prepare_image,
    read_cache_index,
    sample_rng,
)

CAPTIONS = [
    "a red cat",
    "a blue dog",
    "a green bird",
    "a small house",
    "a tall tree",
    "a very old wooden house near a quiet lake at sunset",
]  # the last is over 8 tokens
R = 16  # training resolution in these tests; images are 20x28 (w x h), so random crops move vertically
RAW = Augment(resolution=R, caption_dropout=0.0)


def noise_image(seed: int, size=(20, 28)) -> Image.Image:
    """Random pixels: two different crops of it are never equal (a solid colour would hide crop bugs)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def keys_of(dataset) -> list[str]:
    samples = [dataset[i] for i in range(len(dataset))] if hasattr(dataset, "__len__") else list(dataset)
    return [s["key"] for s in samples if s is not None]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """6 good images (PNG and JPEG, one in a subfolder) + a garbage .jpg, a truncated .png and one without caption."""
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    for i in range(6):
        name = f"sub/img{i}.png" if i == 5 else f"img{i}.{'jpg' if i % 2 else 'png'}"
        (root / name).write_bytes(encoded(noise_image(i), "JPEG" if i % 2 else "PNG"))
        (root / name).with_suffix(".txt").write_text(f"  {CAPTIONS[i]}\n")
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "bad.txt").write_text("garbage image")
    (root / "trunc.png").write_bytes(encoded(noise_image(9), "PNG")[:200])
    (root / "trunc.txt").write_text("truncated image")
    (root / "nocap.png").write_bytes(encoded(noise_image(10), "PNG"))
    return root


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 img2dataset-style shards of 3 good samples each (txt or json captions); shard 3 adds 3 bad ones."""
    root = tmp_path_factory.mktemp("shards")
    for s in range(4):
        members = []
        for i in range(3):
            key, image = f"{s}{i:04d}", encoded(noise_image(100 + 10 * s + i), "JPEG")
            caption = (
                (f"{key}.json", json.dumps({"caption": f"tar {s} {i}", "url": "x"}).encode())
                if i == 2
                else (f"{key}.txt", f"tar {s} {i}".encode())
            )
            members += [(f"{key}.jpg", image), caption]
        if s == 3:
            members += [
                ("3bad1.jpg", b"not a jpeg at all"),
                ("3bad1.txt", b"corrupt"),  # undecodable image
                ("3bad2.txt", b"no image"),  # a caption without image
                ("3bad3.jpg", encoded(noise_image(7), "JPEG")),
                ("3bad3.json", b'{"url": "x"}'),
            ]  # no caption
        write_tar(root / f"{s:05d}.tar", members)
    return root


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    import datasets

    path = tmp_path_factory.mktemp("hf") / "saved"
    images = [noise_image(200 + i) for i in range(5)]
    texts = [f"hf {i}" for i in range(5)]
    alternatives = [[f"hf {i}"] for i in range(4)] + [["hf 4 a", "hf 4 b"]]  # a caption column of lists
    data = datasets.Dataset.from_dict({"image": images, "text": texts, "alts": alternatives})
    data.save_to_disk(str(path))
    return path


# ----------------------------------------------------------------------------------------- sources


def test_folder_yields_sorted_samples_with_sidecar_captions(folder):
    data = open_dataset(str(folder), RAW)
    assert isinstance(data, FolderDataset) and len(data) == 9
    samples = [data[i] for i in range(len(data))]
    good = {s["key"]: s for s in samples if s is not None}
    assert list(good) == ["img0.png", "img1.jpg", "img2.png", "img3.jpg", "img4.png", "sub/img5.png"]
    assert good["img3.jpg"]["caption"] == "a small house"  # stripped
    for s in good.values():
        assert s["pixel_values"].shape == (3, R, R) and s["pixel_values"].dtype == torch.float32
        assert -1.0 <= s["pixel_values"].min() < 0 < s["pixel_values"].max() <= 1.0
        assert s["original_size"].tolist() == [28, 20] and s["original_size"].dtype == torch.long
        top, left = s["crop_top_left"].tolist()
        assert 0 <= top <= 22 - R and left == 0  # 20x28 -> 16x22: only vertical room


def test_pixels_are_scaled_to_minus_one_one():
    pixels, original, crop = prepare_image(Image.new("RGB", (20, 20), (255, 0, 128)), RAW, random.Random(0))
    assert original == (20, 20) and crop == (0, 0)
    assert torch.allclose(pixels[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_center_crop_and_flip_coordinates():
    image = noise_image(1, size=(40, 20))  # -> 32x16 at R=16: horizontal room 16
    _, original, crop = prepare_image(image, Augment(resolution=R, center_crop=True), random.Random(0))
    assert original == (20, 40) and crop == (0, 8)
    for seed in range(50):  # find an RNG state that flips a crop away from the centre
        plain, _, (_, left) = prepare_image(image, Augment(resolution=R), random.Random(seed))
        flipped, _, (_, left_flipped) = prepare_image(
            image, Augment(resolution=R, random_flip=True), random.Random(seed)
        )
        if left != 8 and not torch.equal(flipped, plain):
            break
    else:
        pytest.fail("no seed flipped an off-centre crop")
    assert torch.equal(flipped, plain.flip(-1))  # the same crop, mirrored
    assert left_flipped == 32 - left - R  # recorded in the flipped image's coordinates


def test_tar_shards_yield_all_samples_with_txt_and_json_captions(shards):
    data = open_dataset(str(shards), RAW)
    assert isinstance(data, TarShards) and data.num_shards == 4
    samples = list(data)
    assert len(samples) == 15 and sum(s is None for s in samples) == 3
    good = {s["key"]: s for s in samples if s is not None}
    assert len(good) == 12 and good["00002/20002"]["caption"] == "tar 2 2"  # from key.json
    assert good["00001/10000"]["caption"] == "tar 1 0" and good["00001/10000"]["pixel_values"].shape == (3, R, R)
    pattern = open_dataset(str(shards / "{00000..00001}.tar"), RAW)
    assert pattern.num_shards == 2 and len([s for s in pattern if s is not None]) == 6


def test_hf_dataset_from_save_to_disk(hf_dir):
    data = open_dataset(str(hf_dir), RAW)
    assert isinstance(data, HFImageDataset) and len(data) == 5
    assert [data[i]["caption"] for i in range(4)] == ["hf 0", "hf 1", "hf 2", "hf 3"]
    assert data[2]["key"] == "2" and data[2]["pixel_values"].shape == (3, R, R)
    alts = open_dataset(str(hf_dir), RAW, caption_column="alts")
    picks = set()
    for epoch in range(12):
        alts.set_epoch(epoch)
        picks.add(alts[4]["caption"])
    assert picks == {"hf 4 a", "hf 4 b"}  # a list of captions: one chosen per epoch


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_and_epoch_give_identical_samples_and_epochs_differ(folder, shards):
    aug = Augment(resolution=R, random_flip=True, caption_dropout=0.5, seed=3)
    a, b = open_dataset(str(folder), aug), open_dataset(str(folder), aug)
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert (sa is None) == (sb is None)
        if sa is not None:
            assert torch.equal(sa["pixel_values"], sb["pixel_values"]) and sa["caption"] == sb["caption"]
            assert torch.equal(sa["crop_top_left"], sb["crop_top_left"])

    def crops(d):
        return [d[i]["crop_top_left"].tolist() for i in range(len(d)) if d[i] is not None]

    before = crops(a)
    a.set_epoch(1)
    assert crops(a) != before
    t1, t2 = open_dataset(str(shards), aug), open_dataset(str(shards), aug)
    assert all((x is None and y is None) or torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(t1, t2))


def test_per_sample_decisions_do_not_depend_on_order_or_workers(folder):
    aug = Augment(resolution=R, random_flip=True, caption_dropout=0.5, seed=5)
    data = open_dataset(str(folder), aug)
    forward = {s["key"]: s for s in (data[i] for i in range(len(data))) if s is not None}
    backward = {s["key"]: s for s in (data[i] for i in reversed(range(len(data)))) if s is not None}
    loader = torch.utils.data.DataLoader(
        data, batch_size=2, shuffle=True, num_workers=2, collate_fn=collate, generator=torch.Generator().manual_seed(1)
    )
    batches = list(loader)
    via_loader = {k: (c, p) for b in batches for k, c, p in zip(b["keys"], b["captions"], b["pixel_values"])}
    assert forward.keys() == backward.keys() == via_loader.keys()
    for key, s in forward.items():
        assert torch.equal(s["pixel_values"], backward[key]["pixel_values"])
        assert via_loader[key][0] == s["caption"] and torch.equal(via_loader[key][1], s["pixel_values"])


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    import datasets

    path = tmp_path_factory.mktemp("many") / "hf"
    datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (4, 4))] * 200, "text": [f"c{i}" for i in range(200)]}
    ).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("rate", [0.0, 0.25, 1.0])
def test_caption_dropout_rate(many, rate):
    data = open_dataset(str(many), Augment(resolution=4, caption_dropout=rate, seed=0))
    dropped = [data[i]["caption"] == "" for i in range(len(data))]
    assert abs(sum(dropped) / len(dropped) - rate) < 0.1  # binomial sd at n=200 is 0.03
    if rate in (0.0, 1.0):
        assert all(d == bool(rate) for d in dropped)
    else:
        data.set_epoch(1)
        assert dropped != [data[i]["caption"] == "" for i in range(len(data))]  # a fresh draw each epoch
    assert sample_rng(1, 0, "k").random() == sample_rng(1, 0, "k").random() != sample_rng(1, 1, "k").random()


# ------------------------------------------------------------------------------------ bad samples


def test_corrupt_and_captionless_samples_are_skipped_and_counted(folder, shards):
    loader = torch.utils.data.DataLoader(open_dataset(str(folder), RAW), batch_size=4, collate_fn=collate)
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 3 and sum(len(b["captions"]) for b in batches) == 6
    assert all(b["pixel_values"].shape[0] == len(b["keys"]) == b["crop_top_left"].shape[0] for b in batches[:2])
    assert batches[2] == {"skipped": 1, "keys": [], "captions": []}  # trunc.png alone: nothing left to stack
    loader = torch.utils.data.DataLoader(open_dataset(str(shards), RAW), batch_size=4, collate_fn=collate)
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 3 and sum(len(b["captions"]) for b in batches) == 12
    assert collate([None, None]) == {"skipped": 2, "keys": [], "captions": []}


def test_tar_shards_split_disjointly_over_ranks_and_workers(shards):
    seen = []
    for rank in range(2):
        data = open_dataset(str(shards), RAW, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate)
        seen.append([k for b in loader for k in b["keys"]])
    everything = keys_of(open_dataset(str(shards), RAW))
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(everything)
    assert all(len(s) == len(set(s)) for s in seen)  # no worker read a shard another worker read
    data = open_dataset(str(shards), RAW, rank=1, world_size=2)
    orders = set()
    for epoch in range(4):
        data.set_epoch(epoch)
        orders.add(tuple(data.shards_for()))
        other = open_dataset(str(shards), RAW, rank=0, world_size=2)
        other.set_epoch(epoch)
        assert sorted(other.shards_for() + data.shards_for()) == sorted(data.shards)  # ranks agree on the order
    assert len(orders) > 1  # the shard order changes with the epoch


# ----------------------------------------------------------------------------------------- errors


def test_unusable_sources_fail_early_with_actionable_messages(tmp_path, hf_dir, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EllaError, match="no training samples in .*empty: expected images"):
        open_dataset(str(tmp_path / "empty"), RAW)
    (tmp_path / "nocaps").mkdir()
    (tmp_path / "nocaps" / "a.png").write_bytes(encoded(noise_image(0), "PNG"))
    with pytest.raises(EllaError, match="none has a caption file"):
        open_dataset(str(tmp_path / "nocaps"), RAW)
    with pytest.raises(EllaError, match="2 of its 2 tar shards do not exist"):
        open_dataset(str(tmp_path / "{0..1}.tar"), RAW)
    with pytest.raises(EllaError, match="no caption column 'caption'; its columns are image, text, alts"):
        open_dataset(str(hf_dir), RAW, caption_column="caption")
    with pytest.raises(EllaError, match="does not exist"):
        open_dataset(str(tmp_path / "typo"), RAW)
    with pytest.raises(EllaError, match="caption_dropout=0"):
        write_cache(open_dataset(str(folder), Augment(resolution=R)), tmp_path / "c", vae=None)


# ------------------------------------------------------------------------------------------ cache


@pytest.fixture(scope="module")
def models(tiny_sd, tiny_t5):
    from diffusers import AutoencoderKL

    from ella.llm import load_llm

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").eval()
    llm, tokenizer = load_llm(tiny_t5)
    return vae, llm, tokenizer


def cache_files(path: Path) -> dict:
    """Every file of a cache, tensors and JSON decoded, for exact comparison."""
    out = {}
    for f in sorted(path.iterdir()):
        out[f.name] = load_file(f) if f.suffix == ".safetensors" else json.loads(f.read_text())
    return out


def same_files(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        if isinstance(x, dict) and all(isinstance(v, torch.Tensor) for v in x.values()) and x:
            if x.keys() != b[name].keys() or not all(torch.equal(x[k], b[name][k]) for k in x):
                return False
        elif x != b[name]:
            return False
    return True


def test_cache_round_trip_matches_independent_encoding(folder, models, tmp_path):
    from ella.text import encode_text

    vae, llm, tokenizer = models
    raw = open_dataset(str(folder), RAW)
    index = write_cache(
        raw,
        tmp_path / "c",
        vae,
        llm=llm,
        tokenizer=tokenizer,
        max_length=8,
        batch_size=4,
        shard_size=4,
        progress=False,
        base="tiny",
        llm_name="t5",
    )
    # shards are fixed slices of 4 source entries: [bad img0 img1 img2] [img3 img4 nocap img5] [trunc] (none readable)
    assert (index["count"], index["skipped"], [s["count"] for s in index["shards"]]) == (6, 3, [3, 3])
    assert index["latent_shape"] == [4, 2, 2] and index["resolution"] == R
    assert index["llm"] == {"name": "t5", "hidden_size": 16, "max_length": 8, "truncated_captions": 1}
    assert read_cache_index(tmp_path / "c") == index and not (tmp_path / "c" / "cache.partial.json").exists()
    cached = open_dataset(str(tmp_path / "c"), RAW)
    assert isinstance(cached, CachedDataset) and len(cached) == 6
    expected = [s for s in (raw[i] for i in range(len(raw))) if s is not None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long caption is truncated, as in the cache
        pixels = torch.stack([s["pixel_values"] for s in expected])
        latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        features = encode_text(llm, tokenizer, [s["caption"] for s in expected], max_length=8).hidden_states
    batch = collate([cached[i] for i in range(len(cached))])
    assert batch["keys"] == [s["key"] for s in expected] and batch["captions"] == [s["caption"] for s in expected]
    torch.testing.assert_close(batch["latents"], latents, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(batch["features"], features, atol=2e-3, rtol=2e-3)
    mask = tokenizer(
        [s["caption"] for s in expected], padding="max_length", truncation=True, max_length=8, return_tensors="pt"
    )
    assert torch.equal(batch["feature_mask"], mask["attention_mask"].long())
    assert torch.equal(batch["crop_top_left"], torch.stack([s["crop_top_left"] for s in expected]))
    assert batch["latents"].dtype == batch["features"].dtype == torch.float32

    empty = encode_text(llm, tokenizer, [""], max_length=8).hidden_states[0]
    dropped = open_dataset(str(tmp_path / "c"), Augment(resolution=R, caption_dropout=1.0))
    sample = dropped[3]
    assert sample["caption"] == "" and not torch.equal(sample["features"], batch["features"][3])
    torch.testing.assert_close(sample["features"], empty, atol=2e-3, rtol=2e-3)
    half_raw = open_dataset(str(folder), Augment(resolution=R, caption_dropout=0.5))
    half_cached = open_dataset(str(tmp_path / "c"), Augment(resolution=R, caption_dropout=0.5))
    raw_drops = {s["key"]: s["caption"] == "" for s in (half_raw[i] for i in range(len(half_raw))) if s}
    assert raw_drops == {s["key"]: s["caption"] == "" for s in (half_cached[i] for i in range(6))}


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_interrupted_cache_resumes_to_the_same_result(source, request, models, tmp_path):
    vae, llm, tokenizer = models
    path = str(request.getfixturevalue(source))
    kwargs = {"llm": llm, "tokenizer": tokenizer, "max_length": 8, "batch_size": 3, "shard_size": 2, "progress": False}
    full = write_cache(open_dataset(path, RAW), tmp_path / "full", vae, **kwargs)

    calls, encode = [], vae.encode

    def interrupted(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return encode(x)

    vae.encode = interrupted
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            write_cache(open_dataset(path, RAW), tmp_path / "resumed", vae, **kwargs)
        assert not (tmp_path / "resumed" / "cache.json").exists()
        assert json.loads((tmp_path / "resumed" / "cache.partial.json").read_text())["settings"]
        assert list((tmp_path / "resumed").glob("shard-*.json"))  # the shards finished before the cut
        calls.clear()
        vae.encode = lambda x: calls.append(len(x)) or encode(x)
        resumed = write_cache(open_dataset(path, RAW), tmp_path / "resumed", vae, **kwargs)
        total_batches = -(-(9 if source == "folder" else 15) // 3)
        assert 0 < len(calls) < total_batches  # finished shards were not encoded again
    finally:
        del vae.encode
    assert resumed == full
    assert same_files(cache_files(tmp_path / "full"), cache_files(tmp_path / "resumed"))
    assert write_cache(open_dataset(path, RAW), tmp_path / "resumed", vae, **kwargs) == full  # finished: a no-op
    with pytest.raises(EllaError, match="other settings"):
        write_cache(open_dataset(path, RAW), tmp_path / "resumed", vae, **{**kwargs, "shard_size": 3})
