"""Running English narrative for training: Jane Austen's six novels (Debian's ``r-cran-janeaustenr``).

Debian's ``r-cran-janeaustenr`` installs the six completed novels (about 4 MB of text, one
character vector of lines each) as an R lazy-load database
(``/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx`` and ``Rdata.rdb``). Unlike the fortunes,
whose documents join unrelated short texts, a chapter's sentences follow from each other, so a
window's context predicts its continuation as narrative does: what CPT has to learn to take from
compressed prose. The held-out narrative domain (:mod:`.kjv`) is another author, another century
and another kind of book.

``refrag-train prepare --domain austen --out data/austen`` writes ``train.jsonl`` and
``heldout.jsonl`` (a document per chapter, its hard-wrapped lines joined into paragraphs, held
out by a hash of its id ``austen/<novel>/<n>``) for ``data.extra_train``. The database is read
with the ``rdata`` library; nothing is unpickled and R is not needed.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

from .records import unwrap_paragraphs, write_hash_split

AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\b\.?", re.IGNORECASE)


def _r_object(serialized: bytes):
    import rdata

    return rdata.conversion.convert(rdata.parser.parse_data(serialized, extension=".rds"))


def read_novels(source: str | Path = AUSTEN_DIR) -> dict[str, list[str]]:
    """Each novel's lines, by the name the package gives it (``emma``, ``prideprejudice``, ...).

    The lazy-load index (``Rdata.rdx``, gzip) maps a name to (offset, length) in ``Rdata.rdb``,
    where each object is a 4-byte length and a zlib stream of R's XDR serialization."""
    source = Path(source)
    index_path, db_path = source / "Rdata.rdx", source / "Rdata.rdb"
    if not (index_path.exists() and db_path.exists()):
        raise FileNotFoundError(f"no Jane Austen novels in {source}; install them with "
                                "`apt-get update && apt-get install -y r-cran-janeaustenr`")
    index = _r_object(gzip.decompress(index_path.read_bytes()))
    db = db_path.read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        lines = _r_object(zlib.decompress(db[int(offset) + 4 : int(offset) + int(length)]))
        novels[str(name)] = ["" if line is None else str(line) for line in lines]
    return novels


def chapters(lines: list[str]) -> list[str]:
    """A novel's chapters as text: wrapped lines joined with spaces into paragraphs, paragraphs
    separated by a blank line; the front matter before the first chapter heading is dropped,
    and each chapter keeps its heading."""
    found, current = [], None
    for line in lines:
        if _CHAPTER.match(line):
            current = []
            found.append(current)
        if current is not None:
            current.append(line)
    return ["\n\n".join(unwrap_paragraphs(chapter)) for chapter in found]


def prepare_austen(out_dir: str | Path, source: str | Path = AUSTEN_DIR, *, heldout_fraction: float = 0.1,
                   seed: int = 0) -> dict:
    """Write ``train.jsonl``, ``heldout.jsonl`` and ``manifest.json``; returns the manifest."""
    docs = [{"id": f"austen/{name}/{i}", "text": text}
            for name, lines in sorted(read_novels(source).items())
            for i, text in enumerate(chapters(lines))]
    if not docs:
        raise FileNotFoundError(f"{source} holds no chapters")
    return write_hash_split(out_dir, docs, {
        "domain": "austen",
        "source": str(source),
        "selection": f"every chapter of the six novels, front matter dropped; a chapter is held out when its "
                     f"id's hash falls below {heldout_fraction}",
    }, heldout_fraction=heldout_fraction, seed=seed)
