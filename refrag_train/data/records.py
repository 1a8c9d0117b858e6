"""Records of the prepared data: documents and QA examples, the held-out split, jsonl I/O."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator


@dataclass
class Document:
    """One cleaned documentation page; ``id`` is its path below the source dir without ``.rst.txt``."""

    id: str
    text: str


@dataclass
class QAExample:
    """A retrieval-augmented QA example; ``passages[gold]`` contains ``answer``."""

    question: str
    answer: str
    passages: list[str]
    gold: int
    doc_id: str
    name: str


def stable_hash(text: str) -> int:
    """64-bit hash of ``text`` that does not change between processes."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_heldout(doc_id: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic split: sha256 of ``"{seed}:{doc_id}"`` mapped to [0, 1) is below ``fraction``."""
    return stable_hash(f"{seed}:{doc_id}") / 2**64 < fraction


_FIELD_TYPES: dict[str, type] = {
    "id": str, "text": str, "question": str, "answer": str, "passages": list, "gold": int,
    "doc_id": str, "name": str,
}
QA_FIELDS = ("question", "answer", "passages", "gold", "doc_id", "name")


def _check_record(record: Any, required: tuple[str, ...]) -> str | None:
    """Why a parsed jsonl record is invalid, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in required:
        if key not in record:
            return f"missing key {key!r}"
        want = _FIELD_TYPES.get(key)
        value = record[key]
        if want is not None and (not isinstance(value, want) or isinstance(value, bool)):
            return f"key {key!r} should be {want.__name__}, got {type(value).__name__}"
    return None


def _iter_jsonl(path: str | Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    from refrag_vllm.retrieval.corpora import iter_jsonl

    for lineno, record in iter_jsonl(path):
        problem = _check_record(record, required)
        if problem:
            raise ValueError(f"{path}:{lineno}: {problem}")
        yield lineno, record


def read_jsonl(path: str | Path, required: tuple[str, ...] = ("text",)) -> list[dict]:
    """Parse a jsonl file; errors name ``path:line``; an empty file is an error."""
    records = [record for _, record in _iter_jsonl(path, required)]
    if not records:
        raise ValueError(f"{path}: no records (empty jsonl file)")
    return records


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically (``path.tmp`` then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_prepared(out_dir: str | Path, files: dict[str, list[dict]], manifest: dict) -> dict:
    """A prepared data folder: each ``files[name]`` written as ``name.jsonl``, then
    ``manifest.json`` (``manifest`` with ``files``: ``{name: "name.jsonl"}``); returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_jsonl(out / f"{name}.jsonl", records)
    manifest = {**manifest, "files": {name: f"{name}.jsonl" for name in files}}
    _write_json(out / "manifest.json", manifest)
    return manifest


def unwrap_paragraphs(lines: Iterable[str]) -> list[str]:
    """Hard-wrapped text -> paragraphs: each run of non-blank lines, stripped and joined
    with spaces; blank lines end a paragraph."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def write_hash_split(out_dir: str | Path, docs: list[dict], manifest: dict, *, heldout_fraction: float,
                     seed: int = 0) -> dict:
    """Training prose: ``docs`` (``{"id", "text"}``) split by :func:`is_heldout` into
    ``train.jsonl`` and ``heldout.jsonl``; ``manifest`` gains ``seed`` and each split's size."""
    heldout = [is_heldout(d["id"], heldout_fraction, seed) for d in docs]
    splits = {"train": [d for d, h in zip(docs, heldout) if not h],
              "heldout": [d for d, h in zip(docs, heldout) if h]}
    return write_prepared(out_dir, splits, {
        **manifest, "seed": seed,
        "splits": {name: {"docs": len(split), "chars": sum(len(d["text"]) for d in split)}
                   for name, split in splits.items()},
    })


def load_documents(path: str | Path) -> list[Document]:
    """Documents from a ``train.jsonl`` / ``heldout.jsonl`` file."""
    return [Document(r["id"], r["text"]) for r in read_jsonl(path, ("id", "text"))]


def load_qa(path: str | Path) -> list[QAExample]:
    """QA examples from a ``qa_*.jsonl`` file, checking that ``gold`` indexes ``passages``."""
    examples = []
    for lineno, r in _iter_jsonl(path, QA_FIELDS):
        if not 0 <= r["gold"] < len(r["passages"]) or not all(isinstance(p, str) for p in r["passages"]):
            raise ValueError(f"{path}:{lineno}: gold index {r['gold']} / passages do not fit")
        examples.append(QAExample(**{k: r[k] for k in QA_FIELDS}))
    if not examples:
        raise ValueError(f"{path}: no records (empty jsonl file)")
    return examples
