"""A user's own labelled text file as a federated target: configurable columns, labels mapped from strings
or numbers, two or more classes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrnn.data.reviews import DataError, Reviews, clean_text, read_table

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


# ---------------------------------------------------------------- IMDB


