"""Labelled reviews in memory (``Reviews``), the one error for bad data (``DataError``), and the low-level
readers every loader shares: JSON Lines (gzipped or not), CSV and TSV, each error naming file and line."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Missing, corrupt or malformed data; the message names the file and the problem."""


@dataclass
class Reviews:
    """A labelled (or unlabelled, label -1) set of review texts.

    ``group`` is the natural non-IID key: the IMDb movie id, or the Amazon category.
    """

    texts: list[str]
    labels: np.ndarray
    groups: np.ndarray
    source: str = ""
    ratings: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if len(self.ratings) == 0:
            self.ratings = np.zeros(len(self.texts), dtype=np.int64)
        if not len(self.texts) == len(self.labels) == len(self.groups) == len(self.ratings):
            raise DataError(f"{self.source}: texts, labels, groups and ratings differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Iterable[int] | np.ndarray) -> Reviews:
        idx = np.asarray(list(index) if not isinstance(index, np.ndarray) else index, dtype=np.int64)
        return Reviews(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            groups=self.groups[idx],
            source=self.source,
            ratings=self.ratings[idx],
        )


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Strip the HTML line breaks IMDB keeps (``<br /><br />``) and normalise whitespace."""
    return _SPACE.sub(" ", _BR.sub(" ", text)).strip()


def _json_record(line: str, path: Path, lineno: int) -> dict:
    """One JSON Lines record; anything but a JSON object is a DataError naming the file and line."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError) as e:  # bad JSON, a 5,000-digit number, [[[[... nested too deep
        raise DataError(f"{path}: line {lineno} is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(rec, dict):
        raise DataError(f"{path}: line {lineno} is not a JSON object")
    return rec


def _rating(value: object, path: Path, n: int) -> int:
    """A record's optional star rating (0 = unknown); ratings parsed from XML arrive as text like "4.0"."""
    if value is None or value == "":
        return 0
    try:
        r = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        r = math.nan
    if isinstance(value, bool) or not 0 <= r <= 10:
        raise DataError(f"{path}: record {n} has rating {value!r}; expected a number in [0, 10]")
    return int(r)


def read_jsonl_gz(path: Path) -> list[dict]:
    """Read a gzipped JSON Lines file; a truncated or corrupt file is a DataError naming it."""
    records: list[dict] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    records.append(_json_record(line, path, lineno))
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e}); re-copy or re-download it") from e
    return records


def labelled_from_records(records: list[dict], path: Path, group_key: str, labelled: bool = True) -> Reviews:
    texts, labels, groups, ratings = [], [], [], []
    for n, rec in enumerate(records, start=1):
        text = rec.get("text")
        if not isinstance(text, str):
            raise DataError(f"{path}: record {n} has no string field 'text'")
        if labelled:
            label = rec.get("label")
            if label not in (0, 1) or isinstance(label, bool):
                raise DataError(f"{path}: record {n} has label {label!r}; expected 0 (negative) or 1 (positive)")
        else:
            label = -1
        texts.append(clean_text(text))
        labels.append(label)
        groups.append(str(rec.get(group_key, "")))
        ratings.append(_rating(rec.get("rating"), path, n))
    return Reviews(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        groups=np.asarray(groups, dtype=object),
        source=str(path),
        ratings=np.asarray(ratings, dtype=np.int64),
    )


TABLE_SUFFIXES = (".jsonl.gz", ".jsonl", ".csv", ".tsv")


def read_table(path: str | os.PathLike[str]) -> list[tuple[int, dict]]:
    """(line number, record) of each row of a JSON Lines (gzipped or not), CSV or TSV file.

    CSV/TSV need a header row; their cells stay strings. Every failure is a DataError naming
    the file (and the line where there is one).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"review file {p} does not exist")
    name = p.name.lower()
    if not name.endswith(TABLE_SUFFIXES):
        raise DataError(f"{p}: unknown review file format; use .jsonl.gz, .jsonl, .review, .csv or .tsv")
    try:
        raw = gzip.decompress(p.read_bytes()) if name.endswith(".jsonl.gz") else p.read_bytes()
        text = raw.decode("utf-8")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{p}: truncated or corrupt gzip file ({e}); re-copy or re-download it") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e})") from e
    if name.endswith((".jsonl.gz", ".jsonl")):
        # split on newlines only: str.splitlines would also cut at U+2028 inside a JSON string
        return [(n, _json_record(line, p, n)) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if name.endswith(".tsv") else ",")
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{p}: empty file; expected a header row naming the columns")
        rows = []
        for row in reader:
            n = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{p}: line {n} has {len(row)} columns, the header {len(header)}")
            rows.append((n, dict(zip(header, row, strict=True))))
    except csv.Error as e:
        raise DataError(f"{p}: line {reader.line_num}: not readable CSV/TSV ({e})") from e
    return rows


# Class names read as sentiment, in the teacher's order (0 = negative, 1 = positive).
