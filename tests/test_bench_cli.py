"""``ella bench dpg generate | score | compare`` end to end, as a user runs them (subprocess, offline)."""

from __future__ import annotations

import json

from test_cli import run_ella
from test_vqa import build_tiny_blip_vqa


def test_generate_score_compare_dsg1k(tiny_sd, tiny_ella_file, tiny_t5, tmp_path, capsys):
    from ella.cli import main

    models = ["--base", str(tiny_sd), "--ella", str(tiny_ella_file), "--llm", str(tiny_t5), "--device", "cpu"]
    common = ["--benchmark", "dsg1k", "--limit", "2", "--tile-size", "32", "--steps", "2", *models]
    out = run_ella("bench", "dpg", "generate", "--out", str(tmp_path / "ella"), *common)
    assert out.returncode == 0, out.stderr
    grids = sorted(p.name for p in (tmp_path / "ella").glob("*.png"))
    assert len(grids) == 2
    manifest = json.loads((tmp_path / "ella" / "manifest.json").read_text())
    assert manifest["settings"]["seeds"] == [0, 1, 2, 3] and manifest["settings"]["pipeline"] == "ella"
    # the rest of the commands in this process (each interpreter start costs seconds of imports); the exit status
    # and streams of real processes are checked above and below
    assert main(["bench", "dpg", "generate", "--out", str(tmp_path / "ella"), *common]) == 0
    assert "wrote 0 grids" in capsys.readouterr().out  # resumed: nothing left to do

    blip = build_tiny_blip_vqa(tmp_path / "blip")
    score = run_ella(
        "bench",
        "dpg",
        "score",
        str(tmp_path / "ella"),
        "--benchmark",
        "dsg1k",
        "--vqa",
        f"blip:{blip}",
        "--device",
        "cpu",
    )
    assert score.returncode == 0, score.stderr
    report = json.loads((tmp_path / "ella" / "report" / "report.json").read_text())
    assert report["num_items_expected"] == 1060 and report["num_items"] == 2
    assert len(report["errors"]) == 1058  # every item without an image is listed, not silently dropped
    assert 0 <= report["overall"] <= 100 and report["settings"]["vqa"] == f"blip:{blip}"
    assert (tmp_path / "ella" / "report" / "categories.png").stat().st_size > 0
    assert (tmp_path / "ella" / ".vqa-cache").is_dir()

    report_json = str(tmp_path / "ella" / "report" / "report.json")
    capsys.readouterr()
    assert main(["bench", "dpg", "compare", report_json, report_json]) == 0
    assert "+0.00" in capsys.readouterr().out

    assert main(["bench", "dpg", "score", str(tmp_path / "ella"), "--vqa", f"blip:{blip}"]) == 2
    assert "download dpg_bench.csv" in capsys.readouterr().err


def test_a_bad_flag_is_one_line_and_exit_2_in_a_real_process(tmp_path):
    """In-process checks are in test_bench_inputs.py; here the exit status a shell sees."""
    out = run_ella("bench", "dpg", "generate", "--out", str(tmp_path / "out"), "--benchmark", "dsg1k", "--limit", "-1")
    assert out.returncode == 2 and out.stderr == "ella: error: --limit must be at least 1 (the first N items); got -1\n"
    assert not (tmp_path / "out").exists()
