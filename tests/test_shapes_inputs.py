"""Hostile input to the shapes commands: one `ella: error:` line, exit 2, before any work or model load."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import ella
import ella.shapes.cli as shapes_cli
import ella.shapes.demo as demo
from conftest import assert_refused
from ella.cli import build_parser
from ella.cli import main as cli


def refused(capsys, argv: list[str], match: str) -> str:
    """Run ``argv``; it must fail with exit 2 and exactly one error line containing ``match``."""
    capsys.readouterr()
    code = cli(argv)
    err = capsys.readouterr().err
    assert_refused(code, err, match)
    return err.strip()


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--n-train", "0"], "--n-train must be an integer >= 1; got 0"),
        (["--shard-size", "0"], "--shard-size must be an integer >= 1; got 0"),
        (["--vae-steps", "0"], "--vae-steps must be an integer >= 1"),
        (["--base-steps", "-3"], "--base-steps must be an integer >= 1"),
        (["--connector-steps", "0"], "--connector-steps must be an integer >= 1"),
        (["--connector-batch", "0"], "--connector-batch must be an integer >= 1"),
        (["--base-warmup", "-1"], "--base-warmup must be an integer >= 0"),
        (["--eval-items", "0"], "--eval-items must be an integer >= 1"),
        (["--eval-steps", "1001"], "--eval-steps must be an integer in [1, 1000]"),
        (["--log-every", "0"], "--log-every must be an integer >= 1"),
        (["--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
        (["--seed", str(2**32)], "--seed must be an integer in [0, 4294967295]"),
        (["--vae-lr", "0"], "--vae-lr must be > 0"),
        (["--base-lr", "nan"], "--base-lr must be a finite number (> 0); got nan"),
        (["--connector-lr", "inf"], "--connector-lr must be a finite number (> 0); got inf"),
        (["--base-caption-dropout", "1.5"], "--base-caption-dropout must be in [0, 1]"),
        (["--base-caption-dropout", "-0.1"], "--base-caption-dropout must be in [0, 1]"),
        (["--eval-guidance", "-1"], "--eval-guidance must be >= 0"),
        (["--stop-at", "nan"], "--stop-at must be a finite number"),
        (["--stop-at", "0"], "--stop-at must be a Unix time, > 0; got 0.0"),
        (["--variants", "tsc", "tsc"], "--variants names a variant twice"),
        (["--variants", "lstm"], "unknown connector variant(s) ['lstm']"),
        (["--device", "gpu9"], "unknown device 'gpu9'"),
    ],
)
def test_reproduce_refuses_a_bad_value_before_any_work(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    refused(capsys, ["shapes", "reproduce", "--smoke", "--out", str(out), *flags], match)
    assert not out.exists()  # nothing written, nothing trained


def test_reproduce_refuses_an_out_that_is_a_file_or_under_one_and_a_world_of_other_values(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("keep me")
    refused(capsys, ["shapes", "reproduce", "--smoke", "--out", str(afile)], "is a file")
    refused(capsys, ["shapes", "reproduce", "--smoke", "--out", str(afile / "run")], "which is a file")
    assert afile.read_text() == "keep me"
    run = tmp_path / "run"
    (run / "world").mkdir(parents=True)
    (run / "world" / "done.json").write_text(json.dumps({"n_train": 24, "seed": 0}))
    refused(capsys, ["shapes", "reproduce", "--smoke", "--out", str(run), "--n-train", "30"], "holds a world of 24")
    assert sorted(p.name for p in run.rglob("*")) == ["done.json", "world"]


def test_reproduce_needs_the_train_extra_and_says_so_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # as if `pip install 'ella-diffusion[train]'` never ran
    out = tmp_path / "run"
    refused(capsys, ["shapes", "reproduce", "--smoke", "--out", str(out)], "pip install 'ella-diffusion[train]'")
    assert not out.exists()


def test_reproduce_under_a_launcher_refuses_a_numbered_gpu_and_a_bad_world_size(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "two")
    refused(capsys, ["shapes", "reproduce", "--smoke", "--out", str(out)], "WORLD_SIZE='two' is not a number")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a two-GPU machine, as far as the check sees
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    refused(capsys, ["shapes", "reproduce", "--smoke", "--out", str(out), "--device", "cuda:1"], "its own GPU")
    assert not out.exists()


def test_parsing_reproduce_never_asks_cuda_and_types_every_flag(monkeypatch):
    """The flags come from Recipe's fields; building them (importing the module afresh) must not probe CUDA."""
    build_parser(["shapes", "reproduce"])  # everything else imported first, as it would be
    monkeypatch.setattr(ella, "shapes", ella.shapes)  # the package attribute comes back too
    for name in [m for m in sys.modules if m == "ella.shapes" or m.startswith("ella.shapes.")]:
        monkeypatch.delitem(sys.modules, name)  # re-executed below; the originals come back after the test

    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA probed while building the parser")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", no_cuda)
    parser = build_parser(["shapes", "reproduce"])
    args = parser.parse_args(
        ["shapes", "reproduce", "--compile", "false", "--stop-at", "1.5e9", "--seed", "3", "--vae-lr", "2e-3"]
        + ["--device", "cuda", "--variants", "tsc", "mlp"]
    )
    assert (args.compile, args.stop_at, args.seed, args.vae_lr) == (False, 1.5e9, 3, 2e-3)
    assert (args.device, args.variants, args.n_train, args.smoke) == ("cuda", ["tsc", "mlp"], None, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["shapes", "reproduce", "--compile", "maybe"])


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test loudly: a refusal must come before it."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(demo, "load_shapes_pipeline", load)
    monkeypatch.setattr(shapes_cli, "load_shapes_pipeline", load)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--items", "0"], "--items must be an integer in [1, 100]"),
        (["--items", "101"], "--items must be an integer in [1, 100]"),
        (["--steps", "0"], "--steps must be an integer in [1, 1000]"),
        (["--steps", "1001"], "--steps must be an integer in [1, 1000]"),
        (["--seed", "-1"], "--seed must be in [0, 2**64)"),
        (["--seed", str(2**64 - 2)], "--seed must be in [0, 2**64)"),  # 4 items: seeds up to seed + 3
    ],
)
def test_demo_refuses_bad_numbers_before_loading(tmp_path, capsys, no_model_load, flags, match):
    out = tmp_path / "demo.png"
    refused(capsys, ["demo", "--out", str(out), *flags], match)
    assert not out.exists()


def test_demo_refuses_an_out_that_is_a_directory_or_under_a_file(tmp_path, capsys, no_model_load):
    refused(capsys, ["demo", "--out", str(tmp_path)], "is a directory; give the PNG file")
    afile = tmp_path / "file"
    afile.write_text("keep me")
    refused(capsys, ["demo", "--out", str(afile / "demo.png")], "which is a file")
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize(
    "flags",
    [
        ["--scheduler", "ddim"],
        ["--dtype", "float16"],
        ["--llm-layer", "2"],
        ["--max-length", "64"],
        ["--flexible"],
        ["--base", "runwayml/stable-diffusion-v1-5"],
        ["--ella", "ella.safetensors"],
        ["--llm", "google/flan-t5-xl"],
        ["--mode", "ella+clip"],
        ["--strength", "0"],
        ["--init-image", "in.png"],
        ["--mask", "mask.png"],
        ["--controlnet", "lllyasviel/sd-controlnet-canny"],
        ["--control-image", "edges.png"],
        ["--lora", "style.safetensors"],
        ["--base-config", "sd15"],
    ],
)
def test_generate_model_shapes_refuses_every_flag_it_would_ignore(tmp_path, capsys, no_model_load, flags):
    flag = flags[0] if flags[0] != "--mode" else "--mode ella+clip"
    argv = ["generate", "a red circle", "--model", "shapes", "--out", str(tmp_path / "out"), *flags]
    refused(capsys, argv, f"{flag} cannot be used with --model")


def test_generate_model_shapes_refuses_other_sizes_and_names_all_ignored_flags(tmp_path, capsys, no_model_load):
    out = str(tmp_path / "out")
    for flags in (["--width", "128"], ["--height", "32"]):
        refused(capsys, ["generate", "a red circle", "--model", "shapes", "--out", out, *flags], "only the 64x64")
    argv = ["generate", "a red circle", "--model", "shapes", "--out", out, "--scheduler", "ddim", "--dtype", "float16"]
    refused(capsys, argv, "--scheduler, --dtype cannot be used")
    # the size it was trained at passes the checks and reaches the (here forbidden) model load
    with pytest.raises(AssertionError, match="a model was loaded"):
        cli(["generate", "a red circle", "--model", "shapes", "--out", out, "--width", "64", "--height", "64"])
