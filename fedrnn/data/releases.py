"""The official release files a user downloads (aclImdb_v1.tar.gz, domain_sentiment_data.tar.gz), packed or
unpacked."""

from __future__ import annotations

import html
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedrnn.data.reviews import DataError, Reviews, clean_text, labelled_from_records

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
AMAZON_URL = "https://www.cs.jhu.edu/~mdredze/datasets/sentiment/domain_sentiment_data.tar.gz"
AMAZON_FOLDERS = {"kitchen_&_housewares": "kitchen"}


class DirSource:
    """Files of an unpacked release, addressed by their path inside the archive."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def files(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        base = self.root / prefix
        if not base.is_dir():
            return
        for p in sorted(base.iterdir()):
            if p.is_file():
                yield f"{prefix}/{p.name}", p.read_bytes()

    def read(self, name: str) -> bytes | None:
        p = self.root / name
        return p.read_bytes() if p.is_file() else None


class TarSource:
    """Files of a packed release; read in one pass since gzip tars are sequential."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.members: dict[str, bytes] = {}
        for m in tar:
            if m.isfile():
                f = tar.extractfile(m)
                if f is not None:
                    self.members[m.name.lstrip("./")] = f.read()

    def files(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        pre = prefix.rstrip("/") + "/"
        for name in sorted(self.members):
            if name.startswith(pre) and "/" not in name[len(pre) :]:
                yield name, self.members[name]

    def read(self, name: str) -> bytes | None:
        return self.members.get(name)


_IMDB_NAME = re.compile(r"(\d+)_(\d+)\.txt$")
_MOVIE = re.compile(r"title/(tt\d+)")


def imdb_from_release(src: DirSource | TarSource, split: str, where: Path) -> Reviews:
    folder = "train" if split == "unsup" else split
    parts = [("unsup", -1)] if split == "unsup" else [("neg", 0), ("pos", 1)]
    texts, labels, groups, ratings = [], [], [], []
    for sub, label in parts:
        urls = src.read(f"aclImdb/{folder}/urls_{sub}.txt")
        movies = [m.group(1) if (m := _MOVIE.search(u)) else "" for u in (urls or b"").decode().splitlines()]
        found = 0
        for name, raw in src.files(f"aclImdb/{folder}/{sub}"):
            m = _IMDB_NAME.search(name)
            if not m:
                continue
            idx, rating = int(m.group(1)), int(m.group(2))
            texts.append(clean_text(raw.decode("utf-8", "replace")))
            labels.append(label)
            groups.append(movies[idx] if idx < len(movies) else "")
            ratings.append(rating)
            found += 1
        if found == 0:
            raise DataError(f"{where}: no reviews under aclImdb/{folder}/{sub}/; is this the official aclImdb release?")
    return Reviews(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        groups=np.asarray(groups, dtype=object),
        source=f"{where}:{split}",
        ratings=np.asarray(ratings, dtype=np.int64),
    )


_REVIEW_BLOCK = re.compile(r"<review>(.*?)</review>", re.DOTALL)


def _tag(block: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\s*\n?(.*?)\n?\s*</{tag}>", block, re.DOTALL)
    return html.unescape(m.group(1).strip()) if m else ""


def parse_review_xml(text: str) -> list[dict]:
    """Parse the pseudo-XML ``.review`` format of ``sorted_data_acl`` into records."""
    out = []
    for block in _REVIEW_BLOCK.findall(text):
        out.append(
            {
                "text": _tag(block, "review_text"),
                "title": _tag(block, "title"),
                "asin": _tag(block, "asin"),
                "unique_id": _tag(block, "unique_id"),
                "rating": _tag(block, "rating"),  # text; checked where records become Reviews
            }
        )
    return out


def amazon_from_release(src: DirSource | TarSource, where: Path) -> Reviews:
    recs = []
    for folder in ("books", "dvd", "electronics", "kitchen_&_housewares"):
        for fname, label in (("negative.review", 0), ("positive.review", 1)):
            raw = src.read(f"sorted_data_acl/{folder}/{fname}")
            if raw is None:
                raise DataError(f"{where}: missing sorted_data_acl/{folder}/{fname}; is this {AMAZON_URL}?")
            group = AMAZON_FOLDERS.get(folder, folder)
            recs += [dict(r, label=label, group=group) for r in parse_review_xml(raw.decode("utf-8", "replace"))]
    return labelled_from_records(recs, where, "group")


