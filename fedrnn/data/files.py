"""A user's own labelled text files: JSON Lines (gzipped or not), CSV and TSV.

``load_labelled_file`` reads any such file as the target of a run (``--target PATH``): columns
named by ``Columns``, labels mapped to class ids from strings or numbers, any number of classes.
``load_review_file`` reads a real device's own reviews (0/1 sentiment labels, or an Amazon
``.review`` file). Every problem is a ``DataError`` naming the file and, where there is one, the line.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrnn.data.loaders import DataError, Reviews, clean_text, json_record, labelled_from_records, parse_review_xml


def load_review_file(path: str | os.PathLike[str]) -> Reviews:
    """Load one private review file of any supported format (a device's own data).

    ``.jsonl.gz``/``.jsonl`` records with ``text`` and ``label``; an Amazon ``.review`` file
    (label from its name: ``positive.review``/``negative.review``); or a CSV/TSV with
    ``label`` and ``text`` columns. Labels must be 0 (negative) or 1 (positive).
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".review"):
        if not p.is_file():
            raise DataError(f"review file {p} does not exist")
        if name not in ("positive.review", "negative.review"):
            raise DataError(f"{p}: a .review file must be named positive.review or negative.review")
        label = 1 if name.startswith("positive") else 0
        recs = [dict(r, label=label) for r in parse_review_xml(p.read_bytes().decode("utf-8", "replace"))]
        return labelled_from_records(recs, p, "group")
    rows = read_table(p)
    for lineno, rec in rows:
        if isinstance(rec.get("label"), str):  # CSV/TSV cells are text; "1" is the number 1
            try:
                rec["label"] = int(rec["label"])
            except ValueError:
                raise DataError(f"{p}: line {lineno} has label {rec['label']!r}; expected 0 or 1") from None
    return labelled_from_records([rec for _, rec in rows], p, "group")


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
        return [(n, json_record(line, p, n)) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
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
_SENTIMENT_NAMES = ({"negative", "neg", "bad"}, {"positive", "pos", "good"})


@dataclass(frozen=True)
class Columns:
    """Which fields of a labelled file hold the text, the label and the (optional) group."""

    text: str = "text"
    label: str = "label"
    group: str = "group"
    partition: str = ""  # a column to partition clients by, when it is not the group column; "" = none


@dataclass
class LabelledFile:
    """A user's labelled text file: the reviews (labels mapped to 0..K-1) and the class names."""

    reviews: Reviews
    classes: list[str]
    partition_keys: np.ndarray  # each row's ``Columns.partition`` value ("" when no such column is asked for)


def class_names(values: Iterable[object], order: Sequence[str] = ()) -> list[str]:
    """The class of each label id: ``order`` if given, else 0..K-1 for integer labels, else
    negative/positive for sentiment words, else the sorted distinct names."""
    names = sorted({str(v) for v in values})
    if order:
        return list(order)
    if all(v.lstrip("-").isdigit() for v in names):
        ints = sorted(int(v) for v in names)
        if ints[0] >= 0:
            return [str(i) for i in range(ints[-1] + 1)]
    lowered = {v.lower() for v in names}
    if len(names) == 2 and all(len(lowered & s) == 1 for s in _SENTIMENT_NAMES):
        return sorted(names, key=lambda v: v.lower() in _SENTIMENT_NAMES[1])
    return names


def load_labelled_file(
    path: str | os.PathLike[str], columns: Columns = Columns(), classes: Sequence[str] = ()
) -> LabelledFile:
    """Any labelled text file (JSON Lines, gzipped or not, CSV or TSV) as Reviews with class ids.

    Labels may be numbers or strings; more than two classes are kept. ``classes`` fixes the
    order of class names (id = position); a label outside it is an error naming the line.
    """
    p = Path(path)
    rows = read_table(p)
    if not rows:
        raise DataError(f"{p}: no records")
    texts, raw_labels, groups, keys = [], [], [], []
    for n, rec in rows:
        text, label = rec.get(columns.text), rec.get(columns.label)
        if not isinstance(text, str):
            raise DataError(f"{p}: line {n} has no text column {columns.text!r} (columns: {sorted(rec)})")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
            raise DataError(f"{p}: line {n} has label {label!r} in column {columns.label!r}; expected a class name or "
                            f"an integer")
        texts.append(clean_text(text))
        raw_labels.append(str(label).strip())
        groups.append("" if rec.get(columns.group) is None else str(rec.get(columns.group)))
        key = rec.get(columns.partition) if columns.partition else None
        keys.append("" if key is None else str(key))
    names = class_names(raw_labels, classes)
    index = {v: i for i, v in enumerate(names)}
    for (n, _), label in zip(rows, raw_labels, strict=True):
        if label not in index:
            raise DataError(f"{p}: line {n} has label {label!r}, not one of the classes {names}")
    if len(set(raw_labels)) < 2:
        raise DataError(f"{p}: every record has label {raw_labels[0]!r}; a classifier needs at least two classes")
    reviews = Reviews(
        texts=texts,
        labels=np.asarray([index[v] for v in raw_labels], dtype=np.int64),
        groups=np.asarray(groups, dtype=object),
        source=str(p),
    )
    return LabelledFile(reviews, names, np.asarray(keys, dtype=object))
