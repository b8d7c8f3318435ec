"""The trainer on tiny models: it learns, touches nothing frozen, resumes exactly, and refuses bad setups early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from ella.errors import EllaError
from ella.train import train as train_mod
from ella.train.config import TrainConfig, build_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_folder(path: Path, n: int = 8, corrupt: int = 0) -> Path:
    """Solid-colour images with their colour as caption; ``corrupt`` extra files that are not images."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        Image.new("RGB", (40, 48), COLOURS[colour]).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(f"a {colour} square")
    for j in range(corrupt):
        (path / f"bad{j}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        (path / f"bad{j}.txt").write_text("a broken file")
    return path


def tiny_config(tiny_sd, tiny_t5, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        pretrained_model_name_or_path=str(tiny_sd),
        llm_name_or_path=str(tiny_t5),
        train_data_dir=str(data),
        output_dir=str(out),
        resolution=32,
        train_batch_size=4,
        max_train_steps=6,
        learning_rate=1e-3,
        connector_layers=1,
        connector_heads=4,
        connector_num_latents=8,
        llm_max_length=16,
        dataloader_num_workers=0,
        report_to="none",
        checkpointing_steps=3,
        logging_steps=1,
        seed=3,
    )
    values.update(overrides)
    return build_config(values)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "folder")


def frozen_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture()
def captured(monkeypatch):
    """Keep hold of the frozen models main() loads, to inspect them after training."""
    seen = {}
    original = train_mod.load_frozen

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["models"] = out
        seen["before"] = [frozen_state(m) if m is not None and hasattr(m, "state_dict") else None for m in out[:3]]
        return out

    monkeypatch.setattr(train_mod, "load_frozen", spy)
    return seen


def eval_loss(cfg: TrainConfig, connector_path: Path | None, folder: Path, unet=None) -> float:
    """Fixed-noise loss over the whole (tiny) set: comparable before and after training (``unet``: instead of the
    base's own, e.g. one with a trained LoRA)."""
    from ella import TimestepAwareSemanticConnector
    from ella.train.data import Augment, open_dataset
    from ella.train.models import load_frozen, make_connector, read_dims

    dims = read_dims(cfg, None)
    connector = (
        TimestepAwareSemanticConnector.from_single_file(connector_path) if connector_path else make_connector(cfg, dims)
    )
    base_unet, vae, llm, tok, sched = load_frozen(cfg, torch.float32, "cpu", need_vae=True, need_llm=True)
    unet = base_unet if unet is None else unet
    data = open_dataset(str(folder), Augment(resolution=cfg.resolution, center_crop=True, caption_dropout=0.0))
    batch = train_mod.TokenizingCollate(tok, cfg)([data[i] for i in range(len(data))])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = train_mod.batch_latents(batch, vae, "cpu").repeat(8, 1, 1, 1)
        feats, mask = train_mod.batch_features(batch, llm, cfg, "cpu")
        return train_mod.diffusion_loss(
            connector, unet, sched, latents, feats.repeat(8, 1, 1), mask, dims=dims, generator=g
        ).item()


def test_loss_falls_and_only_the_connector_changes(tiny_sd, tiny_t5, folder, tmp_path, captured):
    torch.manual_seed(0)
    cfg = tiny_config(
        tiny_sd,
        tiny_t5,
        folder,
        tmp_path / "run",
        max_train_steps=100,
        learning_rate=5e-3,
        caption_dropout=0.0,
        checkpointing_steps=100,
    )
    init = tmp_path / "init.safetensors"
    from ella.train.models import make_connector, read_dims

    torch.manual_seed(cfg.seed)
    make_connector(cfg, read_dims(cfg, None)).save_single_file(init)
    cfg.init_connector = str(init)
    before = eval_loss(cfg, init, folder)
    out = train_mod.main(cfg)
    after = eval_loss(cfg, out / "ella.safetensors", folder)
    assert after < 0.9 * before, (before, after)

    unet, vae, llm = captured["models"][:3]
    for module, state in zip((unet, vae, llm), captured["before"], strict=True):
        now = module.state_dict()
        assert all(torch.equal(now[k], state[k]) for k in state), f"{type(module).__name__} changed"
        assert all(p.grad is None for p in module.parameters()), f"{type(module).__name__} got weight gradients"
    trained = load_file(out / "ella.safetensors")
    start = load_file(init)
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert (out / "connector" / "config.json").is_file() and (out / "checkpoint-100").is_dir()


def test_sigkill_and_resume_is_bit_identical(tiny_sd, tiny_t5, folder, tmp_path):
    """Kill a CPU run right after a checkpoint lands; resuming reaches the uninterrupted run's exact weights."""
    steps = 30

    def write_cfg(out: Path) -> Path:
        cfg = dict(
            pretrained_model_name_or_path=str(tiny_sd),
            llm_name_or_path=str(tiny_t5),
            train_data_dir=str(folder),
            output_dir=str(out),
            resolution=32,
            train_batch_size=3,
            max_train_steps=steps,
            checkpointing_steps=4,
            checkpoints_total_limit=2,
            connector_layers=1,
            connector_heads=4,
            connector_num_latents=8,
            llm_max_length=16,
            dataloader_num_workers=0,
            report_to="none",
            random_flip=True,
            use_ema=True,
            ema_decay=0.9,
            gradient_accumulation_steps=2,
            seed=11,
            learning_rate=1e-3,
        )
        path = out.parent / f"{out.name}.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ella.cli", "train", "--config"]
    straight = tmp_path / "straight"
    subprocess.run(cmd + [str(write_cfg(straight))], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cmd + [str(write_cfg(killed))], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list(killed.glob("checkpoint-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert done and done[-1] < steps, f"the run was not interrupted mid-way: {done}"
    assert not (killed / "ella.safetensors").exists()

    resumed = subprocess.run(
        cmd + [str(write_cfg(killed)), "--resume_from_checkpoint", "latest"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(straight / "ella.safetensors"), load_file(killed / "ella.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(killed.glob("checkpoint-*"))) == 2  # checkpoints_total_limit
    progress = json.loads((killed / f"checkpoint-{steps}" / "progress-rank0.json").read_text())
    assert progress["global_step"] == steps


def test_time_limit_stops_with_checkpoint_and_export_and_resume_finishes_the_same_run(
    tiny_sd, tiny_t5, folder, tmp_path
):
    """A lent machine's clock: --max_train_minutes stops early, exports, and says how far it got."""
    straight = train_mod.main(tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "straight"))
    out = tmp_path / "limited"
    train_mod.main(tiny_config(tiny_sd, tiny_t5, folder, out, max_train_minutes=1e-9, resume_from_checkpoint="latest"))
    assert json.loads((out / "training.json").read_text()) == {
        "steps": 1,
        "max_train_steps": 6,
        "samples_seen": 4,
        "stopped_by": "time",
    }
    assert (out / "ella.safetensors").is_file() and (out / "checkpoint-1").is_dir()

    train_mod.main(tiny_config(tiny_sd, tiny_t5, folder, out, resume_from_checkpoint="latest"))
    assert json.loads((out / "training.json").read_text())["stopped_by"] == "steps"
    a, b = load_file(straight / "ella.safetensors"), load_file(out / "ella.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_mlp_runs_pad_text_to_max_length_and_the_loss_is_unchanged(tiny_sd, tiny_t5, folder, tmp_path):
    """With --torch_compile the MLP's token-aligned batches are padded to llm_max_length (static shapes for the
    compiled UNet) and masked, so the UNet attends to the same tokens: same loss as the unpadded batch."""
    from ella.train.data import Augment, collate, open_dataset
    from ella.train.models import load_frozen, make_connector, read_dims

    plain = tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "a", connector_variant="mlp", llm_max_length=48)
    padded = tiny_config(
        tiny_sd, tiny_t5, folder, tmp_path / "b", connector_variant="mlp", llm_max_length=48, torch_compile=True
    )
    dims = read_dims(plain, None)
    torch.manual_seed(0)
    connector = make_connector(plain, dims)
    unet, vae, llm, tok, sched = load_frozen(plain, torch.float32, "cpu", need_vae=True, need_llm=True)
    data = open_dataset(str(folder), Augment(resolution=plain.resolution, center_crop=True, caption_dropout=0.0))
    samples = [data[i] for i in range(4)]
    samples[1]["caption"] = "a much longer caption about a red square that sits on the left of the picture"
    latents = train_mod.batch_latents(collate(samples), vae, "cpu")
    losses = []
    for cfg in (plain, padded):
        batch = train_mod.TokenizingCollate(tok, cfg)(samples)
        feats, mask = train_mod.batch_features(batch, llm, cfg, "cpu", static=cfg is padded)
        losses.append(
            train_mod.diffusion_loss(
                connector, unet, sched, latents, feats, mask, dims=dims, generator=torch.Generator().manual_seed(1)
            )
        )
        if cfg is padded:
            assert feats.shape[1] == 48 and mask.shape == (4, 48) and mask[:, -1].sum() == 0
        else:
            assert feats.shape[1] < 48  # as long as the longest caption
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["tsc", "mlp"])
def test_features_from_loader_workers_equal_the_inference_encoding(tiny_sd, tiny_t5, folder, tmp_path, variant):
    """Training tokenizes in the DataLoader's worker processes; the features it feeds the connector must
    be the ones inference makes from the same captions (fixed: 16 tokens, flexible: padded + mask)."""
    from ella.text import encode_text
    from ella.train.data import Augment, open_dataset
    from ella.train.models import load_frozen

    cfg = tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "run", connector_variant=variant, llm_max_length=16)
    _, _, llm, tok, _ = load_frozen(cfg, torch.float32, "cpu", need_vae=False, need_llm=True)
    data = open_dataset(str(folder), Augment(resolution=cfg.resolution, center_crop=True, caption_dropout=0.5))
    data.set_epoch(0)
    loader = torch.utils.data.DataLoader(
        data, batch_size=3, collate_fn=train_mod.TokenizingCollate(tok, cfg), num_workers=2
    )
    batches = list(loader)
    assert sum(len(b["captions"]) for b in batches) == len(data) and any("" in b["captions"] for b in batches)
    for batch in batches:
        feats, mask = train_mod.batch_features(batch, llm, cfg, "cpu")
        ref = encode_text(llm, tok, batch["captions"], max_length=16, flexible=variant == "mlp")
        torch.testing.assert_close(feats, ref.hidden_states, rtol=0, atol=0)
        if variant == "mlp":
            assert torch.equal(mask, ref.attention_mask) and feats.shape[1] < 16
        else:
            assert mask is None and feats.shape[1] == 16


@pytest.mark.parametrize("scope", ["unet", "step"])
def test_compiled_runs_see_only_full_batches(tiny_sd, tiny_t5, folder, tmp_path, monkeypatch, scope):
    """8 samples in batches of 3: a compiled UNet or loss (static shapes) must never get the short third batch,
    which would compile it again; uncompiled runs keep every sample. Exactly one thing is compiled: the scope's."""
    sizes, compiled = [], []

    class Recorder:  # stands in for the compiled module: records batch sizes, runs the real one
        def __init__(self, module):
            self.module, self.dtype = module, module.dtype

        def __call__(self, sample, *args, **kwargs):
            sizes.append(sample.shape[0])
            return self.module(sample, *args, **kwargs)

    def fake_compile(fn, **kwargs):
        assert kwargs.get("dynamic") is False
        compiled.append(fn)
        if isinstance(fn, torch.nn.Module):
            return Recorder(fn)

        def loss(connector, unet, scheduler, latents, *args, **kw):  # the compiled diffusion_loss
            sizes.append(latents.shape[0])
            return fn(connector, unet, scheduler, latents, *args, **kw)

        return loss

    monkeypatch.setattr(torch, "compile", fake_compile)
    # a CPU doesn't compile (see there): here it is told to
    monkeypatch.setattr(train_mod.speed, "resolve_compile", lambda requested, device: bool(requested))
    train_mod.main(
        tiny_config(
            tiny_sd,
            tiny_t5,
            folder,
            tmp_path / "c",
            train_batch_size=3,
            max_train_steps=5,
            checkpointing_steps=5,
            torch_compile=True,
            compile_scope=scope,
        )
    )
    assert sizes == [3] * 5
    assert len(compiled) == 1 and (compiled[0] is train_mod.diffusion_loss) == (scope == "step")
    seen = json.loads((tmp_path / "c" / "training.json").read_text())["samples_seen"]
    assert seen == 15


def test_corrupt_samples_are_skipped_and_counted(tiny_sd, tiny_t5, tmp_path):
    data = make_folder(tmp_path / "data", n=6, corrupt=2)
    out = train_mod.main(
        tiny_config(
            tiny_sd,
            tiny_t5,
            data,
            tmp_path / "run",
            max_train_steps=4,
            checkpointing_steps=4,
            gradient_checkpointing=True,
            snr_gamma=5.0,
            noise_offset=0.05,
        )
    )
    progress = json.loads((out / "checkpoint-4" / "progress-rank0.json").read_text())
    # 8 files per epoch, 2 unreadable, batches of 4: 4 steps = 2 epochs = 12 good samples, 4 skipped
    assert (progress["samples_seen"], progress["skipped"]) == (12, 4)


def test_trains_from_webdataset_shards(tiny_sd, tiny_t5, tmp_path):
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i, colour in enumerate(COLOURS):
                for name, payload in ((f"{s}{i:04d}.png", None), (f"{s}{i:04d}.txt", f"a {colour} square".encode())):
                    if payload is None:
                        buf = io.BytesIO()
                        Image.new("RGB", (36, 36), COLOURS[colour]).save(buf, format="PNG")
                        payload = buf.getvalue()
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    out = train_mod.main(
        tiny_config(
            tiny_sd,
            tiny_t5,
            shards,
            tmp_path / "run",
            max_train_steps=5,
            validation_prompts=["a red square", "a blue square"],
            validation_steps=5,
            validation_inference_steps=2,
            report_to="tensorboard",
        )
    )
    progress = json.loads((out / "checkpoint-5" / "progress-rank0.json").read_text())
    assert progress["epoch"] >= 1 and progress["samples_seen"] == 20  # 8 samples per epoch, batches of 4
    grid = Image.open(out / "validation" / "step-0000005.png")
    assert grid.size == (2 * 32, 32)  # one image per validation prompt, side by side
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no tensorboard log written"


def test_trains_from_hf_dataset(tiny_sd, tiny_t5, tmp_path):
    import datasets

    images = [Image.new("RGB", (32, 40), rgb) for rgb in COLOURS.values()]
    datasets.Dataset.from_dict({"img": images, "caption": [f"a {c} square" for c in COLOURS]}).save_to_disk(
        tmp_path / "hf"
    )
    cfg = tiny_config(
        tiny_sd, tiny_t5, tmp_path, tmp_path / "run", max_train_steps=2, image_column="img", caption_column="caption"
    )
    cfg.train_data_dir, cfg.dataset_name = None, str(tmp_path / "hf")
    assert (train_mod.main(cfg) / "ella.safetensors").is_file()


def test_trains_from_cache_without_vae_or_llm(tiny_sd, tiny_t5, folder, tmp_path, captured):
    from ella.cli import main as cli

    cache = tmp_path / "cache"
    assert (
        cli(
            [
                "cache",
                "--train_data_dir",
                str(folder),
                "--output",
                str(cache),
                "--pretrained_model_name_or_path",
                str(tiny_sd),
                "--resolution",
                "32",
                "--features",
                "--llm_name_or_path",
                str(tiny_t5),
                "--llm_max_length",
                "16",
                "--dataloader_num_workers",
                "0",
                "--shard_size",
                "5",
            ]
        )
        == 0
    )
    with pytest.raises(EllaError, match=r"--llm_fsdp shards the LLM that runs in the training step, but this cache"):
        train_mod.main(tiny_config(tiny_sd, tiny_t5, cache, tmp_path / "sharded", llm_fsdp=True))
    assert "models" not in captured  # refused before any model loaded
    out = train_mod.main(tiny_config(tiny_sd, tiny_t5, cache, tmp_path / "run", max_train_steps=3))
    assert (out / "ella.safetensors").is_file()
    _, vae, llm = captured["models"][:3]
    assert vae is None and llm is None  # neither is loaded when the cache holds latents and features


def test_sdxl_style_unet_trains_pooled_head_with_time_ids(tiny_t5, folder, tmp_path, monkeypatch):
    from tiny_models import TINY_SDXL_POOLED_DIM, build_tiny_sdxl

    base = build_tiny_sdxl(tmp_path / "sdxl")
    seen = {}
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.forward

    def spy(self, *args, added_cond_kwargs=None, **kwargs):
        seen["added"] = {k: v.detach().clone() for k, v in added_cond_kwargs.items()}
        return original(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    cfg = tiny_config(
        base, tiny_t5, folder, tmp_path / "run", max_train_steps=2, checkpointing_steps=2, center_crop=True
    )
    out = train_mod.main(cfg)
    from ella import TimestepAwareSemanticConnector

    connector = TimestepAwareSemanticConnector.from_single_file(out / "ella.safetensors")
    assert connector.config.pooled_dim == TINY_SDXL_POOLED_DIM and connector.config.width == 48
    assert seen["added"]["text_embeds"].shape == (4, TINY_SDXL_POOLED_DIM)
    # images are 40x48 (w x h): shorter side 40 -> 32, so original (48, 40), centre crop top (38-32)/2=3, left 0
    assert seen["added"]["time_ids"][0].tolist() == [48.0, 40.0, 3.0, 0.0, 32.0, 32.0]
    init = load_file(out / "checkpoint-2" / "ella.safetensors")
    assert all(torch.isfinite(v).all() for v in init.values())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(train_data_dir="EMPTY"), "no training samples"),
        (dict(output_dir="UNWRITABLE"), "not writable"),
        (dict(init_connector="WRONG_INPUT"), "LLM hidden size"),
        (dict(init_connector="WRONG_WIDTH"), "cross_attention_dim"),
        (dict(connector_heads=5), "not divisible"),
    ],
)
def test_setup_errors_come_before_any_model_loads(tiny_sd, tiny_t5, folder, tmp_path, monkeypatch, change, message):
    from conftest import tiny_connector

    def forbidden(*a, **k):
        raise AssertionError("models were loaded before the setup was checked")

    monkeypatch.setattr(train_mod, "load_frozen", forbidden)
    values = {}
    for key, value in change.items():
        if value == "EMPTY":
            (tmp_path / "empty").mkdir()
            value = str(tmp_path / "empty")
        elif value == "UNWRITABLE":
            blocker = tmp_path / "file"
            blocker.write_text("x")
            value = str(blocker / "out")
        elif value == "WRONG_INPUT":
            value = str(tmp_path / "c.safetensors")
            tiny_connector(input_dim=12).save_single_file(value)
        elif value == "WRONG_WIDTH":
            value = str(tmp_path / "c.safetensors")
            tiny_connector(width=24, heads=4).save_single_file(value)
        values[key] = value
    cfg = tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "run", **values)
    with pytest.raises(EllaError, match=message):
        train_mod.main(cfg)


def test_config_yaml_flags_and_bad_keys(tmp_path, capsys):
    from ella.cli import build_parser
    from ella.train.config import config_from_args

    (tmp_path / "run.yaml").write_text(
        "train_data_dir: d\nlearning_rate: 1e-5\nvalidation_prompts: [a cat]\ntrain_batch_size: 8\n"
    )
    args = build_parser().parse_args(
        ["train", "--config", str(tmp_path / "run.yaml"), "--train_batch_size", "2", "--use_ema"]
    )
    cfg = config_from_args(args)
    assert (cfg.learning_rate, cfg.train_batch_size, cfg.use_ema, cfg.validation_prompts) == (1e-5, 2, True, ["a cat"])
    assert cfg.adam_weight_decay == 0.01 and cfg.lr_scheduler == "constant"  # the paper's recipe by default
    with pytest.raises(EllaError, match="unknown key.*learning_rat"):
        build_config({"train_data_dir": "d", "learning_rat": 1})
    with pytest.raises(EllaError, match="train_batch_size in config must be int"):
        build_config({"train_data_dir": "d", "train_batch_size": "big"})
    with pytest.raises(EllaError, match="exactly one of"):
        build_config({})
    from ella.cli import main as cli

    assert cli(["train", "--train_data_dir", "d", "--resolution", "33"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def train_argv(tiny_sd, tiny_t5, folder: Path, out: Path, steps: int = 3) -> list[str]:
    """``ella train`` on the tiny models, as a launcher's argument list (``-m ella.cli train ...``)."""
    return [
        "-m", "ella.cli", "train",
        "--pretrained_model_name_or_path", str(tiny_sd),
        "--llm_name_or_path", str(tiny_t5),
        "--train_data_dir", str(folder),
        "--output_dir", str(out),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(steps),
        "--connector_layers", "1",
        "--connector_heads", "4",
        "--connector_num_latents", "8",
        "--llm_max_length", "16",
        "--dataloader_num_workers", "0",
        "--report_to", "none",
    ]  # fmt: skip


DIST_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def one_node(tiny_sd, tiny_t5, folder, tmp_path_factory) -> Path:
    """`torchrun --nproc_per_node 2`: DDP over two CPU processes (gloo), 2 steps; the reference of the runs below."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    done = subprocess.run(
        cmd + train_argv(tiny_sd, tiny_t5, folder, out, steps=2), env=DIST_ENV, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_two_process_ddp_on_cpu(one_node):
    """Each process of a DDP run keeps its own progress file, and they add up to the run's samples."""
    ranks = [json.loads((one_node / "checkpoint-2" / f"progress-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert sum(r["samples_seen"] for r in ranks) == 2 * 2 * 2  # two processes, batch 2 each, 2 steps
    assert (one_node / "ella.safetensors").is_file()


def test_a_sharded_llm_trains_what_a_replicated_one_trains(one_node, tiny_sd, tiny_t5, folder, tmp_path):
    """`--llm_fsdp`: the frozen LLM's weights sharded over the two processes (FSDP2), its features computed in the
    step. The memory plan is printed before loading, validation runs the sharded LLM on every process (one PNG),
    and the connector equals the replicated run's."""
    out = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    extra = ["--llm_fsdp", "--validation_prompts", "a red square", "--validation_steps", "2"]
    extra += ["--validation_inference_steps", "2"]
    done = subprocess.run(
        cmd + train_argv(tiny_sd, tiny_t5, folder, out, steps=2) + extra, env=DIST_ENV, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sharded over 2" in done.stdout
    assert [p.name for p in (out / "validation").iterdir()] == ["step-0000002.png"]
    a, b = load_file(one_node / "ella.safetensors"), load_file(out / "ella.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_two_nodes_on_one_host_train_what_one_node_of_two_processes_trains(
    one_node, tiny_sd, tiny_t5, folder, tmp_path
):
    """`torchrun --nnodes 2` (one process each, a localhost rendezvous, gloo): the multi-node recipe of the README.
    Both nodes finish every step, and the weights equal a one-node, two-process run's bit for bit: the same ranks,
    the same data shards, the same gradient all-reduce."""
    two_nodes, port = tmp_path / "two-nodes", _free_port()

    def node(rank: int) -> subprocess.Popen:
        launch = ["--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1"]
        launch += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *launch,
            *train_argv(tiny_sd, tiny_t5, folder, two_nodes, 2),
        ]
        return subprocess.Popen(argv, env=DIST_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    nodes = [node(0), node(1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-1500:] + outputs[1][-1500:]
    ranks = [json.loads((two_nodes / "checkpoint-2" / f"progress-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [2, 2]
    a, b = load_file(one_node / "ella.safetensors"), load_file(two_nodes / "ella.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_min_snr_weighting_matches_an_independent_formula(tiny_sd):
    """Min-SNR-5 loss = mean over samples of min(SNR, 5)/SNR × MSE, SNR = ᾱ/(1-ᾱ) (Hang et al. 2023)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from conftest import tiny_connector
    from ella.train.models import Dims

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    connector = tiny_connector(seed=2)
    latents, feats = torch.randn(6, 4, 4, 4), torch.randn(6, 5, 16)
    dims = Dims(16, 32, None, {})
    with torch.no_grad():
        weighted = train_mod.diffusion_loss(
            connector,
            unet,
            sched,
            latents,
            feats,
            None,
            dims=dims,
            snr_gamma=5.0,
            generator=torch.Generator().manual_seed(2),
        )
        g = torch.Generator().manual_seed(2)  # replay the same draws: noise, then timesteps
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (6,), generator=g)
        abar = sched.alphas_cumprod[t]
        noisy = abar.sqrt().view(-1, 1, 1, 1) * latents + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise
        pred = unet(noisy, t, encoder_hidden_states=connector(feats, t)).sample
        mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        snr = abar / (1 - abar)
        expected = (torch.clamp(snr, max=5.0) / snr * mse).mean()
    assert torch.allclose(weighted, expected, rtol=1e-5), (weighted, expected)
    assert (snr > 5).any()  # this seed draws low-noise timesteps, where the weight is below 1
    assert not torch.allclose(weighted, mse.mean(), rtol=1e-3)  # the weighting did something


def test_missing_hub_models_are_named_with_the_train_flags(folder, tmp_path, capsys):
    """Offline, both missing models are reported at once, with the flags `ella train` actually has."""
    from ella.cli import main as cli

    code = cli(
        [
            "train",
            "--train_data_dir",
            str(folder),
            "--output_dir",
            str(tmp_path / "run"),
            "--pretrained_model_name_or_path",
            "nobody/no-such-base",
            "--llm_name_or_path",
            "nobody/no-such-llm",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nobody/no-such-base" in err and "nobody/no-such-llm" in err
    assert "--pretrained_model_name_or_path DIR" in err and "--llm_name_or_path DIR" in err and "--base DIR" not in err


def test_a_wrapped_mlp_connector_still_masks_the_unet(tiny_sd):
    """DDP hides the connector's attributes behind .module: the MLP's text mask must still reach the UNet."""
    import torch.distributed as dist
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from torch.nn.parallel import DistributedDataParallel

    from conftest import UNET_DIM, tiny_connector
    from ella.train.models import Dims
    from ella.train.train import diffusion_loss

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(tiny_sd / "scheduler")
    mlp = tiny_connector(variant="mlp")
    dims = Dims(llm_hidden=16, cross_attention_dim=UNET_DIM, pooled_dim=None, unet_config=dict(unet.config))
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    features = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])

    def loss(connector, with_mask=True):
        return diffusion_loss(
            connector,
            unet,
            scheduler,
            latents,
            features,
            mask if with_mask else None,
            dims=dims,
            generator=torch.Generator().manual_seed(2),
        )

    bare = loss(mlp)
    assert not torch.equal(bare, loss(mlp, with_mask=False))  # the mask matters for this batch
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert torch.equal(loss(DistributedDataParallel(mlp)), bare)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unet_lora_under_a_frozen_connector_learns_and_loads_into_a_pipeline(tiny_sd, tiny_t5, folder, tmp_path):
    """--train_unet_lora with --freeze_connector: the loss falls, only the LoRA changes, the exported file is a
    diffusers LoRA that changes an ELLA pipeline's image, and unloading it gives the image back."""
    from ella import load_pipeline
    from ella.train.models import make_connector, read_dims

    cfg = tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "run", max_train_steps=30, learning_rate=1e-2)
    cfg.caption_dropout, cfg.checkpointing_steps = 0.0, 15
    torch.manual_seed(cfg.seed)
    init = tmp_path / "init.safetensors"
    make_connector(cfg, read_dims(cfg, None)).save_single_file(init)
    cfg.init_connector, cfg.train_unet_lora, cfg.freeze_connector = str(init), 4, True
    out = train_mod.main(cfg)

    assert load_file(out / "ella.safetensors").keys() == load_file(init).keys()
    assert all(torch.equal(load_file(out / "ella.safetensors")[k], v) for k, v in load_file(init).items())
    lora = out / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and (out / "checkpoint-15" / "unet_lora.safetensors").is_file()
    assert not any(p.name.startswith("model") and p.stat().st_size > 1e6 for p in (out / "checkpoint-15").iterdir())
    assert json.loads((out / "training.json").read_text())["unet_lora_rank"] == 4

    pipe = load_pipeline(tiny_sd, init, tiny_t5, device="cpu", dtype="float32")
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe("a red cat", generator=g, num_inference_steps=3, height=64, width=64, output_type="np").images

    plain = image()
    pipe.load_lora_weights(str(out))
    with_lora = image()
    pipe.unload_lora_weights()
    assert np.abs(with_lora - plain).max() > 1e-3
    assert np.array_equal(image(), plain)

    # the loss under the trained LoRA is lower than without it, on the same noise
    from ella.train.models import load_frozen

    unet, *_ = load_frozen(cfg, torch.float32, "cpu", need_vae=False, need_llm=False)
    before = eval_loss(cfg, init, folder)
    unet.load_lora_adapter(str(lora), prefix="unet")
    assert eval_loss(cfg, init, folder, unet=unet) < before


def test_freeze_connector_needs_a_lora_and_a_given_connector(tiny_sd, tiny_t5, folder, tmp_path):
    cfg = tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "run")
    cfg.freeze_connector = True
    with pytest.raises(EllaError, match="--freeze_connector trains only a UNet LoRA"):
        train_mod.main(cfg)
    assert not (tmp_path / "run").exists()


def test_a_unet_lora_run_resumes_to_the_same_lora(tiny_sd, tiny_t5, folder, tmp_path):
    """Checkpoints keep the LoRA (not the whole UNet); resuming from one reaches the uninterrupted run's LoRA."""
    import shutil

    def cfg_for(out: Path) -> TrainConfig:
        cfg = tiny_config(tiny_sd, tiny_t5, folder, out, max_train_steps=8, learning_rate=1e-2)
        cfg.checkpointing_steps, cfg.train_unet_lora = 4, 2
        return cfg

    whole = train_mod.main(cfg_for(tmp_path / "whole"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(whole / "checkpoint-4", resumed_dir / "checkpoint-4")
    cfg = cfg_for(resumed_dir)
    cfg.resume_from_checkpoint = "latest"
    resumed = train_mod.main(cfg)
    lora = "pytorch_lora_weights.safetensors"
    a, b = load_file(whole / lora), load_file(resumed / lora)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c, d = load_file(whole / "ella.safetensors"), load_file(resumed / "ella.safetensors")
    assert all(torch.equal(c[k], d[k]) for k in c)  # the connector trained jointly, and resumed exactly too


def test_ella_clip_training_joins_clip_first_and_clip_dropout_is_ella_mode(
    tiny_sd, tiny_t5, folder, tmp_path, monkeypatch
):
    """--condition_mode ella+clip: every UNet call gets CLIP's 77 tokens then the connector's, as the pipeline joins
    them; a dropped sample's CLIP keys are masked, which gives the UNet exactly what `ella` mode gives it."""
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states=None, **kw):
        seen.append((encoder_hidden_states.detach().clone(), kw.get("encoder_attention_mask")))
        return forward(self, sample, timestep, encoder_hidden_states, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    cfg = tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "run", max_train_steps=6)
    cfg.condition_mode, cfg.clip_dropout = "ella+clip", 0.5
    out = train_mod.main(cfg)
    assert (out / "ella.safetensors").is_file()
    from transformers import CLIPTokenizer

    latents, n = cfg.connector_num_latents, CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer").model_max_length
    assert seen and all(tokens.shape[1] == n + latents for tokens, _ in seen)
    masks = torch.cat([m for _, m in seen])
    assert set(masks[:, :n].unique().tolist()) == {0.0, 1.0}  # both kept and dropped CLIP parts occurred
    assert (masks[:, n:] == 1).all() and (masks[:, :n] == masks[:, :1]).all()  # the whole CLIP part, per sample

    # a dropped sample is ella mode: CLIP keys masked out == no CLIP keys at all
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    torch.manual_seed(0)
    x, ella = torch.randn(2, 4, 8, 8), torch.randn(2, latents, unet.config.cross_attention_dim)
    clip = torch.randn(2, n, unet.config.cross_attention_dim)
    mask = torch.cat([torch.zeros(2, n), torch.ones(2, latents)], dim=1)
    with torch.no_grad():
        joined = unet(x, 500, torch.cat([clip, ella], 1), encoder_attention_mask=mask).sample
        alone = unet(x, 500, ella).sample
    assert torch.allclose(joined, alone, atol=1e-5)


def test_ella_clip_training_refuses_a_bad_mode(tiny_sd, tiny_t5, folder, tmp_path):
    with pytest.raises(EllaError, match="--condition_mode must be ella or ella\\+clip"):
        tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "run", condition_mode="clip")


def test_several_llm_layers_train_and_the_pipeline_reads_the_same_ones(tiny_sd, tiny_t5, folder, tmp_path):
    """--llm_layers -1 -2: the connector reads both layers' states side by side, records them in its config, and
    load_pipeline makes the pipeline read those layers (the UNet's condition equals the connector on them)."""
    from ella import load_pipeline
    from ella.text import encode_text

    cfg = tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "run", llm_layers=[-1, -2])
    out = train_mod.main(cfg)
    pipe = load_pipeline(tiny_sd, out / "ella.safetensors", tiny_t5, device="cpu", dtype="float32")
    assert pipe.connector.config.llm_layers == [-1, -2] and pipe.config.llm_hidden_layer == [-1, -2]
    assert pipe.connector.config.input_dim == 2 * pipe.llm.config.d_model
    with torch.no_grad():
        ids = pipe.llm_tokenizer(["a red cat"], padding="max_length", max_length=16, return_tensors="pt")
        states = pipe.llm(**ids, output_hidden_states=True).hidden_states
        feats = encode_text(pipe.llm, pipe.llm_tokenizer, ["a red cat"], max_length=16, hidden_layer=[-1, -2])
    assert torch.equal(feats.hidden_states, torch.cat([states[-1], states[-2]], dim=-1))
    seen = []
    pipe.unet.register_forward_hook(lambda m, a, k, o: seen.append(k["encoder_hidden_states"]), with_kwargs=True)
    pipe.register_to_config(llm_max_length=16)
    pipe.set_progress_bar_config(disable=True)
    pipe("a red cat", num_inference_steps=2, height=64, width=64, guidance_scale=1.0, output_type="np")
    assert torch.allclose(seen[0], pipe.connector(feats.hidden_states, pipe.scheduler.timesteps[0]), atol=1e-5)
    with pytest.raises(EllaError, match="trained on LLM layers"):
        load_pipeline(tiny_sd, out / "ella.safetensors", tiny_t5, device="cpu", dtype="float32", hidden_layer=-1)


def test_llm_layers_need_two_layers_and_no_cached_features(tiny_sd, tiny_t5, folder, tmp_path):
    with pytest.raises(EllaError, match="two or more layers"):
        tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "run", llm_layers=[-1])
    with pytest.raises(EllaError, match="not both flags"):
        tiny_config(tiny_sd, tiny_t5, folder, tmp_path / "run", llm_layers=[-1, -2], llm_hidden_layer=-1)
