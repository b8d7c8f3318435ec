"""``ella bench dpg generate | score``: bad input is one ``ella: error:`` line, exit 2, before any model loads."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import assert_refused
from ella.bench import run
from ella.bench.generate import make_grid

# the packaged DSG-1k file's known annotation slips are reported on every load; not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore::ella.bench.data.BenchmarkDataWarning")


class Reached(Exception):
    """Raised by the stand-in model loaders: the command got past its checks."""


def loader(what: str):
    def load(*args, **kwargs):
        raise Reached(what)

    return load


@pytest.fixture()
def ella_cli(monkeypatch, run_cli):
    """``ella ARGS...`` in this process with every model loader replaced: returns (exit code, stderr).

    A check that comes after a load would surface as ``Reached`` instead of exit 2.
    """
    monkeypatch.setattr(run, "load_pipeline", loader("pipeline"))
    monkeypatch.setattr(run, "load_plain_pipeline", loader("plain pipeline"))
    monkeypatch.setattr(run, "load_vqa", loader("VQA model"))
    # the process state comes right before the loads; a stand-in keeps accelerate's singleton out of the tests
    single = SimpleNamespace(device="cpu", process_index=0, num_processes=1, is_main_process=True)
    monkeypatch.setattr(run, "_state", lambda device: single)

    def call(*argv: str) -> tuple[int, str]:
        code, _, err = run_cli(*argv)
        return code, err

    return call


# --------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--limit", "-1"], "--limit must be at least 1"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--tile-size", "0"], "--tile-size must be a positive multiple of 8"),
        (["--tile-size", "-8"], "--tile-size must be a positive multiple of 8"),
        (["--tile-size", "100"], "got 100"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--guidance", "nan"], "--guidance must be a finite number >= 0; got nan"),
        (["--guidance", "inf"], "--guidance must be a finite number >= 0; got inf"),
        (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["--seed", "-1"], "--seed must be from 0 to 2**64 - 4"),
        (["--seed", str(2**64)], "--seed must be from 0 to 2**64 - 4"),
        (["--seed", str(2**64 - 3)], "tile k of every item uses seed + k"),  # tile 3 would need seed 2**64
        (["--device", "gpu9"], "unknown device 'gpu9'"),
    ],
)
def test_generate_refuses_bad_flags(ella_cli, tmp_path, flags, needle):
    code, err = ella_cli("bench", "dpg", "generate", "--out", str(tmp_path / "out"), "--benchmark", "dsg1k", *flags)
    assert_refused(code, err, needle)
    assert not (tmp_path / "out").exists()  # nothing written


def test_generate_refuses_an_out_that_is_a_file(ella_cli, tmp_path):
    (tmp_path / "out").write_text("keep me")
    code, err = ella_cli("bench", "dpg", "generate", "--out", str(tmp_path / "out"))
    assert_refused(code, err, f"--out {tmp_path / 'out'} is a file; expected a folder")
    assert (tmp_path / "out").read_text() == "keep me"


@pytest.mark.parametrize("pipeline", ["ella", "plain"])
def test_generate_accepts_the_edges(ella_cli, tmp_path, pipeline):
    """The checks refuse only what is wrong: the limits themselves get through to the model load."""
    flags = ["--limit", "1", "--tile-size", "8", "--steps", "1", "--guidance", "0", "--seed", str(2**64 - 4)]
    with pytest.raises(Reached, match="pipeline"):
        ella_cli("bench", "dpg", "generate", "--out", str(tmp_path / "out"), "--pipeline", pipeline, *flags)


# ------------------------------------------------------------------------------------------ score


@pytest.fixture()
def grids(tmp_path):
    """A folder with one DSG-1k grid, so the folder checks pass and score reaches the VQA load."""
    images = tmp_path / "images"
    images.mkdir()
    make_grid([Image.new("RGB", (8, 8))] * 4).save(images / "whoops_5.png")
    return images


def test_score_reaches_the_vqa_load_with_good_input(ella_cli, grids):
    with pytest.raises(Reached, match="VQA"):
        ella_cli("bench", "dpg", "score", str(grids), "--benchmark", "dsg1k", "--vqa", "blip")


def test_score_refuses_a_missing_or_file_images_folder(ella_cli, tmp_path):
    code, err = ella_cli("bench", "dpg", "score", str(tmp_path / "nope"), "--benchmark", "dsg1k")
    assert_refused(code, err, f"images folder {tmp_path / 'nope'} does not exist")
    (tmp_path / "file.png").write_bytes(b"")
    code, err = ella_cli("bench", "dpg", "score", str(tmp_path / "file.png"), "--benchmark", "dsg1k")
    assert_refused(code, err, "is a file; expected a folder of <item_id>.png 2x2 grids")


def test_score_refuses_a_folder_without_grids(ella_cli, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    code, err = ella_cli("bench", "dpg", "score", str(images), "--benchmark", "dsg1k")
    assert_refused(code, err, "holds none of the 1060 dsg1k grids", "ella bench dpg generate --benchmark dsg1k")
    # grids of another benchmark (DPG-Bench ids) are not DSG-1k's
    make_grid([Image.new("RGB", (8, 8))] * 4).save(images / "whoops5.png")
    code, err = ella_cli("bench", "dpg", "score", str(images), "--benchmark", "dsg1k")
    assert_refused(code, err, "holds none of the 1060 dsg1k grids")
    assert not (images / "report").exists() and not (images / ".vqa-cache").exists()


@pytest.mark.parametrize("flag", ["--out", "--cache"])
def test_score_refuses_output_folders_that_are_files(ella_cli, grids, tmp_path, flag):
    (tmp_path / "taken").write_text("keep me")
    code, err = ella_cli("bench", "dpg", "score", str(grids), "--benchmark", "dsg1k", flag, str(tmp_path / "taken"))
    assert_refused(code, err, f"{flag} {tmp_path / 'taken'} is a file; expected a folder")
    assert (tmp_path / "taken").read_text() == "keep me"


def test_score_refuses_a_default_report_path_that_is_a_file(ella_cli, grids):
    (grids / "report").write_text("keep me")
    code, err = ella_cli("bench", "dpg", "score", str(grids), "--benchmark", "dsg1k")
    assert_refused(code, err, f"the report folder {grids / 'report'} is a file")


def test_score_without_matplotlib_says_which_extra(ella_cli, grids, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed, even where it is
    code, err = ella_cli("bench", "dpg", "score", str(grids), "--benchmark", "dsg1k")
    assert_refused(code, err, "'matplotlib'", "pip install 'ella-diffusion[bench]'")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("latin-1", "is not UTF-8 text (line 2: byte 0xe9)"),
        ("duplicates", "duplicate (item_id, proposition_id) rows"),
    ],
)
def test_score_refuses_bad_question_files(ella_cli, grids, tmp_path, content, needle):
    header = "item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,"
    header += "question_natural_language\n"
    row = "whoops_5,a caf\u00e9,,{pid},0,entity,whole,entity - whole (caf\u00e9),Is there a caf\u00e9?\n"
    csv_path = tmp_path / "q.csv"
    if content == "latin-1":
        csv_path.write_bytes((header + row.format(pid=1)).encode("latin-1"))
    else:
        csv_path.write_text(header + row.format(pid=1) * 2, encoding="utf-8")
    code, err = ella_cli("bench", "dpg", "score", str(grids), "--csv", str(csv_path))
    assert_refused(code, err, str(csv_path), needle)
