"""A second evaluation domain that training never sees: English dictionary prose (GCIDE).

Debian's ``dict-gcide`` package installs the GNU Collaborative International
Dictionary of English (Webster's 1913 plus additions) as a dictd database
(``/usr/share/dictd/gcide.{index,dict.dz}``).  Its definitions and quotations are
English prose, far from the Python documentation the recipe trains on.

``refrag-train prepare --domain gcide --out data/gcide`` writes, in the layout
``refrag-train eval`` reads:

* ``heldout.jsonl``: documents of consecutive entries (an alphabetical page of
  about ``min_chars`` characters each), a spread over the whole dictionary;
* ``qa_heldout.jsonl``: "What does the word X mean?", answered by the entry's first
  definition; the passages are that entry (``passages[gold]``) and other entries of the
  same page.

Everything here is held out: nothing of this domain is used in training.
"""

from __future__ import annotations

import gzip
import random
import re
from pathlib import Path

from tqdm import tqdm

from .records import unwrap_paragraphs, write_prepared

GCIDE_DIR = Path("/usr/share/dictd")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SOURCE_TAG = re.compile(r"^\s*\[[^\]]*\]\s*$")  # "[1913 Webster]", "[WordNet 1.5]", "[PJC]"
_PRONUNCIATION = re.compile(r"\s*\\[^\\\n]*\\")  # \Ar*rive"\
_LINK = re.compile(r"\{([^{}]*)\}")  # {Arrogate} -> Arrogate
QUESTION = 'What does the word "{word}" mean?'


def b64_number(text: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def read_entries(source: str | Path = GCIDE_DIR) -> list[tuple[str, str]]:
    """``[(headword, raw entry text)]`` in dictionary order, one per distinct text block."""
    source = Path(source)
    index, data = source / "gcide.index", source / "gcide.dict.dz"
    if not index.exists() or not data.exists():
        raise FileNotFoundError(f"no GCIDE database in {source}; install it with "
                                "`apt-get update && apt-get install -y dict-gcide`")
    text = gzip.open(data).read()  # dictzip is gzip-compatible; offsets are into the plain text
    seen, entries = set(), []
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-"):
            continue
        offset, length = b64_number(parts[1]), b64_number(parts[2])
        if offset in seen:
            continue
        seen.add(offset)
        entries.append((offset, parts[0], text[offset : offset + length].decode("utf-8", errors="replace")))
    entries.sort()
    return [(word, body) for _, word, body in entries]


def clean_entry(raw: str) -> str:
    """A raw entry -> readable text: source tags and pronunciations dropped, links
    unwrapped, each paragraph on one line."""
    text = "\n".join(unwrap_paragraphs(line for line in raw.splitlines() if not _SOURCE_TAG.match(line)))
    text = _PRONUNCIATION.sub("", text)
    text = _LINK.sub(r"\1", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def _strip_brackets(text: str) -> str:
    """Drop ``[...]`` (etymologies, usage labels), nested ones included."""
    while True:
        stripped = re.sub(r"\[[^\[\]]*\]", "", text)
        if stripped == text:
            return text
        text = stripped


def first_definition(entry: str) -> str | None:
    """The first sentence (12-200 characters) of the entry's first definition, or None.

    The first paragraph is ``Word, pos. [etymology] (Field.) 1. Definition. ...``;
    quotations (``... --Author.``), cross-references, synonyms and notes are never answers."""
    for i, para in enumerate(entry.split("\n")):
        if i == 0:
            head = re.match(r"^[\w' -]+,? ((?:[a-z]+\. ?)+(?:& (?:[a-z]+\. ?)+)?)", para)
            if head is None:
                return None
            para = para[head.end():]
        para = _strip_brackets(para).strip()
        para = re.sub(r"^(\((?:[A-Z][\w.]*[ ,]*)+\)\s*|\d+\.\s+|\([a-z]\)\s+)+", "", para)
        if not para or para.startswith(("Syn:", "Note:")):
            continue
        match = re.match(r"(.{12,200}?\.)(\s|$)", para)
        if (match is None or "--" in match.group(1) or match.group(1).startswith("See ")
                or not match.group(1)[0].isalpha()):
            return None
        return match.group(1)
    return None


def prepare_gcide(out_dir: str | Path, source: str | Path = GCIDE_DIR, *, num_docs: int = 400,
                  min_chars: int = 2000, num_questions: int = 400, num_passages: int = 3,
                  seed: int = 0) -> dict:
    """Write the held-out documents and QA set; returns the manifest."""
    entries = [(w, clean_entry(b)) for w, b in tqdm(read_entries(source), desc="gcide entries", unit="entry",
                                                    mininterval=1.0)]
    entries = [(w, e) for w, e in entries if len(e) >= 40]
    pages, page = [], []
    for word, entry in entries:
        page.append((word, entry))
        if sum(len(e) for _, e in page) >= min_chars:
            pages.append(page)
            page = []
    if len(pages) < num_docs:
        raise ValueError(f"only {len(pages)} pages of {min_chars} characters, {num_docs} wanted")
    step = len(pages) / num_docs
    chosen = [pages[int(i * step)] for i in range(num_docs)]  # spread over the alphabet
    docs = [{"id": f"gcide/{p[0][0]}", "text": "\n\n".join(e for _, e in p)} for p in chosen]
    rng = random.Random(seed)
    qa = []
    for p in chosen:
        for j, (word, entry) in enumerate(p):
            answer = first_definition(entry)
            others = [e for i, (_, e) in enumerate(p) if i != j]
            if answer is None or len(others) < num_passages - 1 or len(word.split()) > 2:
                continue
            passages = [entry[:1500]] + [e[:1500] for e in rng.sample(others, num_passages - 1)]
            rng.shuffle(passages)
            qa.append({"id": f"gcide/{word}", "question": QUESTION.format(word=word), "answer": answer,
                       "passages": passages, "gold": passages.index(entry[:1500])})
    rng.shuffle(qa)
    qa = qa[:num_questions]
    return write_prepared(out_dir, {"heldout": docs, "qa_heldout": qa}, {
        "domain": "gcide",
        "source": str(source),
        "seed": seed,
        "splits": {"heldout": {"docs": len(docs), "chars": sum(len(d["text"]) for d in docs), "qa": len(qa)}},
        "selection": f"{num_docs} pages of consecutive entries (>= {min_chars} chars), evenly spaced over "
                     f"{len(pages)} pages in dictionary order; every document is held out",
        "qa_derivation": "One question per entry of a chosen page whose first definition sentence is 12-200 "
                         "characters; the passages are the entry (<= 1500 chars; passages[gold]) and other entries of "
                         "its page.",
    })
