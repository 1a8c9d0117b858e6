"""The engine's chunk-vector cache: projected chunk vectors kept by content.

A stock client sends passages as text, so without a cache every request runs the encoder
and the projector on every chunk, even on passages the engine has seen a thousand times.
vLLM's own encoder cache reuses a whole *item* (one passage's run of chunks) while it is
still in its small budget of positions; this cache keeps single *chunks*, by content, for
as long as its byte budget allows, whatever item, request or position they arrive in.

* **Key**: a BLAKE2b digest of the chunk's encoder token ids, computed in the engine from
  the tokens it is about to encode. Nothing a client names (ids, hashes) enters a key, so
  a client can only hit on a chunk whose text it actually sends.
* **Value**: the chunk's projected vector ``(hidden,)``, kept in host memory (on a GPU it
  is copied back on a hit: 1.2 KB per chunk for the default model, so the copy is cheap
  and the GPU's memory stays vLLM's).
* **Bound**: least-recently-used eviction past ``REFRAG_CHUNK_CACHE_BYTES`` (default
  :data:`DEFAULT_CACHE_BYTES`; ``0`` turns the cache off).
* **Preload**: ``REFRAG_CHUNK_CACHE_PRELOAD=DIR[,DIR...]`` fills the cache when the engine
  starts from the REFRAG cache of passage indexes (``refrag-vllm index``) built for this
  checkpoint (checked; another checkpoint's index is refused), so that stock clients sending
  an indexed passage as text get the vectors a cached client would send, on first sight.
  The keys are computed here from the index's passage text, as for any request.
* **Visibility**: :meth:`ChunkVectorCache.stats`, a log line every :data:`LOG_EVERY_S` seconds while it is used,
  and with ``REFRAG_CHUNK_CACHE_STATS=FILE`` the stats as JSON in FILE after every lookup
  (what ``benchmarks/warm.py`` reads from a server).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm.logger import init_logger

from .config import bytes_from_env

logger = init_logger(f"vllm.{__name__}")
"""Under vLLM's logger, so its lines reach vLLM's log handler and level (a logger outside
``vllm.`` has no handler in a vLLM process, and its INFO lines were lost)."""

CACHE_BYTES_ENV = "REFRAG_CHUNK_CACHE_BYTES"
STATS_FILE_ENV = "REFRAG_CHUNK_CACHE_STATS"
PRELOAD_ENV = "REFRAG_CHUNK_CACHE_PRELOAD"
DEFAULT_CACHE_BYTES = 256 << 20
"""256 MiB: about 230,000 chunk vectors of the default model in bf16 (3.7M context
tokens at k=16)."""
LOG_EVERY_S = 60.0


def cache_bytes_from_env() -> int:
    """``REFRAG_CHUNK_CACHE_BYTES`` (a non-negative integer; 0 disables), else the default."""
    return bytes_from_env(CACHE_BYTES_ENV, DEFAULT_CACHE_BYTES, allow_zero=True)


def chunk_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
    """One content key per row of ``(n, L)`` encoder ids: the digest of its unmasked ids."""
    lengths = attention_mask.sum(1).tolist()
    ids = input_ids.to(torch.int64).cpu().numpy()
    return [hashlib.blake2b(ids[i, :n].tobytes(), digest_size=16).digest() for i, n in enumerate(lengths)]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


class ChunkVectorCache:
    """``key -> (hidden,)`` projected vector; LRU bounded in bytes, safe across threads."""

    def __init__(self, max_bytes: int, stats_file: str | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.stats_file = Path(stats_file) if stats_file else None
        self._vectors: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = self._hits = self._misses = 0
        self._lock = threading.Lock()
        self._logged_at = time.monotonic()

    @classmethod
    def from_env(cls) -> "ChunkVectorCache":
        """Sized by ``REFRAG_CHUNK_CACHE_BYTES``; stats to ``REFRAG_CHUNK_CACHE_STATS`` if set."""
        return cls(cache_bytes_from_env(), os.environ.get(STATS_FILE_ENV) or None)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, keys: list[bytes]) -> list[torch.Tensor | None]:
        """The cached vector of each key, or None; hits become the most recently used."""
        with self._lock:
            found = []
            for key in keys:
                vector = self._vectors.get(key)
                if vector is not None:
                    self._vectors.move_to_end(key)
                found.append(vector)
            hits = sum(v is not None for v in found)
            self._hits += hits
            self._misses += len(keys) - hits
        self._report()
        return found

    def put(self, keys: list[bytes], vectors: torch.Tensor) -> None:
        """Store ``vectors (len(keys), hidden)`` (copied to host memory), evicting the least
        recently used past the byte budget. A vector larger than the whole budget is skipped."""
        if not self.enabled:
            return
        host = vectors.detach().to("cpu")
        with self._lock:
            for key, vector in zip(keys, host.unbind(0)):
                size = vector.numel() * vector.element_size()
                if size > self.max_bytes:
                    continue
                old = self._vectors.pop(key, None)
                if old is not None:
                    self._bytes -= old.numel() * old.element_size()
                self._vectors[key] = vector.clone()  # not a view: its own storage is what it holds
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, evicted = self._vectors.popitem(last=False)
                    self._bytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        with self._lock:
            self._vectors.clear()
            self._bytes = self._hits = self._misses = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._vectors), self._bytes, self.max_bytes)

    def _report(self) -> None:
        if self.stats_file is not None:
            tmp = self.stats_file.with_name(self.stats_file.name + ".tmp")
            tmp.write_text(json.dumps(self.stats().to_dict()))
            tmp.replace(self.stats_file)
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_S:
            return
        self._logged_at = now
        s = self.stats()
        logger.info("REFRAG chunk cache: hit rate %.1f%% (%d hits, %d misses), %d vectors, %.1f of %.1f MiB",
                    100 * s.hit_rate, s.hits, s.misses, s.entries, s.bytes / 2**20, s.max_bytes / 2**20)


def cached_projection(cache: ChunkVectorCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      project) -> torch.Tensor:
    """``(n, L)`` encoder ids -> ``(n, hidden)`` projected vectors, through ``cache``.

    ``project(ids, mask)`` computes the vectors of the rows the cache lacks; each distinct
    chunk is computed once even if it repeats within the call. Returns ``project``'s dtype
    and device.
    """
    if not cache.enabled or input_ids.shape[0] == 0:
        return project(input_ids, attention_mask)
    keys = chunk_keys(input_ids, attention_mask)
    found = cache.get(keys)
    first_row: dict[bytes, int] = {}
    for row, (key, vector) in enumerate(zip(keys, found)):
        if vector is None:
            first_row.setdefault(key, row)
    computed = None
    if first_row:
        rows = torch.tensor(list(first_row.values()), dtype=torch.long, device=input_ids.device)
        computed = project(input_ids[rows], attention_mask[rows])
        cache.put(list(first_row), computed)
    hit_rows = [row for row, vector in enumerate(found) if vector is not None]
    miss_rows = [row for row, vector in enumerate(found) if vector is None]
    if computed is None:  # every row was a hit
        return torch.stack(found).to(input_ids.device)
    out = computed.new_empty((len(keys), computed.shape[-1]))
    slot = {key: i for i, key in enumerate(first_row)}
    out[miss_rows] = computed[[slot[keys[row]] for row in miss_rows]]
    if hit_rows:
        out[hit_rows] = torch.stack([found[row] for row in hit_rows]).to(computed.device, computed.dtype)
    return out


def preload_dirs_from_env() -> list[Path]:
    """``REFRAG_CHUNK_CACHE_PRELOAD``: comma-separated index folders (empty: none)."""
    return [Path(d.strip()) for d in os.environ.get(PRELOAD_ENV, "").split(",") if d.strip()]


def preload(cache: ChunkVectorCache, index_dirs: list[Path], model_dir: str | Path, dtype: torch.dtype) -> int:
    """Put the REFRAG cache of each index in ``index_dirs`` (``refrag-vllm index``, built for
    ``model_dir``) into ``cache``, keyed as the engine keys a request's chunks: the passage
    cut as the renderer cuts it, each chunk tokenized for the encoder. Returns the vectors put."""
    from transformers import AutoTokenizer

    from .config import ENCODER_TOKENIZER_DIR
    from .encoder import tokenize_chunks
    from .prompt import RefragPromptBuilder
    from .retrieval.index import cached_chunks

    if not cache.enabled or not index_dirs:
        return 0
    model_dir = Path(model_dir)
    builder = RefragPromptBuilder.from_pretrained(model_dir)
    encoder_tokenizer = AutoTokenizer.from_pretrained(str(model_dir / ENCODER_TOKENIZER_DIR))
    put = 0
    for index_dir in index_dirs:
        for text, vectors in cached_chunks(index_dir, model_dir):
            texts = builder.chunk_texts(text)
            if len(texts) != len(vectors):
                raise ValueError(f"{index_dir}: a passage cuts into {len(texts)} chunks here, "
                                 f"its cache holds {len(vectors)}")
            input_ids, mask = tokenize_chunks(encoder_tokenizer, texts, builder.cfg.encoder_max_tokens)
            cache.put(chunk_keys(input_ids, mask), torch.from_numpy(vectors).to(dtype))
            put += len(texts)
    s = cache.stats()
    logger.info("REFRAG chunk cache: preloaded %d vectors from %s (%d held, %.1f of %.1f MiB)", put,
                ", ".join(map(str, index_dirs)), s.entries, s.bytes / 2**20, s.max_bytes / 2**20)
    return put
