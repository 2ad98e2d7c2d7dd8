"""Atomic JSON and CSV writes (temp file + rename): a kill leaves the old file or the new one, never half."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, p)


def write_csv(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Rows as CSV (columns from the first row)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, p)
