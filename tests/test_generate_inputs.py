"""`ella generate` and the connector loader against hostile input: one clear line, before any model loads,
and nothing a user wrote is ever lost or replaced."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import assert_refused
from ella.connector import CONFIG_METADATA_KEY, CheckpointMismatchError, TimestepAwareSemanticConnector
from ella.errors import EllaError
from ella.sample import SampleSettings, generate_to_dir, open_image


class Reached(Exception):
    """Raised by the stand-in model loaders: the command got past its checks."""


def reached(*args, **kwargs):
    raise Reached


@pytest.fixture()
def ella_cli(monkeypatch, run_cli):
    """``ella ARGS...`` in this process: (exit code, stdout, stderr). ``loads=False`` replaces every model
    loader, so a check that came after a load would surface as ``Reached`` instead of exit 2."""
    import ella.loading

    def call(*argv: str, loads: bool = True) -> tuple[int, str, str]:
        with monkeypatch.context() as m:
            if not loads:
                for name in ("load_connector", "load_llm", "load_base"):
                    m.setattr(ella.loading, name, reached)
            return run_cli(*argv)

    return call


@pytest.fixture(scope="module")
def models(tiny_sd, tiny_ella_file, tiny_t5):
    return ["--base", str(tiny_sd), "--ella", str(tiny_ella_file), "--llm", str(tiny_t5), "--device", "cpu"]


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which the json module accepts by default but JSON does not)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_two_runs_into_one_folder_never_replace_each_other(ella_cli, models, tmp_path):
    common = ["a red cat", "--steps", "2", "--width", "64", "--height", "64", "--seed", "5", *models]
    code, _, err = ella_cli("generate", *common, "--guidance", "3", "--out", str(tmp_path))
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, out, err = ella_cli("generate", *common, "--guidance", "9", "--out", str(tmp_path))
    assert code == 0, err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert all(after[name] == data for name, data in before.items())  # the first run's files are untouched
    assert sorted(after) == [
        "000-a_red_cat-seed5.json",
        "000-a_red_cat-seed5.png",
        "001-a_red_cat-seed5.json",
        "001-a_red_cat-seed5.png",
    ]
    guidance = [strict_json((tmp_path / f"00{i}-a_red_cat-seed5.json").read_text())["guidance"] for i in (0, 1)]
    assert guidance == [3.0, 9.0]
    assert out.split() == [str(tmp_path / "001-a_red_cat-seed5.png")]  # printed as it is saved


def test_an_interrupted_run_keeps_every_finished_batch(pipe, tmp_path):
    calls = []
    real_call = type(pipe).__call__

    def flaky(self, *args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_call(self, *args, **kwargs)

    settings = SampleSettings(steps=2, width=64, height=64, num_images=5, batch_size=2)
    type(pipe).__call__ = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_to_dir(pipe, ["a blue dog"], settings, tmp_path, {})
    finally:
        type(pipe).__call__ = real_call
    assert calls == [2, 2]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "000-a_blue_dog-seed1001.png",
        "001-a_blue_dog-seed1002.png",
    ]
    for png in tmp_path.glob("*.png"):  # each saved image is whole and has its sidecar
        assert Image.open(png).size == (64, 64)
        assert strict_json(png.with_suffix(".json").read_text())["seed"] in (1001, 1002)


def test_ctrl_c_exits_130_with_one_line(ella_cli, monkeypatch, tmp_path, models):
    import ella.loading
    import ella.sample

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ella.sample, "generate_to_dir", interrupted)
    monkeypatch.setattr(ella.loading, "load_pipeline", lambda *a, **k: object())
    code, _, err = ella_cli("generate", "a cat", "--out", str(tmp_path), *models)
    assert code == 130 and err.strip() == "ella: interrupted"


def test_sidecars_are_strict_json(ella_cli, models, tmp_path):
    # DPM-Solver's config holds -inf (lambda_min_clipped): the sidecar must still be JSON every parser reads.
    args = ["a cat", "--steps", "2", "--width", "64", "--height", "64", *models, "--out", str(tmp_path)]
    code, _, err = ella_cli("generate", *args)
    assert code == 0, err
    meta = strict_json(next(tmp_path.glob("*.json")).read_text())
    assert meta["scheduler"] == "DPMSolverMultistepScheduler"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--guidance", "nan"], "guidance must be a finite number >= 0"),
        (["--guidance", "inf"], "guidance must be a finite number >= 0"),
        (["--seed", str(2**70)], "seed must be in [0, 2**64)"),
        (["--seed", "-1"], "seed must be in [0, 2**64)"),
        (["--width", "0"], "width and height must be positive multiples of 8; got 0x512"),
        (["--width", "100000"], "width and height must be at most 4096"),
        (["--steps", "5000"], "steps must be at most 1000"),
        (["--steps", "100000"], "steps must be at most 1000"),
        (["--num-images", "1000000"], "1000000 images of 512x512 need up to"),
        (["--batch-size", "0"], "batch size must be at least 1"),
        (["--strength", "0.5"], "--strength applies to img2img/inpainting"),
        (["--device", "gpu9"], "unknown device 'gpu9'"),
        (["--device", "cuda:7"], "device 'cuda:7'"),
        (["--llm-layer", "99"], "--llm-layer 99: "),
        (["--lora", "style.safetensors:nan"], "the scale must be a finite number"),
        (["--base", "./no/such/model"], "base model './no/such/model': no such file or directory"),
    ],
)
def test_bad_values_are_one_line_before_any_model_loads(ella_cli, models, tmp_path, args, message):
    code, _, err = ella_cli("generate", "a cat", *models, *args, "--out", str(tmp_path / "out"), loads=False)
    assert_refused(code, err, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_out_that_is_a_file_or_under_one(ella_cli, models, tmp_path):
    a_file = tmp_path / "taken.txt"
    a_file.write_text("mine")
    for out, message in ((a_file, "is a file"), (a_file / "sub", "which is a file")):
        code, _, err = ella_cli("generate", "a cat", *models, "--out", str(out), loads=False)
        assert code == 2 and message in err, err
    assert a_file.read_text() == "mine"


def test_a_full_disk_is_refused_up_front(monkeypatch, tmp_path):
    import shutil

    from ella.sample import check_out_dir

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(EllaError, match=r"4 images of 64x64 need up to 0\.0 GB .* 0\.0 GB free"):
        check_out_dir(tmp_path, 4, 64, 64)


def test_loras_are_checked_before_loading(ella_cli, models, tmp_path):
    pickled = tmp_path / "style.bin"
    torch.save({"lora_A": torch.zeros(1)}, pickled)
    not_lora = tmp_path / "full.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 10)
    cases = [
        (pickled, "only .safetensors LoRAs are loaded"),
        (not_lora, "holds no LoRA tensors"),
        (corrupt, "is not a readable safetensors file"),
        (tmp_path / "missing.safetensors", "does not exist"),
    ]
    for lora, message in cases:
        code, _, err = ella_cli("generate", "a cat", *models, "--lora", str(lora), "--out", str(tmp_path), loads=False)
        assert code == 2 and message in err, err


def test_init_images_bombs_and_16_bit(tmp_path, monkeypatch):
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(grey16)
    assert Image.open(grey16).mode.startswith("I")
    pixels = np.asarray(open_image(str(grey16), "image"))
    assert pixels.shape == (16, 16, 3) and np.all(np.abs(pixels.astype(int) - 128) <= 1)  # mid-grey, not white

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 16x16 image now counts as a bomb
    with pytest.raises(EllaError, match="too large to open safely"):
        open_image(str(grey16), "image")
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(EllaError, match="cannot read image"):
        open_image(str(not_image), "image")


def test_connector_metadata_is_checked_before_anything_is_allocated(tmp_path):
    tiny = TimestepAwareSemanticConnector(
        width=32, layers=1, heads=4, num_latents=4, input_dim=16, time_channel=32, time_embed_dim=24
    )
    tensors = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    lying = tmp_path / "lying.safetensors"
    save_file(tensors, str(lying), metadata={CONFIG_METADATA_KEY: json.dumps({"width": 65536, "layers": 64})})
    # Run in a process whose address space is capped at 4 GB: building the claimed model would need ~51 GB.
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30));"
        "from ella.connector import TimestepAwareSemanticConnector, CheckpointMismatchError\n"
        "try:\n"
        f"    TimestepAwareSemanticConnector.from_single_file({str(lying)!r})\n"
        "except CheckpointMismatchError as err:\n"
        "    print('refused:', str(err)[:200])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "does not fit the connector" in done.stdout

    for metadata, message in (("{not json", "is not valid JSON"), ('{"widht": 32}', "unknown keys ['widht']")):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={CONFIG_METADATA_KEY: metadata})
        with pytest.raises(CheckpointMismatchError, match=message.replace("[", r"\[").replace("]", r"\]")):
            TimestepAwareSemanticConnector.from_single_file(bad)

    honest = tmp_path / "honest.safetensors"
    tiny.save_single_file(honest)
    loaded = TimestepAwareSemanticConnector.from_single_file(honest)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tiny.state_dict().items())
    assert loaded.dtype == torch.float32 and not any(p.is_meta for p in loaded.parameters())
    assert TimestepAwareSemanticConnector.from_single_file(honest, torch_dtype=torch.float16).dtype == torch.float16


def test_generate_never_imports_the_toy_world_and_the_parser_never_probes_cuda(tmp_path):
    code = (
        "import sys, torch\n"
        "def boom(*a, **k): raise AssertionError('CUDA probed while building the parser')\n"
        "probes = torch.cuda.is_available, torch.cuda.device_count\n"
        "torch.cuda.is_available = torch.cuda.device_count = boom\n"
        "import ella.cli\n"
        "for argv in (['generate'], ['train'], ['cache'], ['bench']):\n"
        "    ella.cli.build_parser(argv)\n"
        "torch.cuda.is_available, torch.cuda.device_count = probes\n"
        f"code = ella.cli.main(['generate', 'a cat', '--steps', '0', '--out', {str(tmp_path)!r}])\n"
        "print(code, sorted(m for m in sys.modules if m.startswith('ella.shapes')))\n"
        "torch.cuda.is_available = torch.cuda.device_count = boom\n"
        "for argv in (['shapes', 'reproduce'], ['demo']):\n"
        "    ella.cli.build_parser(argv)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "2 []"
