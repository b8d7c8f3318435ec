"""The ``ella`` command, run as a user runs it: a subprocess, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import ella


def run_ella(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ella.cli", *args], capture_output=True, text=True, env=full_env, timeout=300, **kwargs
    )


def test_version_and_help():
    out = run_ella("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ella-diffusion {ella.__version__}"
    out = run_ella("generate", "--help")
    assert out.returncode == 0
    for flag in (
        "--negative",
        "--steps",
        "--guidance",
        "--seed",
        "--width",
        "--height",
        "--num-images",
        "--out",
        "--base",
        "--ella",
        "--llm",
        "--device",
        "--dtype",
        "--max-length",
        "--flexible",
        "--scheduler",
    ):
        assert flag in out.stdout


@pytest.fixture(scope="module")
def models(tiny_sd, tiny_ella_file, tiny_t5):
    return ["--base", str(tiny_sd), "--ella", str(tiny_ella_file), "--llm", str(tiny_t5), "--device", "cpu"]


def test_generate_writes_pngs_and_reproducible_sidecars(models, tmp_path):
    args = [
        "a red cat on a blue chair",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--num-images",
        "2",
        "--seed",
        "42",
        "--negative",
        "blurry",
        "--scheduler",
        "euler",
        *models,
    ]
    first = run_ella("generate", *args, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    pngs = sorted((tmp_path / "a").glob("*.png"))
    assert [p.name for p in pngs] == [
        "000-a_red_cat_on_a_blue_chair-seed42.png",
        "001-a_red_cat_on_a_blue_chair-seed43.png",
    ]
    meta = json.loads(pngs[1].with_suffix(".json").read_text())
    assert meta["prompt"] == "a red cat on a blue chair" and meta["seed"] == 43
    assert meta["negative_prompt"] == "blurry" and meta["steps"] == 3 and meta["guidance"] == 12.0
    assert meta["scheduler"] == "EulerDiscreteScheduler" and meta["models"]["llm"] == models[5]
    assert meta["llm_max_length"] == 128 and meta["dtype"] == "float32"
    assert "Traceback" not in first.stderr
    assert not list((tmp_path / "a").glob(".*tmp"))  # atomic writes leave no temporaries
    plain = tmp_path / "plain.txt"
    plain.write_text("")  # atomic writes give the modes a plain write gives (mkstemp's are owner-only)
    assert {p.stat().st_mode & 0o777 for p in pngs} == {plain.stat().st_mode & 0o777}

    # The same command again: the same bytes.
    same = run_ella("generate", *args, "--out", str(tmp_path / "b"))
    assert same.returncode == 0, same.stderr
    assert [p.read_bytes() for p in sorted((tmp_path / "b").glob("*.png"))] == [p.read_bytes() for p in pngs]

    # Image 1 regenerated alone from its sidecar's seed: the same picture (batch size changes
    # float rounding in the UNet, so allow one 8-bit level).
    alone = list(args)
    alone[alone.index("--num-images") + 1], alone[alone.index("--seed") + 1] = "1", str(meta["seed"])
    assert run_ella("generate", *alone, "--out", str(tmp_path / "c")).returncode == 0
    regenerated = np.asarray(Image.open(next((tmp_path / "c").glob("*.png"))), dtype=int)
    assert np.abs(regenerated - np.asarray(Image.open(pngs[1]), dtype=int)).max() <= 1


def test_offline_missing_models_is_one_paragraph_each_not_a_traceback(tmp_path):
    out = run_ella("generate", "a cat", "--out", str(tmp_path), env={"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "Missing ELLA connector weights: 'QQGYLab/ELLA/ella-sd1.5-tsc-t5xl.safetensors'" in out.stderr
    assert "hf download QQGYLab/ELLA ella-sd1.5-tsc-t5xl.safetensors" in out.stderr
    assert "Missing LLM: 'google/flan-t5-xl'" in out.stderr and "hf download google/flan-t5-xl" in out.stderr
    assert "Missing base model: 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in out.stderr
    assert "HF_HUB_OFFLINE=1" in out.stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["a cat", "--width", "100"], "width and height must be positive multiples of 8; got 100x512"),
        (["  "], "prompt 0 is empty"),
        (["a cat", "--scheduler", "nonsense"], "unknown scheduler 'nonsense'"),
        (["a cat", "--dtype", "float8"], "unknown dtype 'float8'"),
        (["a cat", "--steps", "0"], "steps must be at least 1"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(models, tmp_path, args, message, capsys):
    """In this process (the exit status and the no-traceback rule of a real one are checked above, and each
    interpreter start costs seconds of imports): the error is the one line, and nothing was written."""
    from ella.cli import main

    assert main(["generate", *args, *models, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ella: error: {message}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_wrong_shape_checkpoint_is_explained(models, tmp_path):
    """ELLA weights whose width doesn't fit the UNet: refused before any image, with the reason."""
    import sys as _sys

    _sys.path.insert(0, os.path.dirname(__file__))
    from conftest import tiny_connector

    bad = tmp_path / "wide.safetensors"
    tiny_connector(width=48, heads=4).save_single_file(bad)
    args = list(models)
    args[args.index("--ella") + 1] = str(bad)
    out = run_ella(
        "generate", "a cat", "--steps", "2", "--width", "64", "--height", "64", *args, "--out", str(tmp_path / "o")
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "connector width 48 does not match the UNet's cross_attention_dim 32" in out.stderr
