"""The Python documentation as training data (:func:`prepare`).

Debian's ``python3-doc`` package installs the reStructuredText sources of the
official Python documentation (``/usr/share/doc/python3.X/html/_sources``,
about 500 ``*.rst.txt`` files: tutorial, library reference, language
reference, HOWTOs, FAQs).  :func:`clean_rst` turns each file into readable
plain text (markup removed, directives rendered roughly the way Sphinx shows
them, prose paragraphs joined into single lines, code kept verbatim).  Change
logs (``whatsnew/``) and legal/boilerplate pages (``license``, ``copyright``,
``bugs``) are skipped, and so are documents shorter than ``min_chars``.  Each
document goes to the held-out split when a hash of ``"{seed}:{doc_id}"`` falls
below ``heldout_fraction`` (:func:`is_heldout`), so the split is stable when
files are added or removed.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from .qa import derive_qa
from .records import Document, QAExample, is_heldout, stable_hash, write_prepared
from .rst import clean_rst

DOCS_ROOT = "/usr/share/doc"
DOCS_GLOB = "python3*/html/_sources"
RST_SUFFIX = ".rst.txt"
EXCLUDED_DIRS = ("whatsnew",)
LINUX_DOC_SOURCES = "/usr/share/doc/linux-doc/html/_sources"
"""Debian's ``linux-doc``: the kernel's documentation, reST prose (an extra training domain)."""
LINUX_DOC_EXCLUDED_DIRS = ("translations",)
EXCLUDED_NAMES = ("license", "copyright", "bugs")

SPLIT_RULE = (
    "A document is held out when int(sha256('{seed}:{doc_id}')[:8 bytes]) / 2**64 < heldout_fraction; "
    "QA examples follow the split of the document they come from."
)
QA_DERIVATION = (
    "One example per API directive (function, method, class, exception, attribute, data, decorator, "
    "classmethod, staticmethod, coroutine variants) with a qualified name from the current module and "
    "enclosing class. Question: template by kind; answer: first sentence of the description (20-300 chars, "
    "ending with a period); gold passage: rendered signature plus cleaned description (<= 1500 chars); "
    "distractors: gold passages of other entries of the same document, shuffled deterministically."
)


def _count_rst(directory: Path) -> int:
    return sum(1 for _ in directory.rglob(f"*{RST_SUFFIX}"))


def find_python_docs(root: str | Path = DOCS_ROOT) -> Path:
    """Return the ``_sources`` dir of the installed Python docs with the most ``*.rst.txt`` files."""
    counts: dict[Path, int] = {}
    for candidate in sorted(Path(root).glob(DOCS_GLOB)):
        real = candidate.resolve()
        if real.is_dir() and real not in counts:
            counts[real] = _count_rst(real)
    ranked = sorted((-n, str(p)) for p, n in counts.items() if n > 0)
    if not ranked:
        raise FileNotFoundError(
            f"no Python documentation sources found ({Path(root) / DOCS_GLOB}); install them with "
            "`apt-get update && apt-get install -y python3-doc` or pass --source DIR "
            "(a directory of *.rst.txt files)"
        )
    return Path(ranked[0][1])


def doc_id_for(path: Path, source: Path) -> str:
    """``library/os.path`` for ``<source>/library/os.path.rst.txt``."""
    rel = path.relative_to(source).as_posix()
    return rel[: -len(RST_SUFFIX)] if rel.endswith(RST_SUFFIX) else rel


def is_excluded(doc_id: str, excluded_dirs: tuple[str, ...] = EXCLUDED_DIRS) -> bool:
    """Change logs, translations and legal/boilerplate pages are not useful prose."""
    parts = doc_id.split("/")
    return parts[0] in excluded_dirs or parts[-1] in EXCLUDED_NAMES


def _split_stats(docs: list[Document], qa: list[QAExample]) -> dict[str, int]:
    return {"docs": len(docs), "chars": sum(len(d.text) for d in docs), "qa": len(qa)}


def prepare(
    out_dir: str | Path,
    source: str | Path | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    min_chars: int = 2000,
    num_passages: int = 3,
    excluded_dirs: tuple[str, ...] = EXCLUDED_DIRS,
    max_train_chars: int | None = None,
) -> dict:
    """Build train/held-out documents and QA sets from a folder of Sphinx reST sources
    (default: the Python docs); returns the manifest.

    ``max_train_chars`` keeps the training split to about that many characters: documents
    are taken in the order of their stable hash, a deterministic spread over the folder."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    src = find_python_docs() if source is None else Path(source)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory {src} does not exist")
    src = src.resolve()
    files = sorted(src.rglob(f"*{RST_SUFFIX}"))
    if not files:
        raise ValueError(f"{src}: no *{RST_SUFFIX} files")
    docs: dict[str, list[Document]] = {"train": [], "heldout": []}
    qa: dict[str, list[QAExample]] = {"train": [], "heldout": []}
    skipped = {"excluded": 0, "too_short": 0}
    for path in tqdm(files, desc=f"reST sources in {src.name}", unit="doc", mininterval=1.0):
        doc_id = doc_id_for(path, src)
        if is_excluded(doc_id, excluded_dirs):
            skipped["excluded"] += 1
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = clean_rst(raw)
        if len(text) < min_chars:
            skipped["too_short"] += 1
            continue
        split = "heldout" if is_heldout(doc_id, heldout_fraction, seed) else "train"
        docs[split].append(Document(doc_id, text))
        qa[split].extend(derive_qa(doc_id, raw, num_passages=num_passages, seed=seed))
    if not docs["train"] and not docs["heldout"]:
        raise ValueError(f"{src}: no documents left after filtering (min_chars={min_chars})")
    if max_train_chars is not None:
        kept, total = [], 0
        for doc in sorted(docs["train"], key=lambda d: stable_hash(f"{seed}:take:{d.id}")):
            if total >= max_train_chars:
                break
            kept.append(doc)
            total += len(doc.text)
        skipped["over_max_train_chars"] = len(docs["train"]) - len(kept)
        kept_ids = {d.id for d in kept}
        docs["train"] = [d for d in docs["train"] if d.id in kept_ids]
        qa["train"] = [e for e in qa["train"] if e.doc_id in kept_ids]
    files = {name: [asdict(r) for r in records[split]]
             for split in ("train", "heldout") for name, records in ((split, docs), (f"qa_{split}", qa))}
    return write_prepared(out_dir, files, {
        "source": str(src),
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "min_chars": min_chars,
        "num_passages": num_passages,
        "excluded_dirs": list(excluded_dirs),
        "max_train_chars": max_train_chars,
        "splits": {s: _split_stats(docs[s], qa[s]) for s in ("train", "heldout")},
        "skipped": skipped,
        "split_rule": SPLIT_RULE,
        "qa_derivation": QA_DERIVATION,
    })
