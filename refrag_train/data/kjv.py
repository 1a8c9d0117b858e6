"""A third evaluation domain that training never sees: running narrative prose (the King James Bible).

Debian's ``bible-kjv`` package (with ``bible-kjv-text``) installs the King James Version
and the ``bible`` program that prints it. Its chapters are running prose, narrative,
law, verse and letters: far from the Python documentation the recipe trains on, and,
unlike the dictionary (:mod:`.gcide`), sentences that follow from each other.

``refrag-train prepare --domain kjv --out data/kjv`` writes ``heldout.jsonl`` in the
layout ``refrag-train eval`` reads: ``num_docs`` chapters evenly spaced over the whole
book, each ``"<Book> <chapter>"`` on its first line and then its verses as one paragraph
(verse numbers dropped). Everything here is held out: nothing of this domain is used in
training.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .records import write_prepared

WHOLE_BIBLE = "Gen1:1-Rev22:21"
_VERSE = re.compile(r"^\s+\d+\s+(.*\S)\s*$")  # "  12 And God said, ..."


def bible_text(program: str = "bible") -> str:
    """The whole text as the ``bible`` program prints it: a ``Book N`` line per chapter,
    then one indented, numbered line per verse."""
    path = shutil.which(program)
    if path is None:
        raise FileNotFoundError(f"no `{program}` program; install it with "
                                "`apt-get update && apt-get install -y bible-kjv`")
    return subprocess.run([path, "-l1000", WHOLE_BIBLE], check=True, capture_output=True,
                          text=True).stdout


def read_chapters(text: str) -> list[tuple[str, str]]:
    """``[(heading, verses joined by spaces)]`` in book order, from ``bible``'s output."""
    chapters: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        verse = _VERSE.match(line)
        if verse is None:  # a heading line: "Genesis 1", "1 Samuel 3"
            chapters.append((line.strip(), []))
        elif chapters:
            chapters[-1][1].append(verse.group(1))
    return [(heading, " ".join(verses)) for heading, verses in chapters if verses]


def prepare_kjv(out_dir: str | Path, source: str | Path | None = None, *, num_docs: int = 400) -> dict:
    """Write ``heldout.jsonl`` and ``manifest.json``; returns the manifest. ``source`` is a
    file holding ``bible``'s output (``bible -l1000 Gen1:1-Rev22:21``); None runs the program."""
    text = Path(source).read_text(encoding="utf-8") if source is not None else bible_text()
    chapters = read_chapters(text)
    if len(chapters) < num_docs:
        raise ValueError(f"only {len(chapters)} chapters, {num_docs} wanted")
    step = len(chapters) / num_docs
    chosen = [chapters[int(i * step)] for i in range(num_docs)]  # spread over the whole book
    docs = [{"id": f"kjv/{heading}", "text": f"{heading}\n{verses}"} for heading, verses in chosen]
    return write_prepared(out_dir, {"heldout": docs}, {
        "domain": "kjv",
        "source": str(source) if source is not None else f"bible -l1000 {WHOLE_BIBLE}",
        "splits": {"heldout": {"docs": len(docs), "chars": sum(len(d["text"]) for d in docs)}},
        "selection": f"{num_docs} chapters evenly spaced over the {len(chapters)} chapters in book order; "
                     "verse numbers dropped; every document is held out",
    })
