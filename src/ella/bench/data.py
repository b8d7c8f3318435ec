"""Benchmark data: the packaged DPG-Bench prompts and DSG-1k file, and question-graph CSV parsing.

DPG-Bench's question graphs (``dpg_bench.csv``, ~4 MB) are not redistributable from here, so the
user passes the official file; it is identified by its git blob hash (what GitHub shows for it),
and a different file is used with a warning rather than refused — a fixed copy is still useful.
Both benchmarks share one CSV schema: ``item_id, text, keywords, proposition_id, dependency,
category_broad, category_detailed, tuple, question_natural_language``, where ``dependency`` is a
comma-separated list of parent proposition ids (0 = no parent).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import EllaError

#: git blob id of the official dpg_bench.csv (github.com/TencentQQGYLab/ELLA, dpg_bench/).
DPG_CSV_BLOB = "98457fc9901943f51ff9a30367250fc292533bed"
DPG_CSV_URL = "https://github.com/TencentQQGYLab/ELLA/raw/main/dpg_bench/dpg_bench.csv"
#: git blob id of DSG-1k's dsg-1k-anns.csv (github.com/j-min/DSG), shipped in this package.
DSG1K_CSV_BLOB = "b1b097f09ec4b36546b7266492b386a742ec5790"
BENCHMARKS = ("dpg", "dsg1k")
COLUMNS = ("item_id", "text", "proposition_id", "dependency", "tuple", "question_natural_language")


class BenchmarkDataWarning(UserWarning):
    """The question file is not the official one (hash differs)."""


def git_blob_sha1(path: str | Path) -> str:
    """``git hash-object`` of a file: sha1 over ``blob <size>\\0`` + content."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def categories(tuple_text: str) -> tuple[str, str]:
    """``(level 1, level 2)`` categories of a question's ``tuple``, by the official scorer's rule.

    ``compute_dpg_bench.py`` takes level 2 as the tuple before "(" and level 1 as *that* before
    "-". Splitting the whole tuple on "-" instead differs whenever the tuple has no " - " before
    "(" (``global (t-shirt)``: level 1 is "global", not "global (t") and reads the parenthesised
    arguments as part of the category; every score by category goes through here, in both modes,
    so ours and the official's group questions alike.
    """
    level2 = tuple_text.split("(")[0].strip()
    return level2.split("-")[0].strip(), level2


@dataclass(frozen=True)
class Question:
    proposition_id: int
    parents: tuple[int, ...]  # 0 = none, as in the CSV
    tuple: str  # e.g. "attribute - color (book, red)"
    question: str

    @property
    def subcategory(self) -> str:
        """Level-2 category: the tuple before "(" (e.g. "attribute - color")."""
        return categories(self.tuple)[1]

    @property
    def category(self) -> str:
        """Level-1 category: the level-2 category before "-" (entity, attribute, relation, global, other)."""
        return categories(self.tuple)[0]


@dataclass
class Benchmark:
    name: str
    prompts: dict[str, str]  # item_id -> prompt text
    questions: dict[str, list[Question]]  # item_id -> questions in CSV order
    csv_path: Path
    csv_blob: str
    skipped_rows: list[int] = field(default_factory=list)
    ignored_parents: list[str] = field(default_factory=list)  # dependency entries that are not ids

    def settings(self) -> dict:
        return {
            "benchmark": self.name,
            "csv": str(self.csv_path),
            "csv_blob": self.csv_blob,
            "official_csv": self.csv_blob == {"dpg": DPG_CSV_BLOB, "dsg1k": DSG1K_CSV_BLOB}.get(self.name),
            "ignored_dependency_entries": self.ignored_parents,
        }


def item_sort_key(item_id: str) -> tuple:
    """Natural order of item ids: "2" before "10", numeric ids before named ones."""
    return (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id)


def _data_file(name: str) -> Path:
    return Path(str(resources.files("ella.bench") / "data" / name))


def dpg_prompts() -> dict[str, str]:
    """The 1,065 DPG-Bench prompts (item_id -> text, stripped), shipped in the package."""
    raw = json.loads(_data_file("dpg_prompts.json").read_text(encoding="utf-8"))
    return {k: v.strip() for k, v in raw.items()}


def dsg1k_csv() -> Path:
    return _data_file("dsg-1k-anns.csv")


def read_questions(csv_path: str | Path, *, official_compat: bool = False) -> tuple[dict, dict, list[int], list[str]]:
    """``(questions per item, prompt text per item, skipped row numbers, ignored parents)`` from a CSV.

    ``official_compat`` reproduces the official scorer's first defect: it skips the first data
    row, so the first item loses its first proposition. Dependency entries that are not
    proposition ids (DSG-1k has 10, e.g. ``"5, right"`` — an annotation slip; the official parser
    crashes on them) are ignored and reported.

    Two rows with the same ``(item_id, proposition_id)`` are refused: the official scorer keys
    questions by proposition id, so the second would silently replace the first there and count
    once. Only the official files themselves (by git blob) are read anyway, with one warning,
    keeping what the official scorer keeps (the last row's question, at the first row's place):
    neither packaged file has such rows, and refusing the official DPG-Bench file would leave no
    way to score it.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise EllaError(f"question file {path} does not exist (DPG-Bench: download it from {DPG_CSV_URL})")
    questions: dict[str, dict[int, Question]] = {}
    texts: dict[str, str] = {}
    skipped, ignored, duplicates = [], [], []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise EllaError(
            f"{path} is not UTF-8 text (line {line}: byte 0x{data[err.start]:02x}); "
            "the question file must be UTF-8, as the official one is: save it as UTF-8"
        ) from None
    # a byte-order mark (spreadsheets write one) would otherwise hide the item_id column
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    try:
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise EllaError(f"{path} is not a DPG-Bench/DSG question CSV: missing columns {', '.join(missing)}")
        for row_number, row in enumerate(reader):
            if official_compat and row_number == 0:
                skipped.append(row_number)
                continue
            item_id, q = _question(path, row_number, row, ignored)
            item_questions = questions.setdefault(item_id, {})
            if q.proposition_id in item_questions:
                duplicates.append(f"{item_id} proposition {q.proposition_id} (data row {row_number + 1})")
            item_questions[q.proposition_id] = q
            texts.setdefault(item_id, row["text"])
    except csv.Error as err:
        raise EllaError(f"{path} is not a readable CSV (line {reader.line_num}: {err})") from None
    if duplicates:
        if git_blob_sha1(path) not in (DPG_CSV_BLOB, DSG1K_CSV_BLOB):
            raise EllaError(
                f"{path} has {len(duplicates)} duplicate (item_id, proposition_id) rows (first: {duplicates[0]}); "
                "each proposition of an item must appear once"
            )
        warnings.warn(
            f"{path}: {len(duplicates)} duplicate (item_id, proposition_id) rows (first: {duplicates[0]}); "
            "kept the last row of each at the first one's place, as the official scorer does",
            BenchmarkDataWarning,
            stacklevel=3,
        )
    if not questions:
        raise EllaError(f"{path} has no question rows")
    return {k: list(v.values()) for k, v in questions.items()}, texts, skipped, ignored


def _question(path: Path, row_number: int, row: dict, ignored: list[str]) -> tuple[str, Question]:
    """One CSV row as ``(item_id, Question)``; malformed rows are one clear error."""
    short = [c for c in COLUMNS if row.get(c) is None]
    if short:
        raise EllaError(f"{path}: data row {row_number + 1} has fewer fields than the header (no {', '.join(short)})")
    parents = []
    for entry in row["dependency"].split(","):
        if entry.strip().isdigit():
            parents.append(int(entry))
        else:
            ignored.append(f"{row['item_id']} proposition {row['proposition_id']}: {entry.strip()!r}")
    try:
        q = Question(
            proposition_id=int(row["proposition_id"]),
            parents=tuple(parents) or (0,),
            tuple=row["tuple"],
            question=row["question_natural_language"],
        )
    except ValueError as err:
        raise EllaError(f"{path}: data row {row_number + 1} ({row['item_id']}) is malformed: {err}") from None
    return row["item_id"], q


def load_benchmark(
    name: str = "dpg", csv_path: str | Path | None = None, *, official_compat: bool = False
) -> Benchmark:
    """DPG-Bench (packaged prompts + the user's official ``dpg_bench.csv``) or DSG-1k (all packaged)."""
    if name not in BENCHMARKS:
        raise EllaError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
    if name == "dpg" and csv_path is None:
        raise EllaError(
            f"DPG-Bench needs its question file: download dpg_bench.csv from {DPG_CSV_URL} "
            f"(git blob {DPG_CSV_BLOB}) and pass --csv PATH"
        )
    path = Path(csv_path) if csv_path is not None else dsg1k_csv()
    questions, texts, skipped, ignored = read_questions(path, official_compat=official_compat)
    if ignored:
        warnings.warn(
            f"{path}: {len(ignored)} dependency entries are not proposition ids and were ignored (e.g. {ignored[0]})",
            BenchmarkDataWarning,
            stacklevel=2,
        )
    blob = git_blob_sha1(path)
    official = DPG_CSV_BLOB if name == "dpg" else DSG1K_CSV_BLOB
    if blob != official:
        warnings.warn(
            f"{path} is not the official {name} question file (git blob {blob}, official {official}); "
            "scores will not be comparable with published ones",
            BenchmarkDataWarning,
            stacklevel=2,
        )
    prompts = dpg_prompts() if name == "dpg" else texts
    return Benchmark(name, prompts, questions, path, blob, skipped, ignored)


def benchmark_prompts(name: str) -> dict[str, str]:
    """Prompts to generate for a benchmark (no question file needed)."""
    if name == "dpg":
        return dpg_prompts()
    if name == "dsg1k":
        return read_questions(dsg1k_csv())[1]
    raise EllaError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
