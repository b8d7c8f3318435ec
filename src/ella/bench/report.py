"""Reports for scored benchmark runs: markdown, JSON, a category bar chart, and run-vs-run comparison.

A result dict (from ``ella.bench.dpg``) is the single source of truth; everything here only renders
it, so a report can always be regenerated from ``report.json`` without rescoring.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from ..errors import EllaError, require
from ..io import atomic_path

# Published DPG-Bench overall scores, for context only (no per-category numbers are copied).
# SD1.5 .. DALL-E 3: ELLA paper (Hu et al., 2024, arXiv:2403.05135), Table 4.
# SD3-Medium and FLUX.1-dev: as commonly reported in later papers' DPG-Bench tables.
PAPER_ROWS: dict[str, float] = {
    "SD1.5": 63.18,
    "ELLA-SD1.5": 74.91,
    "SDXL": 74.65,
    "ELLA-SDXL": 80.23,
    "DALL-E 3": 83.50,
    "SD3-Medium": 84.08,
    "FLUX.1-dev": 83.79,
}

# Settings that change what a number means; alternatives cover the key names a scorer may use.
_MATTERING = {
    "CSV hash": ("csv_blob", "csv_hash", "csv_sha256"),
    "official_compat": ("official_compat",),
    "VQA backend": ("vqa_backend", "vqa", "vqa_model"),
}
_REQUIRED_KEYS = ("overall", "categories", "subcategories", "num_items")
_MAX_ERRORS_LISTED = 5


def _fmt(x: float | None) -> str:
    """Two decimals; NaN/missing shown as an em dash (a category with no answers has no score)."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "—"
    d = round(b - a, 2)
    return f"{d + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0, so a tiny negative delta is not shown as "-0.00"


def _setting(result: dict, keys: tuple[str, ...]) -> object:
    settings = result.get("settings") or {}
    return next((settings[k] for k in keys if k in settings), None)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _no_score(x: float | None) -> bool:
    """A run with nothing scored has no overall: NaN in a fresh result, null once through report.json."""
    return x is None or math.isnan(x)


def paper_rows_with(overall: float | None, label: str = "**yours**") -> list[tuple[str, float]]:
    """Paper rows plus the user's score (if it has one), highest first, so the run is seen in published context."""
    rows = [(name, score) for name, score in PAPER_ROWS.items()] + ([] if _no_score(overall) else [(label, overall)])
    return sorted(rows, key=lambda r: -r[1])


def _json_safe(value: object) -> object:
    """NaN ("no score": a category with no answers, a run with no item scored) as JSON null.

    JSON has no NaN; Python would write a bare ``NaN`` token that strict parsers reject. Infinity
    is never a score, so it is left for ``allow_nan=False`` to refuse.
    """
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_markdown(result: dict) -> str:
    """A human-readable report; flags partial runs and errors, which make ``overall`` incomparable."""
    bench = str(result.get("benchmark", "?"))
    n, expected = result.get("num_items", 0), result.get("num_items_expected", "?")
    errors = result.get("errors") or []
    out = [
        f"# {bench.upper()} report",
        "",
        f"**Overall: {_fmt(result['overall'])}** / 100",
        "",
        f"- Items scored: {n} / {expected}",
        f"- Errors: {len(errors)}",
    ]
    for err in errors[:_MAX_ERRORS_LISTED]:
        out.append(f"  - `{err.get('item_id', '?')}`: {err.get('error', '')}")
    if len(errors) > _MAX_ERRORS_LISTED:
        out.append(f"  - … and {len(errors) - _MAX_ERRORS_LISTED} more (see report.json)")
    if isinstance(expected, int) and n != expected:
        out.append(f"- **Warning:** only {n} of {expected} items scored; overall is not comparable to published ones.")
    out += ["", "## Categories (level 1)", ""]
    out += _table(["Category", "Score"], [[k, _fmt(v)] for k, v in sorted(result["categories"].items())])
    out += ["", "## Subcategories (level 2)", ""]
    out += _table(["Subcategory", "Score"], [[k, _fmt(v)] for k, v in sorted(result["subcategories"].items())])
    settings = result.get("settings") or {}
    if settings:
        out += ["", "## Settings", ""] + [f"- {k}: `{v}`" for k, v in sorted(settings.items())]
    if bench == "dpg":
        out += [
            "",
            "## Published DPG-Bench overall scores",
            "",
            "ELLA paper Table 4 (SD1.5 to DALL-E 3); SD3-Medium and FLUX.1-dev as reported in later papers.",
            "",
        ]
        out += _table(["Model", "Overall"], [[name, _fmt(s)] for name, s in paper_rows_with(result["overall"])])
    return "\n".join(out) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    """An interrupted run never leaves a truncated report (the project's atomic_path: temp + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _bar_chart(result: dict, path: Path) -> None:
    """Level-1 category bars on an Agg canvas (no pyplot): headless, and no global backend switch."""
    # matplotlib is the optional `bench` extra: imported only when a chart is drawn
    backend_agg = require("matplotlib.backends.backend_agg", "bench")
    figure = require("matplotlib.figure", "bench")

    cats = sorted(result["categories"].items())
    names = [k for k, _ in cats]
    values = [0.0 if v is None or math.isnan(v) else v for _, v in cats]
    fig = figure.Figure(figsize=(max(4.0, 1.2 * len(names) + 2), 4))
    backend_agg.FigureCanvasAgg(fig)
    ax = fig.subplots()
    bars = ax.bar(names, values, color="#4C72B0")
    ax.bar_label(bars, labels=[_fmt(v) for _, v in cats], padding=2)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score (0-100)")
    ax.set_title(f"{str(result.get('benchmark', '?')).upper()} — overall {_fmt(result['overall'])}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    _atomic_write(path, buf.getvalue())


def write_report(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and categories.png into ``out_dir``; returns their paths by kind.

    The chart's optional dependency and the JSON are checked first, so a missing extra or an
    infinite score writes nothing rather than part of a report.
    """
    require("matplotlib", "bench")
    text = json.dumps(_json_safe(result), indent=2, ensure_ascii=False, allow_nan=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "categories.png"}
    _atomic_write(paths["json"], (text + "\n").encode("utf-8"))
    _atomic_write(paths["md"], to_markdown(result).encode("utf-8"))
    _bar_chart(result, paths["png"])
    return paths


def settings_mismatches(a: dict, b: dict) -> list[str]:
    """Differences that make two runs' numbers not directly comparable (data, protocol, judge, coverage)."""
    diffs = []
    for label, keys in _MATTERING.items():
        va, vb = _setting(a, keys), _setting(b, keys)
        if va != vb:
            diffs.append(f"{label} ({va} vs {vb})")
    for key in ("benchmark", "num_items"):
        if a.get(key) != b.get(key):
            diffs.append(f"{key} ({a.get(key)} vs {b.get(key)})")
    return diffs


def compare(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Side-by-side markdown of two runs with deltas (b - a), warning when they are not like-for-like."""
    na, nb = names
    out = [f"# Comparison: {na} vs {nb}", ""]
    diffs = settings_mismatches(a, b)
    if diffs:
        out += [f"**Warning: runs differ in settings that matter:** {'; '.join(diffs)}", ""]
    header = ["", na, nb, f"Δ ({nb} − {na})"]
    rows = [
        ["**overall**", _fmt(a["overall"]), _fmt(b["overall"]), _delta(a["overall"], b["overall"])],
        ["items scored", str(a.get("num_items")), str(b.get("num_items")), ""],
    ]
    for level in ("categories", "subcategories"):
        ca, cb = a.get(level) or {}, b.get(level) or {}
        for key in sorted(set(ca) | set(cb)):
            rows.append([key, _fmt(ca.get(key)), _fmt(cb.get(key)), _delta(ca.get(key), cb.get(key))])
    return "\n".join(out + _table(header, rows)) + "\n"


def load_result(path: str | os.PathLike) -> dict:
    """Read a result JSON (``report.json`` or a scorer's output), failing with one actionable line."""
    p = Path(path)
    if p.is_dir() and (p / "report.json").is_file():
        p = p / "report.json"
    if not p.is_file():
        raise EllaError(f"result file not found: {p} (pass the report.json written by `ella` scoring)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EllaError(f"{p} is not valid JSON ({e}); pass a report.json written by `ella` scoring") from e
    missing = [k for k in _REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise EllaError(f"{p} is not a benchmark result (missing {', '.join(missing)}); pass a scoring report.json")
    return data
