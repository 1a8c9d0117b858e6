"""A passage index on disk: FAISS over sentence embeddings, plus the REFRAG cache.

    DIR/meta.json          format, retriever (model, word pieces read), the cache's checkpoint identity and k,
                           and the committed counts (written last: the commit point)
    DIR/passages.jsonl     one line per passage: id, text, first chunk row, chunk count
    DIR/faiss.index        FAISS inner-product index of unit-norm passage embeddings
    DIR/chunks.f32         the REFRAG cache: projected chunk vectors, ``(rows, hidden)``
                           float32, memory-mapped, rows of one passage contiguous

Every file is append-only up to the counts in ``meta.json``.  A build adds passages
in batches and commits each batch by rewriting ``meta.json`` atomically, so an
interrupted build leaves a consistent index of the batches it finished; re-running
the same command skips passages already in (ids are content hashes unless the corpus
gives ids) and goes on.  Bytes past the committed counts are ignored and overwritten.

The cache holds what the checkpoint's encoder + projector make of each chunk, so it
belongs to one checkpoint and one k.  ``meta.json`` records a digest of everything
that decides those vectors (see :func:`cache_identity`); using the index with another
checkpoint or k raises :class:`CacheMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ENCODER_TOKENIZER_DIR, load_refrag_config
from .corpora import CorpusError, iter_jsonl

FORMAT = 1
META, PASSAGES, FAISS_INDEX, CHUNKS = "meta.json", "passages.jsonl", "faiss.index", "chunks.f32"


class CacheMismatchError(ValueError):
    """The index's REFRAG cache was built for another checkpoint or k."""


class RetrieverMismatchError(ValueError):
    """The index's passage vectors come from another retriever setting (model, word pieces)."""


# ------------------------------------------------------------------ corpus
@dataclass(frozen=True)
class PassageRecord:
    id: str
    text: str


def content_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def read_corpus(path: str | Path) -> list[PassageRecord]:
    """``.txt`` (one passage per non-empty line) or ``.jsonl`` (``text``, optional ``id``).

    Everything is checked before anything is written: an empty corpus, a malformed
    line (reported with its line number) or one id with two texts raises
    :class:`CorpusError`.  Passages without an id get a hash of their text.
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise CorpusError(f"{path}: corpus must be .txt (one passage a line) or .jsonl")
    if not path.exists():
        raise CorpusError(f"{path}: no such corpus file")
    records: list[PassageRecord] = []
    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CorpusError(f"{path}:{lineno}: expected an object with a string field \"text\"")
            if not obj["text"].strip():
                raise CorpusError(f"{path}:{lineno}: empty \"text\"")
            pid = obj.get("id")
            if pid is not None and not isinstance(pid, (str, int)):
                raise CorpusError(f"{path}:{lineno}: \"id\" must be a string or an integer")
            text = obj["text"].strip()
            records.append(PassageRecord(str(pid) if pid is not None else content_id(text), text))
    else:
        with open(path, encoding="utf-8") as f:
            records = [PassageRecord(content_id(line.strip()), line.strip()) for line in f if line.strip()]
    if not records:
        raise CorpusError(f"{path}: the corpus has no passages")
    seen: dict[str, str] = {}
    unique = []
    for r in records:
        if r.id in seen:
            if seen[r.id] != r.text:
                raise CorpusError(f"{path}: id {r.id!r} is given to two different texts")
            continue
        seen[r.id] = r.text
        unique.append(r)
    return unique


# ------------------------------------------------------------------ identity
def cache_identity(model_dir: str | Path) -> dict:
    """What decides a checkpoint's chunk vectors: k, the projected width and a digest of
    the refrag config, the encoder and projector weights and both tokenizers."""
    from ..checkpoint import load_tensors

    model_dir = Path(model_dir)
    raw, cfg = load_refrag_config(model_dir)
    # the policy and the prompt layout do not change a chunk's vector
    section = {k: v for k, v in raw["refrag"].items() if k not in ("expansion_policy", "question_first")}
    h = hashlib.sha256(json.dumps(section, sort_keys=True).encode())
    tensors = load_tensors(model_dir, ("chunk_encoder.", "projector."))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    for tok in (model_dir / "tokenizer.json", model_dir / ENCODER_TOKENIZER_DIR / "tokenizer.json"):
        if tok.exists():
            h.update(tok.read_bytes())
    return {"k": cfg.chunk_size, "width": int(raw["hidden_size"]), "digest": h.hexdigest(),
            "checkpoint": str(model_dir)}


def check_cache_identity(index_identity: dict, model_identity: dict, index_dir) -> None:
    if index_identity["k"] != model_identity["k"] or index_identity["digest"] != model_identity["digest"]:
        raise CacheMismatchError(
            f"{index_dir}: its REFRAG cache was built for checkpoint {index_identity['checkpoint']} "
            f"(k={index_identity['k']}, digest {index_identity['digest'][:12]}), but the model is "
            f"{model_identity['checkpoint']} (k={model_identity['k']}, digest {model_identity['digest'][:12]}). "
            f"Rebuild it: refrag-vllm index --corpus FILE --out NEW_DIR --model {model_identity['checkpoint']}"
        )


# ------------------------------------------------------------------ embedders
RETRIEVER_MAX_TOKENS = 128
"""Word pieces of a passage the retriever reads (the rest is cut). all-MiniLM-L6-v2 was trained
on 128-token inputs; against its sentence-transformers default of 256 it finds the answer's
passage as often or more (hit@3 on the held-out QA passages: Python docs 0.90 against 0.86,
dictionary 0.955 against 0.955) and embeds 256-token passages 2.4x faster
(``python -m benchmarks.index_rate --qa ...``; benchmarks/README.md, "Index build")."""


def retriever_spec(model: str | Path | None = None, max_tokens: int = RETRIEVER_MAX_TOKENS) -> dict:
    """What decides a passage's retrieval vector, as an index's ``meta.json`` records it."""
    from ..default_models import minilm_dir

    if int(max_tokens) < 1:
        raise ValueError(f"the retriever must read at least one word piece, not {max_tokens}")
    return {"model": str(model or minilm_dir()), "max_tokens": int(max_tokens)}


class Retriever:
    """sentence-transformers passage/query embeddings, unit norm (inner product = cosine).

    ``dtype`` defaults to the engines' (:func:`refrag_vllm.engine.serving_dtype`): bfloat16,
    which on a CPU with AVX-512 BF16 embeds passages 3.3x faster than float32, each embedding at
    cosine >= 0.998 to float32's (``python -m benchmarks.index_rate``; benchmarks/README.md,
    "Index build"), and float32 on a CPU without native bf16, where bf16 is emulated.  The two
    dtypes' embeddings agree that closely, so an index built in one is searched with the other. ``max_tokens``: :data:`RETRIEVER_MAX_TOKENS`.
    """

    def __init__(self, model: str | Path | None = None, dtype: str | None = None,
                 max_tokens: int = RETRIEVER_MAX_TOKENS) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from ..engine import serving_dtype

        dtype = dtype or serving_dtype()

        self.spec = retriever_spec(model, max_tokens)
        self.name = self.spec["model"]
        self.model = SentenceTransformer(self.name, device="cpu").to(getattr(torch, dtype))
        self.model.max_seq_length = self.spec["max_tokens"]
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    @classmethod
    def from_spec(cls, spec: dict) -> "Retriever":
        """The retriever a :func:`retriever_spec` describes, e.g. an index's (``meta.json``'s
        ``retriever``; an index that does not record ``max_tokens`` gets the default)."""
        return cls(spec["model"], max_tokens=spec.get("max_tokens", RETRIEVER_MAX_TOKENS))

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``(n, dim)`` float32, unit rows."""
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


class CacheProjector:
    """The checkpoint's encoder + projector alone (no decoder): passage text -> cache rows.

    Chunking is the serving path's (:meth:`RefragPromptBuilder.chunk_passage` and
    :func:`chunk_text`); the computation runs in the checkpoint's dtype, like the engine.
    """

    def __init__(self, model_dir: str | Path) -> None:
        from ..embedder import ChunkEmbedder
        from ..prompt import RefragPromptBuilder

        self.builder = RefragPromptBuilder.from_pretrained(model_dir)
        self.chunk_embedder = ChunkEmbedder.from_pretrained(model_dir)

    @torch.no_grad()
    def project(self, passages: Sequence[str]) -> list[np.ndarray]:
        """Per passage, ``(num_chunks, hidden)`` float32 projected vectors."""
        texts = [self.builder.chunk_texts(p) for p in passages]
        projected = self.chunk_embedder.embed([t for ts in texts for t in ts]).float().numpy()
        out, start = [], 0
        for ts in texts:
            out.append(projected[start : start + len(ts)])
            start += len(ts)
        return out


# ------------------------------------------------------------------ the index
def read_committed(path: Path) -> tuple[dict, list[dict]]:
    """An index folder's ``meta.json`` and its committed passage records (no FAISS)."""
    if not (path / META).exists():
        raise FileNotFoundError(
            f"{path}: not an index (no {META}); build one with refrag-vllm index --corpus FILE --out {path}")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: index format {meta.get('format')!r}, this version reads {FORMAT}")
    n = meta["num_passages"]
    records = []
    with open(path / PASSAGES, encoding="utf-8") as f:
        for line in f:
            if len(records) == n:
                break
            records.append(json.loads(line))
    if len(records) != n:
        raise ValueError(f"{path}: {PASSAGES} has {len(records)} passages, {META} says {n}")
    return meta, records


def read_checked(path: str | Path, model_dir: str | Path) -> tuple[dict, list[dict]]:
    """:func:`read_committed`, after checking the index's REFRAG cache belongs to ``model_dir``
    (:class:`CacheMismatchError` otherwise)."""
    path = Path(path)
    meta, records = read_committed(path)
    check_cache_identity(meta["cache"], cache_identity(model_dir), path)
    return meta, records


def cached_chunks(path: str | Path, model_dir: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(passage text, (num_chunks, hidden) float32 projected vectors)`` for every committed
    passage of an index built for ``model_dir`` (:func:`read_checked`). Reads no FAISS index."""
    path = Path(path)
    meta, records = read_checked(path, model_dir)
    width = meta["cache"]["width"]
    rows = np.memmap(path / CHUNKS, dtype=np.float32, mode="r", shape=(meta["num_chunk_rows"], width)) \
        if meta["num_chunk_rows"] else np.zeros((0, width), np.float32)
    for r in records:
        yield r["text"], np.array(rows[r["chunk_row"] : r["chunk_row"] + r["num_chunks"]])


@dataclass
class Hit:
    row: int
    id: str
    text: str
    score: float


class PassageIndex:
    """Open an index folder for search and cache lookups (``PassageIndex.open(dir)``)."""

    def __init__(self, path: Path, meta: dict, records: list[dict], faiss_index) -> None:
        self.path, self.meta, self.records, self.faiss = path, meta, records, faiss_index
        self._ids = {r["id"]: i for i, r in enumerate(records)}

    # ---------------------------------------------------------- open
    @classmethod
    def open(cls, path: str | Path) -> "PassageIndex":
        import faiss

        path = Path(path)
        meta, records = read_committed(path)
        n = meta["num_passages"]
        index = faiss.read_index(str(path / FAISS_INDEX))
        if index.ntotal > n:  # a batch was interrupted after the FAISS write: drop its vectors
            index.remove_ids(faiss.IDSelectorRange(n, index.ntotal))
        if index.ntotal != n:
            raise ValueError(f"{path}: {FAISS_INDEX} has {index.ntotal} vectors, {META} says {n}")
        return cls(path, meta, records, index)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def identity(self) -> dict:
        return self.meta["cache"]

    def check_model(self, model_dir: str | Path) -> None:
        """Raise :class:`CacheMismatchError` unless the cache belongs to this checkpoint and k."""
        check_cache_identity(self.identity, cache_identity(model_dir), self.path)

    # ---------------------------------------------------------- query
    def search(self, query_vectors: np.ndarray, top_k: int) -> list[list[Hit]]:
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        scores, rows = self.faiss.search(np.ascontiguousarray(query_vectors, dtype=np.float32),
                                         min(top_k, len(self)))
        return [[Hit(int(r), self.records[r]["id"], self.records[r]["text"], float(s))
                 for s, r in zip(srow, rrow) if r >= 0] for srow, rrow in zip(scores, rows)]

    def chunk_embeds(self, row: int) -> torch.Tensor:
        """The cached ``(num_chunks, hidden)`` projected vectors of passage ``row``."""
        r = self.records[row]
        width = self.identity["width"]
        chunks = np.memmap(self.path / CHUNKS, dtype=np.float32, mode="r", offset=r["chunk_row"] * width * 4,
                           shape=(r["num_chunks"], width))
        return torch.from_numpy(np.array(chunks))

    def vectors(self) -> np.ndarray:
        """All passage embeddings, ``(n, dim)`` (for comparing builds)."""
        return self.faiss.reconstruct_n(0, len(self))


# ------------------------------------------------------------------ building
class IndexWriter:
    """Appends committed batches to an index folder (creating it on the first batch)."""

    def __init__(self, path: str | Path, identity: dict, retriever: dict) -> None:
        """``retriever``: :func:`retriever_spec` of the retriever that embeds the passages."""
        self.path = Path(path)
        self.identity = identity
        if (self.path / META).exists():
            current = PassageIndex.open(self.path)
            check_cache_identity(current.identity, identity, self.path)
            built = {key: current.meta["retriever"].get(key) for key in retriever}
            if built != retriever:
                raise RetrieverMismatchError(f"{self.path}: built with retriever {built}, not {retriever}; "
                                             f"add to it with the same retriever, or build a new index")
            self.meta, self.faiss = current.meta, current.faiss
            self.known = set(current._ids)
        else:
            self.meta = {"format": FORMAT, "retriever": {**retriever, "dim": None},
                         "cache": identity, "num_passages": 0, "num_chunk_rows": 0}
            self.faiss = None  # created with the first batch's width
            self.known = set()

    def add(self, records: Sequence[PassageRecord], vectors: np.ndarray, chunk_embeds: Sequence[np.ndarray]) -> None:
        """Append one batch and commit it."""
        import faiss

        if self.faiss is None:
            self.path.mkdir(parents=True, exist_ok=True)
            for name in (PASSAGES, FAISS_INDEX, CHUNKS):  # leftovers of a build that never committed
                (self.path / name).unlink(missing_ok=True)
            self.faiss = faiss.IndexFlatIP(vectors.shape[1])
            self.meta["retriever"]["dim"] = int(vectors.shape[1])
        if len(vectors) != len(records) or len(chunk_embeds) != len(records):
            raise ValueError(f"{len(records)} passages, {len(vectors)} vectors, {len(chunk_embeds)} chunk arrays")
        width = self.identity["width"]
        rows = self.meta["num_chunk_rows"]
        n = self.meta["num_passages"]
        lines = []
        with open(self.path / CHUNKS, "r+b" if (self.path / CHUNKS).exists() else "wb") as f:
            f.seek(rows * width * 4)
            for rec, emb in zip(records, chunk_embeds):
                emb = np.ascontiguousarray(emb, dtype=np.float32)
                if emb.ndim != 2 or emb.shape[1] != width or not np.isfinite(emb).all():
                    raise ValueError(f"passage {rec.id!r}: bad chunk embeddings {emb.shape}")
                f.write(emb.tobytes())
                lines.append(json.dumps({"id": rec.id, "text": rec.text, "chunk_row": rows,
                                         "num_chunks": int(emb.shape[0])}, ensure_ascii=False))
                rows += emb.shape[0]
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        _truncate_lines(self.path / PASSAGES, n)
        with open(self.path / PASSAGES, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        self.faiss.add(np.ascontiguousarray(vectors, dtype=np.float32))
        tmp = self.path / (FAISS_INDEX + ".tmp")
        faiss.write_index(self.faiss, str(tmp))
        tmp.replace(self.path / FAISS_INDEX)
        self.meta.update(num_passages=n + len(records), num_chunk_rows=rows)
        tmp = self.path / (META + ".tmp")
        tmp.write_text(json.dumps(self.meta, indent=2) + "\n")
        tmp.replace(self.path / META)  # the commit point
        self.known.update(r.id for r in records)


def _truncate_lines(path: Path, keep: int) -> None:
    """Drop lines past the first ``keep`` (an interrupted batch's)."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        for _ in range(keep):
            if not f.readline():
                return
        f.truncate()


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_index(corpus: str | Path, out: str | Path, model_dir: str | Path, *, retriever: str | None = None,
                retriever_max_tokens: int = RETRIEVER_MAX_TOKENS, batch_size: int = 64,
                progress: bool = True) -> PassageIndex:
    """Index a corpus (or add its new passages to ``out``) in one process."""
    records = read_corpus(corpus)
    embedder = Retriever(retriever, max_tokens=retriever_max_tokens)
    writer = IndexWriter(out, cache_identity(model_dir), embedder.spec)
    todo = new_records(records, writer.known)
    if todo:
        add_passages(writer, todo, embedder, CacheProjector(model_dir), batch_size=batch_size, progress=progress)
    return PassageIndex.open(out)


def add_passages(writer: IndexWriter, records: Sequence[PassageRecord], retriever: Retriever,
                 projector: CacheProjector, *, batch_size: int = 64, progress: bool = True) -> None:
    """Embed, project and commit ``records`` in batches of ``batch_size`` passages."""
    from tqdm import tqdm

    with tqdm(total=len(records), desc="indexing", unit="passage", disable=not progress) as bar:
        for batch in batches(records, batch_size):
            texts = [r.text for r in batch]
            writer.add(batch, retriever.embed(texts), projector.project(texts))
            bar.update(len(batch))


def new_records(records: Iterable[PassageRecord], known: set[str]) -> list[PassageRecord]:
    return [r for r in records if r.id not in known]
