"""`ella train` / `ella cache` against hostile input: each refusal is one line, comes before any model loads
where it can, and loses nothing that was already on disk."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ella.cli import build_parser
from ella.cli import main as cli
from ella.errors import EllaError, MissingExtraError
from ella.train import cache as cache_mod
from ella.train import train as train_mod
from ella.train.checkpoint import RUN_FILES
from ella.train.config import RANGES, TRAIN_PACKAGES, TrainConfig, _field_type, build_config, config_from_args
from test_train import make_folder, tiny_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "folder")


@pytest.fixture()
def no_models(monkeypatch):
    """Any attempt to load the frozen models (trainer) or the VAE (cache) fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("models were loaded before the input was checked")

    monkeypatch.setattr(train_mod, "load_frozen", forbidden)
    monkeypatch.setattr(cache_mod.AutoencoderKL, "from_pretrained", forbidden)


def one_line_error(capsys) -> str:
    """The CLI's stderr: exactly one line, ``ella: error: ...``."""
    err = capsys.readouterr().err
    assert err.startswith("ella: error: ") and err.count("\n") == 1, err
    return err


def strict_json(path: Path):
    """json.loads that refuses NaN / Infinity, as strict JSON readers (browsers, jq, Go …) do."""

    def refuse(constant):
        raise AssertionError(f"{path} contains {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""

    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s: the run hangs")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------- the [train] extra


@pytest.mark.parametrize("module", TRAIN_PACKAGES)
def test_a_missing_train_extra_is_one_line_for_train_and_cache(
    module, folder, tmp_path, monkeypatch, no_models, capsys
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert cli(["train", "--train_data_dir", str(folder), "--output_dir", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert f"needs '{module}'" in err and "pip install 'ella-diffusion[train]'" in err
    assert cli(["cache", "--train_data_dir", str(folder), "--output", str(tmp_path / "cache")]) == 2
    assert "pip install 'ella-diffusion[train]'" in one_line_error(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing made either
    with pytest.raises(MissingExtraError, match=module):  # the Python entry point checks it too
        train_mod.main(build_config({"train_data_dir": str(folder), "output_dir": str(tmp_path / "run")}))


def test_without_the_extra_the_package_still_imports_and_the_cli_says_what_to_install(folder):
    """A fresh process where none of the extra's packages import: importing the training modules must not
    need them (the CLI imports them to build its parsers), and `ella train` is one line, exit 2."""
    absent = [m for m in TRAIN_PACKAGES if m != "yaml"]  # pyyaml comes with huggingface_hub, a core dependency
    script = (
        "import sys\n"
        f"for name in {absent!r}:\n"
        "    sys.modules[name] = None\n"
        "import ella.train.cache, ella.train.train\n"
        "from ella.cli import main\n"
        f"sys.exit(main(['train', '--train_data_dir', {str(folder)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ella: error: ") and "pip install 'ella-diffusion[train]'" in last


def test_options_outside_the_extra_name_their_package(folder, monkeypatch, no_models, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert cli(["train", "--train_data_dir", str(folder), "--use_8bit_adam"]) == 2
    assert "--use_8bit_adam needs bitsandbytes" in one_line_error(capsys)


# ----------------------------------------------------------------------------------- numbers


def test_every_number_of_the_config_has_a_range():
    """validate() checks each int/float field against RANGES: a field without an entry would go unchecked."""
    numbers = {f.name for f in dataclasses.fields(TrainConfig) if _field_type(f)[0] in (int, float)}
    assert numbers == set(RANGES)
    build_config({"train_data_dir": "d"})  # the defaults themselves pass


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("learning_rate", "inf", "must be a finite number, got inf"),
        ("learning_rate", "nan", "must be a finite number, got nan"),
        ("learning_rate", "0", "must be positive"),
        ("adam_beta1", "5", r"must be in \[0, 1\), got 5.0"),
        ("adam_beta2", "1", r"must be in \[0, 1\)"),
        ("adam_epsilon", "0", "must be positive"),
        ("adam_weight_decay", "-0.01", "must be 0 or more"),
        ("max_grad_norm", "0", "must be positive"),
        ("ema_decay", "1", r"must be in \(0, 1\)"),
        ("snr_gamma", "-5", "must be positive"),
        ("noise_offset", "-inf", "must be a finite number"),
        ("caption_dropout", "1.5", r"probability in \[0, 1\]"),
        ("max_train_minutes", "nan", "must be a finite number"),
        ("max_train_minutes", "0", "must be positive"),
        ("lr_warmup_steps", "-1", "must be 0 or more"),
        ("seed", "-1", r"must be in \[0, 2\*\*32\)"),
        ("seed", str(2**32), r"must be in \[0, 2\*\*32\)"),
        ("validation_guidance_scale", "inf", "must be a finite number"),
        ("dataloader_num_workers", "-1", "must be 0 .* or more, got -1"),
        ("max_consecutive_skipped", "0", "must be at least 1"),
        ("checkpointing_steps", "0", "must be at least 1"),
        ("resolution", "7", "multiple of 8"),
        ("lr_scheduler", "warp", "must be one of linear, cosine"),
    ],
)
def test_out_of_range_numbers_are_one_line_naming_the_flag(flag, value, message, folder, no_models, capsys):
    assert cli(["train", "--train_data_dir", str(folder), f"--{flag}={value}"]) == 2  # = lets "-inf" through
    err = one_line_error(capsys)
    assert f"--{flag}" in err and re.search(message, err), err


def test_yaml_nan_and_wrong_types_are_caught_too(tmp_path):
    (tmp_path / "run.yaml").write_text("train_data_dir: d\nlearning_rate: .nan\n")
    args = type("Args", (), {"config": str(tmp_path / "run.yaml")})()
    with pytest.raises(EllaError, match="--learning_rate must be a finite number, got nan"):
        config_from_args(args)
    with pytest.raises(EllaError, match="--learning_rate must be a number, got '1e-4'"):
        TrainConfig(train_data_dir="d", learning_rate="1e-4").validate()  # the Python API, unconverted
    with pytest.raises(EllaError, match="--seed must be an integer, got True"):
        TrainConfig(train_data_dir="d", seed=True).validate()


# ----------------------------------------------------------------------------------- the output directory


@pytest.fixture(scope="module")
def finished_run(tiny_sd, tiny_t5, folder, tmp_path_factory) -> Path:
    """A real 2-step run with a checkpoint at step 2 (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_mod.main(tiny_config(tiny_sd, tiny_t5, folder, out, max_train_steps=2, checkpointing_steps=2))
    return out


def test_everything_a_run_writes_is_strict_json(finished_run):
    files = sorted(finished_run.rglob("*.json"))
    assert {"training.json", "progress-rank0.json", "config.json"} <= {f.name for f in files}
    for file in files:
        strict_json(file)


def test_a_fresh_run_never_replaces_a_finished_one(finished_run, tiny_sd, tiny_t5, folder, tmp_path, no_models):
    run = shutil.copytree(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(EllaError, match=r"already holds a training run \(checkpoint-2, ella.safetensors") as err:
        train_mod.main(tiny_config(tiny_sd, tiny_t5, folder, run))
    assert "--resume_from_checkpoint latest" in str(err.value) and "new --output_dir" in str(err.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("held", ["checkpoint-7", *RUN_FILES])
def test_each_kind_of_run_output_is_refused_without_resume(held, folder, tmp_path, no_models, capsys):
    out = tmp_path / "run"
    out.mkdir()
    if held in ("checkpoint-7", "connector"):
        (out / held).mkdir()
    else:
        (out / held).write_text("{}")
    args = ["train", "--train_data_dir", str(folder), "--output_dir", str(out)]
    assert cli(args) == 2
    err = one_line_error(capsys)
    assert held in err and "--resume_from_checkpoint latest" in err
    if held != "checkpoint-7":  # weights without a checkpoint to continue from: `latest` can't continue them
        assert cli([*args, "--resume_from_checkpoint", "latest"]) == 2
        assert "no checkpoint to continue from" in one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == [held]  # nothing written, nothing removed


@pytest.mark.parametrize("state", ["missing", "empty", "empty+latest", "logs only"])
def test_new_or_empty_directories_start_fresh(state, tiny_sd, tiny_t5, folder, tmp_path, monkeypatch):
    """Past the output check, the run goes on to load its models (stopped there by this test)."""

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(train_mod, "load_frozen", stop)
    out = tmp_path / "run"
    if state != "missing":
        out.mkdir()
    if state == "logs only":  # a run killed before its first checkpoint leaves only tracker logs
        (out / "logs").mkdir()
    cfg = tiny_config(tiny_sd, tiny_t5, folder, out, resume_from_checkpoint="latest" if "latest" in state else None)
    with pytest.raises(Reached):
        train_mod.main(cfg)


# ----------------------------------------------------------------------------------- damaged checkpoints


def _write_bad_rng(file: Path) -> None:
    states = torch.load(file, weights_only=False)
    states["torch_manual_seed"] = torch.zeros(3, dtype=torch.uint8)  # not a generator state: can't be applied
    torch.save(states, file)


#: name -> (how to damage checkpoint-2, the error, whether it can only be found once the models are loaded)
DAMAGE = {
    "progress not JSON": (
        lambda c: (c / "progress-rank0.json").write_text('{"global_step": 2,'),
        "progress-rank0.json is not valid JSON",
        False,
    ),
    "progress incomplete": (
        lambda c: (c / "progress-rank0.json").write_text('{"global_step": -1}'),
        "progress-rank0.json is not a training progress record",
        False,
    ),
    "RNG file garbage": (
        lambda c: (c / "random_states_0.pkl").write_bytes(b"garbage"),
        "random_states_0.pkl is not a readable RNG state",
        False,
    ),
    "RNG state invalid": (
        lambda c: _write_bad_rng(c / "random_states_0.pkl"),
        "random_states_0.pkl holds RNG states that could not be restored",
        True,
    ),
    "weights truncated": (
        lambda c: (c / "model.safetensors").write_bytes(b"\x00" * 9),
        "could not load checkpoint .*checkpoint-2",
        True,
    ),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_a_clear_error_naming_the_file(
    kind, finished_run, tiny_sd, tiny_t5, folder, tmp_path, monkeypatch
):
    damage, message, needs_models = DAMAGE[kind]
    run = shutil.copytree(finished_run, tmp_path / "run")
    damage(run / "checkpoint-2")
    if not needs_models:
        monkeypatch.setattr(train_mod, "load_frozen", lambda *a, **k: pytest.fail("models loaded first"))
    cfg = tiny_config(tiny_sd, tiny_t5, folder, run, max_train_steps=4, resume_from_checkpoint="latest")
    with pytest.raises(EllaError, match=message) as err:
        train_mod.main(cfg)
    assert "pass an earlier checkpoint to --resume_from_checkpoint" in str(err.value)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]  # it did not train on
    assert strict_json(run / "training.json")["steps"] == 2


# ----------------------------------------------------------------------------------- data where nothing reads


def test_a_source_where_nothing_decodes_stops_instead_of_spinning(tiny_sd, tiny_t5, tmp_path):
    data = make_folder(tmp_path / "broken", n=0, corrupt=3)
    with time_limit(120), pytest.raises(EllaError, match=r"a whole epoch of .*broken had no readable sample \(3 "):
        train_mod.main(tiny_config(tiny_sd, tiny_t5, data, tmp_path / "run"))
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "ella.safetensors").exists()


def test_a_long_unreadable_stretch_stops_after_max_consecutive_skipped(tiny_sd, tiny_t5, tmp_path):
    data = make_folder(tmp_path / "broken", n=0, corrupt=12)
    cfg = tiny_config(tiny_sd, tiny_t5, data, tmp_path / "run", max_consecutive_skipped=5)  # batches of 4
    with time_limit(120), pytest.raises(EllaError, match="the last 8 samples of .* were all unreadable"):
        train_mod.main(cfg)


def test_tar_shards_that_cannot_be_read_at_all_stop_too(tiny_sd, tiny_t5, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"{i:05d}.tar").write_bytes(b"not a tar archive" * 40)
    with time_limit(120), pytest.raises(EllaError, match=r"no readable sample \(0 unreadable"):
        train_mod.main(tiny_config(tiny_sd, tiny_t5, shards, tmp_path / "run"))


# ----------------------------------------------------------------------------------- NaN


def test_a_nan_loss_stops_the_run_before_anything_is_written(tiny_sd, tiny_t5, folder, tmp_path, monkeypatch):
    """The loss turns NaN at step 2 (between logging steps); the checkpoint due at step 3 is never written."""
    calls, original = [], train_mod.diffusion_loss

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train_mod, "diffusion_loss", poisoned)
    out = tmp_path / "run"
    cfg = tiny_config(tiny_sd, tiny_t5, folder, out, logging_steps=10, checkpointing_steps=3)
    with pytest.raises(EllaError, match="the loss became NaN or infinite between steps 1 and 3"):
        train_mod.main(cfg)
    assert len(calls) == 3 and not list(out.glob("checkpoint-*")) and not (out / "ella.safetensors").exists()


def test_nan_weights_are_caught_even_when_the_loss_looked_fine():
    from accelerate import Accelerator

    model = torch.nn.Linear(2, 2)
    flag = torch.zeros((), dtype=torch.bool)
    train_mod.check_finite(Accelerator(cpu=True), flag, model, 0, 5)  # all finite: no error
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(EllaError, match="the connector's weights became NaN or infinite between steps 0 and 5"):
        train_mod.check_finite(Accelerator(cpu=True), flag, model, 0, 5)


# ----------------------------------------------------------------------------------- ella cache


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolution", "7"], "--resolution must be a positive multiple of 8"),
        (["--resolution", "0"], "--resolution must be a positive multiple of 8"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--shard_size", "0"], "--shard_size must be at least 1"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be 0"),
        (["--seed", "-3"], "--seed must be in"),
        (["--output", "FILE"], "is not writable: .*blocker is a file"),
        (["--output", "FILE/cache"], "is not writable: .*blocker is a file"),
    ],
)
def test_cache_arguments_are_checked_before_models_load(flags, message, folder, tmp_path, no_models, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    flags = [f.replace("FILE", str(blocker)) for f in flags]
    args = ["cache", "--train_data_dir", str(folder), "--output", str(tmp_path / "cache"), *flags]
    assert cli(args) == 2
    assert re.search(message, one_line_error(capsys))
    with pytest.raises(EllaError, match=message):  # the same check, called as the library does
        cache_mod.check_cache_args(_cache_args(args))
    assert blocker.read_text() == "keep me"


def _cache_args(argv: list[str]):
    return build_parser(argv).parse_args(argv)


def test_cache_writes_strict_json_and_a_corrupt_resume_state_is_an_error(folder, tiny_sd, tmp_path):
    from diffusers import AutoencoderKL

    from ella.train.data import Augment, open_dataset

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    raw = Augment(resolution=16, caption_dropout=0.0)
    write_args = dict(batch_size=4, shard_size=4, progress=False)
    cache_mod.write_cache(open_dataset(str(folder), raw), tmp_path / "c", vae, **write_args)
    for file in (tmp_path / "c").glob("*.json"):
        strict_json(file)
    (tmp_path / "c" / "cache.json").unlink()
    (tmp_path / "c" / "cache.partial.json").write_text("{")
    with pytest.raises(EllaError, match="cache.partial.json is not the resume state"):
        cache_mod.write_cache(open_dataset(str(folder), raw), tmp_path / "c", vae, **write_args)
    assert load_file(tmp_path / "c" / "shard-00000.safetensors")["latents"].shape[0] == 4  # kept
