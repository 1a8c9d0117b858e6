"""General English prose for training: the fortune-cookie collection (Debian's ``fortunes``).

Debian's ``fortunes`` and ``fortunes-min`` packages install about 2.5 MB of English
quotations, jokes, verse and anecdotes (``/usr/share/games/fortunes/<category>``, one
fortune per block, blocks separated by a line holding ``%``): literature, people, science,
politics, humorists and more. Beside the Python documentation it is everyday English,
which the recipe otherwise never reads.

``refrag-train prepare --domain fortunes --out data/fortunes`` writes ``train.jsonl`` and
``heldout.jsonl`` (documents of consecutive fortunes of one category, about ``min_chars``
characters each, held out by a hash of their id) for ``data.extra_train``. The categories
in ``EXCLUDED_CATEGORIES`` are left out: drawings, humorous dictionary entries (the
dictionary is the held-out domain, :mod:`.gcide`), and text in need of translation.
"""

from __future__ import annotations

import re
from pathlib import Path

from .records import write_hash_split

FORTUNES_DIR = Path("/usr/share/games/fortunes")
EXCLUDED_CATEGORIES = ("art", "ascii-art", "definitions", "translate-me")
_SEPARATOR = re.compile(r"^%\s*$", re.MULTILINE)


def read_fortunes(path: str | Path) -> list[str]:
    """The fortunes of one category file, each stripped; empty blocks dropped."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [block.strip("\n").rstrip() for block in _SEPARATOR.split(text) if block.strip()]


def category_files(source: str | Path = FORTUNES_DIR) -> list[Path]:
    """The category files of ``source`` (no ``.dat`` indexes, ``.u8`` links or excluded categories)."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"no fortunes in {source}; install them with "
                                "`apt-get update && apt-get install -y fortunes`")
    files = sorted(p for p in source.iterdir()
                   if p.is_file() and not p.is_symlink() and "." not in p.name
                   and p.name not in EXCLUDED_CATEGORIES)
    if not files:
        raise FileNotFoundError(f"{source} holds no fortune category files")
    return files


def group_documents(category: str, fortunes: list[str], min_chars: int) -> list[dict]:
    """Consecutive fortunes joined (blank line between) into documents of >= ``min_chars``
    characters; the last, shorter remainder is kept. Ids are ``fortunes/<category>/<n>``."""
    docs, current = [], []
    for fortune in fortunes:
        current.append(fortune)
        if sum(len(f) for f in current) >= min_chars:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return [{"id": f"fortunes/{category}/{i}", "text": "\n\n".join(group)} for i, group in enumerate(docs)]


def prepare_fortunes(out_dir: str | Path, source: str | Path = FORTUNES_DIR, *, min_chars: int = 2000,
                     heldout_fraction: float = 0.1, seed: int = 0) -> dict:
    """Write ``train.jsonl``, ``heldout.jsonl`` and ``manifest.json``; returns the manifest."""
    docs = [doc for path in category_files(source)
            for doc in group_documents(path.name, read_fortunes(path), min_chars)]
    return write_hash_split(out_dir, docs, {
        "domain": "fortunes",
        "source": str(source),
        "excluded_categories": list(EXCLUDED_CATEGORIES),
        "selection": f"every category file but the excluded ones; consecutive fortunes joined into documents "
                     f"of >= {min_chars} characters; a document is held out when its id's hash falls below "
                     f"{heldout_fraction}",
    }, heldout_fraction=heldout_fraction, seed=seed)
