"""Reports render the scorer's result faithfully: rounding, ordering, files, comparison and loading errors."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
from PIL import Image

from ella.bench.report import PAPER_ROWS, compare, load_result, paper_rows_with, to_markdown, write_report
from ella.errors import EllaError, MissingExtraError


def make_result(overall: float = 78.456, **settings) -> dict:
    return {
        "benchmark": "dpg",
        "overall": overall,
        "categories": {"entity": 81.234, "attribute": 77.0, "relation": 70.5555, "global": 85.0, "other": 60.0},
        "subcategories": {
            "entity - whole": 82.0,
            "attribute - color": 79.126,
            "attribute - shape": 71.0,
            "relation - spatial": 70.0,
        },
        "items": {"a1": {"score": 0.75, "tiles": [1.0, 0.5, 0.75, 0.75], "answers": [["yes"]] * 4}},
        "errors": [{"item_id": f"bad{i}", "error": "image missing"} for i in range(7)],
        "num_items": 1058,
        "num_items_expected": 1065,
        "settings": {"csv_blob": "abc123", "official_compat": False, "vqa_backend": "mplug", **settings},
    }


def test_markdown_content():
    md = to_markdown(make_result())
    assert "**Overall: 78.46**" in md
    assert "1058 / 1065" in md
    assert "Errors: 7" in md
    assert "`bad0`: image missing" in md and "`bad4`" in md and "`bad5`" not in md and "2 more" in md
    assert "not comparable" in md  # partial run is flagged
    assert "| entity | 81.23 |" in md and "| relation | 70.56 |" in md
    assert "| attribute - color | 79.13 |" in md
    l2 = [line.split("|")[1].strip() for line in md.splitlines() if " - " in line and line.startswith("| ")]
    assert l2 == sorted(l2)
    assert "vqa_backend: `mplug`" in md


def test_paper_rows_ordering_with_user_row():
    md = to_markdown(make_result(overall=79.0))
    section = md.split("## Published DPG-Bench")[1]
    names = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]
    assert names == ["SD3-Medium", "FLUX.1-dev", "DALL-E 3", "ELLA-SDXL", "**yours**", "ELLA-SD1.5", "SDXL", "SD1.5"]
    assert len(names) == len(PAPER_ROWS) + 1
    assert paper_rows_with(90.0)[0] == ("**yours**", 90.0)
    assert paper_rows_with(10.0)[-1] == ("**yours**", 10.0)


def test_paper_rows_only_for_dpg():
    result = make_result()
    result["benchmark"] = "dsg1k"
    assert "Published DPG-Bench" not in to_markdown(result)


def test_write_report_files(tmp_path):
    result = make_result()
    paths = write_report(result, tmp_path / "out")
    assert set(paths) == {"json", "md", "png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG"
        im.verify()
    assert paths["md"].read_text(encoding="utf-8") == to_markdown(result)
    assert load_result(paths["json"]) == result
    assert load_result(tmp_path / "out") == result  # a run directory works too
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["categories.png", "report.json", "report.md"]


def test_write_report_overwrite_leaves_no_temp_files(tmp_path):
    write_report(make_result(70.0), tmp_path)
    write_report(make_result(71.0), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["categories.png", "report.json", "report.md"]
    assert load_result(tmp_path / "report.json")["overall"] == 71.0


def test_write_report_nan_category(tmp_path):
    result = make_result()
    result["categories"]["other"] = float("nan")
    paths = write_report(result, tmp_path)
    assert "| other | — |" in paths["md"].read_text(encoding="utf-8")


def test_no_score_is_null_in_json_never_nan(tmp_path):
    """A run whose every image failed has no overall; JSON has no NaN, so "no score" is null."""
    result = make_result(overall=float("nan"))
    result["categories"]["other"] = float("nan")
    paths = write_report(result, tmp_path)
    text = paths["json"].read_text(encoding="utf-8")
    assert "NaN" not in text and json.loads(text, parse_constant=pytest.fail)["overall"] is None
    loaded = load_result(paths["json"])
    assert loaded["categories"]["other"] is None and loaded["categories"]["entity"] == 81.234
    md = to_markdown(loaded)
    assert "**Overall: —**" in md and "| other | — |" in md and "**yours**" not in md
    assert to_markdown(result) == md  # NaN before the round trip, null after: the same report
    assert "| other | — | — | — |" in compare(loaded, result)
    assert math.isnan(result["overall"])  # the caller's dict is not changed
    with pytest.raises(ValueError):  # infinity is never a score: a bug, not a null
        write_report(make_result(overall=float("inf")), tmp_path / "inf")
    assert not (tmp_path / "inf").exists()


def test_write_report_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed, even where it is
    with pytest.raises(MissingExtraError, match=r"pip install 'ella-diffusion\[bench\]'"):
        write_report(make_result(), tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_compare_deltas():
    a, b = make_result(70.0), make_result(72.3456)
    b["categories"]["entity"] = 80.0
    b["categories"]["extra"] = 50.0
    b["subcategories"]["attribute - color"] = 80.0
    md = compare(a, b, names=("base", "ella"))
    assert "| **overall** | 70.00 | 72.35 | +2.35 |" in md
    assert "| entity | 81.23 | 80.00 | -1.23 |" in md
    assert "| attribute | 77.00 | 77.00 | +0.00 |" in md
    b["categories"]["global"] = 85.0 - 1e-9
    assert "| global | 85.00 | 85.00 | +0.00 |" in compare(a, b)  # no "-0.00"
    assert "| attribute - color | 79.13 | 80.00 | +0.87 |" in md
    assert "| extra | — | 50.00 | — |" in md
    assert "| items scored | 1058 | 1058 |" in md
    assert "Warning" not in md


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda r: r["settings"].update(csv_blob="zzz"), "CSV hash"),
        (lambda r: r["settings"].update(official_compat=True), "official_compat"),
        (lambda r: r["settings"].update(vqa_backend="qwen"), "VQA backend"),
        (lambda r: r.update(num_items=1000), "num_items"),
    ],
)
def test_compare_settings_mismatch_warning(change, needle):
    a = make_result()
    b = copy.deepcopy(a)
    change(b)
    md = compare(a, b)
    assert "Warning" in md and needle in md


def test_load_result_errors(tmp_path):
    with pytest.raises(EllaError, match="not found"):
        load_result(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(EllaError, match="not valid JSON"):
        load_result(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}), encoding="utf-8")
    with pytest.raises(EllaError, match="not a benchmark result"):
        load_result(other)
    listy = tmp_path / "list.json"
    listy.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(EllaError, match="not a benchmark result"):
        load_result(listy)
    with pytest.raises(EllaError) as info:
        load_result(other)
    assert "\n" not in str(info.value)  # one line: the CLI prints it as-is
