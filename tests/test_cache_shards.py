"""`ella cache --format webdataset` and the sharded, resumable cache job: parity with the safetensors cache,
byte-identical output over 1 or 2 processes, repair of damaged shards, the streaming reader, training on it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_refused
from ella.errors import EllaError
from ella.train import cache as cache_mod
from ella.train import train as train_mod
from ella.train.cache import write_cache
from ella.train.data import Augment, CachedDataset, CachedTarShards, collate, open_dataset, read_cache_index

R = 32  # images are 36x44 (w x h): random crops move vertically
MAX_LENGTH = 16  # tiny_config's llm_max_length, so the trainer takes these caches' features
RAW = Augment(resolution=R, caption_dropout=0.0)
LONG = "a very old wooden house near a quiet lake at sunset and a small red boat"  # 17 tiny-T5 tokens
DIST_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def one_thread():
    """Encode as a torchrun process does (OMP_NUM_THREADS=1): CPU kernels may round differently with more threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 entries, sorted: bad.jpg, img00..img08, nocap.png, sub/img09.png; img04's caption is blank (""), img07's
    too long for MAX_LENGTH: 10 readable samples in 4 chunks of 3 entries (keys hold dots and a slash, as file
    names do)."""
    root = tmp_path_factory.mktemp("wds-folder")
    (root / "sub").mkdir()
    for i in range(10):
        name = f"sub/img{i:02d}.png" if i == 9 else f"img{i:02d}.{'jpg' if i % 2 else 'png'}"
        pixels = np.random.default_rng(i).integers(0, 256, (44, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name, format="JPEG" if i % 2 else "PNG")
        caption = {4: "  \n", 7: LONG}.get(i, f"a red square {i}")
        (root / name).with_suffix(".txt").write_text(caption)
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "bad.txt").write_text("garbage")
    Image.new("RGB", (36, 44)).save(root / "nocap.png")
    return root


def cli_args(folder: Path, out: Path, tiny_sd: Path, tiny_t5: Path, *extra: str) -> list[str]:
    return [
        "cache", "--train_data_dir", str(folder), "--output", str(out), "--format", "webdataset",
        "--pretrained_model_name_or_path", str(tiny_sd), "--resolution", str(R),
        "--features", "--llm_name_or_path", str(tiny_t5), "--llm_max_length", str(MAX_LENGTH),
        "--batch_size", "2", "--shard_size", "3", "--dataloader_num_workers", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def caches(folder, tiny_sd, tiny_t5, tmp_path_factory) -> Path:
    """The folder cached in both formats by one process, with the settings `cli_args` gives ella cache."""
    from diffusers import AutoencoderKL

    from ella.llm import load_llm

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").eval()
    llm, tokenizer = load_llm(tiny_t5)
    root = tmp_path_factory.mktemp("caches")
    kwargs = dict(max_length=MAX_LENGTH, batch_size=2, shard_size=3, progress=False)
    kwargs.update(source=str(folder.resolve()), base=str(tiny_sd), llm_name=str(tiny_t5))
    with one_thread():
        for fmt in ("safetensors", "webdataset"):
            write_cache(
                open_dataset(str(folder), RAW), root / fmt, vae, llm=llm, tokenizer=tokenizer, format=fmt, **kwargs
            )
    return root


def summary(out: Path, fmt: str = "webdataset") -> str:
    """What `ella cache` prints for the folder."""
    return f"{out}: 10 samples in 4 shards ({fmt}), 2 unreadable samples skipped, 1 captions truncated to 16 tokens"


def files_of(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def stats_of(path: Path) -> dict[str, tuple[int, int]]:
    return {f.name: (f.stat().st_mtime_ns, f.stat().st_ino) for f in sorted(path.iterdir())}


def by_key(samples) -> dict[str, dict]:
    return {s["key"]: s for s in samples}


# ------------------------------------------------------------------------------------------- parity


def test_webdataset_cache_holds_what_the_safetensors_cache_holds(caches):
    st, wds = read_cache_index(caches / "safetensors"), read_cache_index(caches / "webdataset")
    assert (st["format"], wds["format"]) == ("safetensors", "webdataset")
    assert (wds["count"], wds["skipped"], [s["count"] for s in wds["shards"]]) == (10, 2, [2, 3, 3, 2])
    drop = ("format", "shards", "settings")
    assert {k: v for k, v in st.items() if k not in drop} == {k: v for k, v in wds.items() if k not in drop}
    assert [s["name"] for s in st["shards"]] == [s["name"] for s in wds["shards"]]

    members = ("caption.txt", "crop_top_left.npy", "feature_mask.npy", "features.npy", "key.txt", "latents.npy")
    with tarfile.open(caches / "webdataset" / "shard-00000.tar") as tar:  # plain webdataset: a key, its files
        assert tar.getnames() == [f"{k}.{m}" for k in ("000000", "000001") for m in (*members, "original_size.npy")]
        assert tar.extractfile("000001.key.txt").read() == b"img01.jpg"
        latents = np.load(io.BytesIO(tar.extractfile("000000.latents.npy").read()), allow_pickle=False)
        assert latents.dtype == np.float16 and latents.shape == (4, 4, 4)

    safet = CachedDataset(caches / "safetensors", RAW)
    streamed = open_dataset(str(caches / "webdataset"), RAW)
    assert isinstance(streamed, CachedTarShards) and streamed.index["count"] == len(safet) == 10
    a, b = by_key(safet[i] for i in range(len(safet))), by_key(streamed)
    assert list(a) == [f"img{i:02d}.{'jpg' if i % 2 else 'png'}" for i in range(9)] + ["sub/img09.png"]
    assert a.keys() == b.keys() and a["img04.png"]["caption"] == b["img04.png"]["caption"] == ""
    for key, x in a.items():
        y = b[key]
        assert (
            x.keys()
            == y.keys()
            == {"key", "caption", "latents", "original_size", "crop_top_left", "features", "feature_mask"}
        )
        assert x["caption"] == y["caption"]
        for name in ("latents", "original_size", "crop_top_left", "features", "feature_mask"):
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), (key, name)


# -------------------------------------------------------------------------------------- processes


@pytest.mark.parametrize("fmt", ["webdataset", "safetensors"])
def test_two_processes_write_the_bytes_one_process_writes(fmt, folder, caches, tiny_sd, tiny_t5, tmp_path):
    out = tmp_path / "two"
    argv = cli_args(folder, out, tiny_sd, tiny_t5, "--format", fmt)
    argv[argv.index("--dataloader_num_workers") + 1] = "1"  # loader workers don't change the bytes either
    launch = ["--standalone", "--nproc_per_node", "2"]  # standalone: a free port, whatever else runs here
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "ella.cli", *argv]
    done = subprocess.run(cmd, env=DIST_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == summary(out, fmt)  # said once, with counts summed over both processes' shards
    assert files_of(out) == files_of(caches / fmt)  # every shard, record, empty.safetensors, cache.json


# ----------------------------------------------------------------------------------- resume, repair


def test_a_damaged_cache_is_repaired_shard_by_shard_and_other_settings_are_refused(
    folder, caches, tiny_sd, tiny_t5, tmp_path, run_cli, monkeypatch
):
    from diffusers import AutoencoderKL

    out = tmp_path / "c"
    shutil.copytree(caches / "webdataset", out)
    (out / "shard-00001.tar").unlink()  # lost
    (out / ".shard-00001.tar.k1ll3d.tmp").write_bytes(b"\0" * 700)  # a killed write, under its temp name
    with open(out / "shard-00002.tar", "r+b") as f:  # cut short on disk
        f.truncate(1024)
    with pytest.raises(EllaError, match=r"shard-00001\.tar"):  # found when opening, before any model loads
        open_dataset(str(out), RAW)
    (out / "shard-00001.tar").write_bytes((caches / "webdataset" / "shard-00001.tar").read_bytes())  # for a moment
    with pytest.raises(EllaError, match=r"shard-00002\.tar is 1024 bytes, cache\.json says \d+: it is truncated"):
        open_dataset(str(out), RAW)
    (out / "shard-00001.tar").unlink()
    before = stats_of(out)

    calls, encode = [], AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x: calls.append(len(x)) or encode(self, x))
    with one_thread():
        code, stdout, err = run_cli(*cli_args(folder, out, tiny_sd, tiny_t5))
    assert code == 0, err
    assert stdout == summary(out) + "\n"
    assert calls == [2, 1, 2, 1]  # only shards 1 and 2 (3 samples each, batches of 2) were encoded again
    assert files_of(out) == files_of(caches / "webdataset")  # the temp file is gone, the rest byte-identical
    after = stats_of(out)
    rewritten = {name for name in after if before.get(name) != after[name]}
    assert rewritten == {"shard-00001.tar", "shard-00001.json", "shard-00002.tar", "shard-00002.json"}
    assert set(before) - set(after) == {".shard-00001.tar.k1ll3d.tmp"}  # cache.json and the rest untouched

    def forbidden(*args, **kwargs):
        raise AssertionError("a model loaded with nothing to encode, or before the settings were checked")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", forbidden)
    assert run_cli(*cli_args(folder, out, tiny_sd, tiny_t5))[:2] == (0, summary(out) + "\n")  # whole: a no-op
    assert stats_of(out) == after
    code, _, err = run_cli(*cli_args(folder, out, tiny_sd, tiny_t5, "--resolution", "48"))
    assert_refused(code, err, "finished cache made with other settings (differs in: resolution)")
    assert stats_of(out) == after
    (out / "cache.json").unlink()  # as if the job had been killed before its end
    (out / "cache.partial.json").write_text(
        json.dumps({"settings": read_cache_index(caches / "webdataset")["settings"]})
    )
    kept = stats_of(out)
    code, _, err = run_cli(*cli_args(folder, out, tiny_sd, tiny_t5, "--resolution", "48", "--format", "safetensors"))
    assert_refused(code, err, "interrupted cache made with other settings (differs in: format, resolution)")
    assert stats_of(out) == kept  # nothing written


def test_a_killed_webdataset_job_resumes_to_the_same_bytes(folder, caches, tiny_sd, tiny_t5, tmp_path):
    from diffusers import AutoencoderKL

    from ella.llm import load_llm

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").eval()
    llm, tokenizer = load_llm(tiny_t5)
    kwargs = dict(llm=llm, tokenizer=tokenizer, max_length=MAX_LENGTH, batch_size=2, shard_size=3, progress=False)
    kwargs.update(source=str(folder.resolve()), base=str(tiny_sd), llm_name=str(tiny_t5), format="webdataset")
    calls, encode = [], vae.encode

    def power_cut(x):
        calls.append(len(x))
        if len(calls) == 5:  # shard 0: batches of 1 and 1 readable samples, shard 1: 2 and 1, shard 2: ...
            raise RuntimeError("power cut")
        return encode(x)

    vae.encode = power_cut
    with one_thread(), pytest.raises(RuntimeError, match="power cut"):
        write_cache(open_dataset(str(folder), RAW), tmp_path / "c", vae, **kwargs)
    assert not (tmp_path / "c" / "cache.json").exists() and (tmp_path / "c" / "cache.partial.json").exists()
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == [
        "shard-00000.json", "shard-00000.tar", "shard-00001.json", "shard-00001.tar",
    ]  # fmt: skip
    calls.clear()
    vae.encode = lambda x: calls.append(len(x)) or encode(x)
    with one_thread():
        index = write_cache(open_dataset(str(folder), RAW), tmp_path / "c", vae, **kwargs)
    assert calls == [2, 1, 1, 1]  # shards 2 and 3 only
    assert index == read_cache_index(caches / "webdataset")
    assert files_of(tmp_path / "c") == files_of(caches / "webdataset")


# ------------------------------------------------------------------------------------------- reader


def test_the_reader_gives_every_sample_once_per_epoch_and_drops_captions_as_the_safetensors_reader(caches):
    everything = sorted(by_key(open_dataset(str(caches / "webdataset"), RAW)))
    assert len(everything) == 10
    orders = set()
    for epoch in (0, 1, 2):
        seen = []
        for rank in range(2):
            data = open_dataset(str(caches / "webdataset"), RAW, rank=rank, world_size=2)
            data.set_epoch(epoch)
            orders.add(tuple(data.shards_for()))
            loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate)
            seen += [k for b in loader for k in b["keys"]]
        assert sorted(seen) == everything  # each sample exactly once over 2 ranks x 2 workers
    assert len(orders) > 2  # the shard order follows the epoch

    def stream(epoch: int) -> list[str]:  # one reader, the whole cache, in the order training would see it
        data = open_dataset(str(caches / "webdataset"), RAW)
        data.set_epoch(epoch)
        return [s["key"] for s in data]

    first = stream(0)
    assert stream(0) == first  # seeded: a resumed run re-reads the epoch in the same order
    streams = {tuple(stream(e)) for e in range(6)}
    shard_of = {k: i for i, shard in enumerate(json.loads((caches / "webdataset" / "cache.json").read_text())["shards"])
                for k in json.loads((caches / "webdataset" / f"{shard['name']}.json").read_text())["keys"]}  # fmt: skip

    # within the stream samples move, not just whole shards: some epoch has two samples of one shard swapped
    def within_shard_pairs(order):
        return {(a, b) for i, a in enumerate(order) for b in order[i + 1 :] if shard_of[a] == shard_of[b]}

    assert len({frozenset(within_shard_pairs(o)) for o in streams}) > 1

    half = Augment(resolution=R, caption_dropout=0.5, seed=7)
    safet, streamed = open_dataset(str(caches / "safetensors"), half), open_dataset(str(caches / "webdataset"), half)
    empty = safet.empty["features"].float()
    drops = set()
    for epoch in (0, 1):
        safet.set_epoch(epoch)
        streamed.set_epoch(epoch)
        a, b = by_key(safet[i] for i in range(len(safet))), by_key(streamed)
        for key in everything:
            assert a[key]["caption"] == b[key]["caption"]
            assert torch.equal(a[key]["features"], b[key]["features"])
            assert torch.equal(a[key]["feature_mask"], b[key]["feature_mask"])
            dropped = a[key]["caption"] == "" and key != "img04.png"
            drops.add(dropped)
            if dropped:
                assert torch.equal(b[key]["features"], empty)
    assert drops == {True, False}


def test_a_damaged_shard_that_reads_short_is_an_error_not_a_shorter_epoch(caches, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(caches / "webdataset", out)
    index = json.loads((out / "cache.json").read_text())
    for shard in index["shards"]:
        del shard["bytes"]  # an index that can't tell a short file: the stream itself must
    (out / "cache.json").write_text(json.dumps(index))
    data = (out / "shard-00001.tar").read_bytes()
    end = data.index(b"000001.caption.txt")  # where sample 2 of 3 begins
    reader = open_dataset(str(out), RAW)
    reader.shards_for = lambda *a: [str(out / "shard-00001.tar")]
    (out / "shard-00001.tar").write_bytes(data[:end])  # cut between two samples: a short, well-formed stream
    with pytest.raises(EllaError, match=r"shard-00001\.tar holds 1 samples but cache\.json says 3: it is truncated"):
        list(reader)
    (out / "shard-00001.tar").write_bytes(data[: end - 512])  # cut inside a file
    with pytest.raises(EllaError, match=r"shard-00001\.tar is damaged \(ReadError: unexpected end of data\); delete"):
        list(reader)


# ----------------------------------------------------------------------------------------- training


def test_ella_train_runs_on_a_webdataset_cache_without_vae_or_llm(caches, tiny_sd, tiny_t5, tmp_path, monkeypatch):
    from test_train import tiny_config

    needed, load = {}, train_mod.load_frozen
    monkeypatch.setattr(train_mod, "load_frozen", lambda *a, **k: needed.update(k) or load(*a, **k))
    out = train_mod.main(tiny_config(tiny_sd, tiny_t5, caches / "webdataset", tmp_path / "run", max_train_steps=3))
    assert (out / "ella.safetensors").is_file()
    assert needed["need_vae"] is False and needed["need_llm"] is False
    progress = json.loads((out / "checkpoint-3" / "progress-rank0.json").read_text())
    assert progress["samples_seen"] == 10  # one epoch, batches of 4, 4, 2


# -------------------------------------------------------------------------------------------- input


def test_bad_format_and_missing_shards_are_refused_before_any_model_loads(
    folder, caches, tiny_sd, tiny_t5, tmp_path, run_cli, capsys, monkeypatch
):
    with pytest.raises(SystemExit) as exit_:
        run_cli(*cli_args(folder, tmp_path / "x", tiny_sd, tiny_t5, "--format", "bogus"))
    assert exit_.value.code == 2
    assert "argument --format: invalid choice: 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    def forbidden(*args, **kwargs):
        raise AssertionError("models were loaded before the cache was checked")

    monkeypatch.setattr(train_mod, "load_frozen", forbidden)
    monkeypatch.setattr(cache_mod.AutoencoderKL, "from_pretrained", forbidden)
    broken = tmp_path / "broken"
    shutil.copytree(caches / "webdataset", broken)
    (broken / "shard-00002.tar").unlink()
    with pytest.raises(EllaError, match=r"is missing shard-00002\.tar; re-run the same `ella cache` command"):
        open_dataset(str(broken), RAW)
    from test_train import tiny_config

    with pytest.raises(EllaError, match=r"missing shard-00002\.tar"):
        train_mod.main(tiny_config(tiny_sd, tiny_t5, broken, tmp_path / "run"))
    with pytest.raises(EllaError, match="4 shards, too few for 5 processes"):
        open_dataset(str(caches / "webdataset"), RAW, rank=0, world_size=5)
    index = json.loads((caches / "webdataset" / "cache.json").read_text())
    (broken / "cache.json").write_text(json.dumps({**index, "version": 9}))
    with pytest.raises(EllaError, match="cache format version 9, this ella reads versions 1, 2"):
        open_dataset(str(broken), RAW)
    code, _, err = run_cli("cache", "--train_data_dir", str(caches / "webdataset"), "--output", str(tmp_path / "y"))
    assert_refused(code, err, "is already an `ella cache` directory")


def test_caches_of_the_previous_layout_still_train_and_their_unfinished_runs_are_refused(caches, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(caches / "safetensors", old)
    index = json.loads((old / "cache.json").read_text())
    for shard in index["shards"]:
        del shard["bytes"]
    del index["format"], index["settings"]["format"]
    index["settings"].update(version=1, num_workers=None)
    (old / "cache.json").write_text(json.dumps({**index, "version": 1}))  # what ella wrote before version 2
    data = open_dataset(str(old), RAW)
    assert isinstance(data, CachedDataset) and len(data) == 10 and data[9]["key"] == "sub/img09.png"
    settings = read_cache_index(caches / "safetensors")["settings"]
    with pytest.raises(EllaError, match=r"finished cache of an older ella \(cache version 1\), which trains as it is"):
        cache_mod.check_existing(old, settings)
    (old / "cache.json").unlink()
    v1_state = {"settings": {**settings, "version": 1}, "shards": [], "batch": 3, "offset": 1}
    (old / "cache.partial.json").write_text(json.dumps(v1_state))
    with pytest.raises(EllaError, match=r"an older ella \(cache version 1\) did not finish, which this one can't"):
        cache_mod.check_existing(old, settings)
