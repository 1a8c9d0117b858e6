"""The chunk-vector cache on its own (no engine): keys, LRU byte bound, reuse, stats, preload
from an index. Its parity inside vLLM is in test_parity.py."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from refrag_vllm.chunk_cache import (
    CACHE_BYTES_ENV,
    DEFAULT_CACHE_BYTES,
    PRELOAD_ENV,
    ChunkVectorCache,
    cache_bytes_from_env,
    cached_projection,
    chunk_keys,
    preload,
    preload_dirs_from_env,
)
from refrag_vllm.config import ENCODER_TOKENIZER_DIR

HIDDEN = 8


def _project(calls):
    """A deterministic projection that records which rows it was asked for."""
    weight = torch.randn(32, HIDDEN, generator=torch.Generator().manual_seed(0))

    def project(ids, mask):
        calls.append(ids.clone())
        return (weight[ids] * mask.unsqueeze(-1)).sum(1)

    return project


def _batch(rows, width=6):
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def test_keys_come_from_unmasked_content_only():
    ids, mask = _batch([[1, 2, 3], [1, 2, 3], [1, 2, 4], [1, 2]])
    keys = chunk_keys(ids, mask)
    assert keys[0] == keys[1] and len(set(keys)) == 3
    ids[0, 4] = 9  # a padded position does not change the key
    wide_ids, wide_mask = _batch([[1, 2, 3]], width=12)
    assert chunk_keys(ids, mask)[0] == keys[0] == chunk_keys(wide_ids, wide_mask)[0]


def test_hits_reuse_vectors_and_equal_a_fresh_computation():
    cache, calls = ChunkVectorCache(1 << 20), []
    project = _project(calls)
    first_ids, first_mask = _batch([[1, 2], [3, 4], [1, 2]])
    first = cached_projection(cache, first_ids, first_mask, project)
    assert len(calls[0]) == 2  # the repeated chunk is computed once
    assert torch.equal(first, project(first_ids, first_mask))
    calls.clear()
    ids, mask = _batch([[5], [3, 4], [1, 2], [6, 7]])
    out = cached_projection(cache, ids, mask, project)
    assert [r[:2].tolist() for r in calls[0]] == [[5, 0], [6, 7]]  # only the new chunks
    assert torch.equal(out, project(ids, mask))  # in order, hits bit-identical
    s = cache.stats()
    assert (s.hits, s.misses, s.entries) == (2, 5, 4)
    assert s.bytes == 4 * HIDDEN * 4


def test_all_hits_and_empty_batches():
    cache, calls = ChunkVectorCache(1 << 20), []
    project = _project(calls)
    ids, mask = _batch([[1], [2]])
    cached_projection(cache, ids, mask, project)
    calls.clear()
    assert torch.equal(cached_projection(cache, ids, mask, project), project(ids, mask))
    assert len(calls) == 1  # only the comparison above
    empty = torch.zeros(0, 4, dtype=torch.int64)
    assert cached_projection(cache, empty, empty, project).shape == (0, HIDDEN)


def test_lru_eviction_keeps_the_byte_bound():
    row_bytes = HIDDEN * 4
    cache, calls = ChunkVectorCache(3 * row_bytes), []
    project = _project(calls)
    for row in ([1], [2], [3]):
        cached_projection(cache, *_batch([row]), project)
    cached_projection(cache, *_batch([[1]]), project)  # 1 is now the most recent
    cached_projection(cache, *_batch([[4]]), project)  # evicts 2, the least recent
    assert cache.stats().entries == 3 and cache.stats().bytes == 3 * row_bytes
    calls.clear()
    cached_projection(cache, *_batch([[1], [3], [4], [2]]), project)
    assert [r[0].item() for r in calls[0]] == [2]


def test_disabled_cache_computes_everything():
    cache, calls = ChunkVectorCache(0), []
    project = _project(calls)
    ids, mask = _batch([[1], [1]])
    cached_projection(cache, ids, mask, project)
    cached_projection(cache, ids, mask, project)
    assert len(calls) == 2 and cache.stats().entries == 0


def test_stats_file(tmp_path):
    path = tmp_path / "stats.json"
    cache, calls = ChunkVectorCache(1 << 20, stats_file=str(path)), []
    ids, mask = _batch([[1], [2], [1]])
    cached_projection(cache, ids, mask, _project(calls))
    cached_projection(cache, ids, mask, _project(calls))
    stats = json.loads(path.read_text())
    assert stats["hits"] == 3 and stats["misses"] == 3 and stats["hit_rate"] == 0.5
    assert stats["entries"] == 2


def test_size_from_environment(monkeypatch):
    monkeypatch.delenv(CACHE_BYTES_ENV, raising=False)
    assert cache_bytes_from_env() == DEFAULT_CACHE_BYTES
    monkeypatch.setenv(CACHE_BYTES_ENV, "0")
    assert cache_bytes_from_env() == 0
    for bad in ("-1", "lots"):
        monkeypatch.setenv(CACHE_BYTES_ENV, bad)
        with pytest.raises(ValueError, match=CACHE_BYTES_ENV):
            cache_bytes_from_env()


def test_preload_keys_an_index_as_the_engine_keys_a_request(tiny_ckpt, builder, tmp_path):
    """An index's REFRAG cache, preloaded, holds every chunk of its passages under the key the
    engine computes for those passages sent as text (the processor's tokenization), with the
    index's vectors; an index of another checkpoint is refused."""
    from helpers import PASSAGES, index_of

    from refrag_vllm.encoder import tokenize_chunks
    from refrag_vllm.retrieval.index import CacheMismatchError
    from tiny_models import make_tiny_checkpoint

    index = index_of(PASSAGES, tmp_path, tiny_ckpt)
    cache = ChunkVectorCache(1 << 20)
    put = preload(cache, [index.path], tiny_ckpt, torch.bfloat16)
    assert put == sum(len(builder.chunk_passage(p)) for p in PASSAGES) == cache.stats().entries
    enc_tok = AutoTokenizer.from_pretrained(str(tiny_ckpt / ENCODER_TOKENIZER_DIR))
    prompt = builder.build("Which passage?", PASSAGES)
    for row, item in enumerate(prompt["multi_modal_data"]["refrag_chunk"]):
        ids, mask = tokenize_chunks(enc_tok, item.texts, builder.cfg.encoder_max_tokens)
        found = cache.get(chunk_keys(ids, mask))
        assert all(v is not None for v in found)
        assert torch.equal(torch.stack(found), index.chunk_embeds(row).to(torch.bfloat16))
    assert preload(ChunkVectorCache(0), [index.path], tiny_ckpt, torch.bfloat16) == 0  # cache off
    other = make_tiny_checkpoint(tmp_path / "other", k=16, seed=1)
    with pytest.raises(CacheMismatchError, match="built for checkpoint"):
        preload(ChunkVectorCache(1 << 20), [index.path], other, torch.bfloat16)


def test_cache_logs_through_vllms_logger():
    """The hit-rate and preload lines go where vLLM's own do (its handler, its level)."""
    import logging

    from refrag_vllm.chunk_cache import logger

    vllm_logger = logging.getLogger("vllm")  # configured by vLLM when an engine or server starts
    assert logger.name.startswith("vllm.") and logger.parent is vllm_logger


def test_preload_folders_from_environment(monkeypatch):
    monkeypatch.setenv(PRELOAD_ENV, "a/index, b/index,")
    assert preload_dirs_from_env() == [Path("a/index"), Path("b/index")]
    monkeypatch.delenv(PRELOAD_ENV)
    assert preload_dirs_from_env() == []


def test_serve_refuses_a_preload_index_it_cannot_use(tiny_ckpt, tmp_path):
    """``refrag-vllm serve --preload-index`` checks the index before starting the server."""
    from helpers import PASSAGES, index_of

    from refrag_vllm.cli import main
    from tiny_models import make_tiny_checkpoint

    with pytest.raises(SystemExit, match="not an index"):
        main(["serve", str(tiny_ckpt), "--preload-index", str(tmp_path / "nowhere")])
    index = index_of(PASSAGES[:1], tmp_path, tiny_ckpt)
    other = make_tiny_checkpoint(tmp_path / "other", k=16, seed=1)
    with pytest.raises(SystemExit, match="built for checkpoint"):
        main(["serve", str(other), "--preload-index", str(index.path)])


def test_serve_takes_the_checkpoint_only_as_its_first_word():
    from refrag_vllm.cli import split_serve_args

    assert split_serve_args(["CKPT", "--port", "8123"]) == ("CKPT", ["--port", "8123"])
    assert split_serve_args(["--port", "8123", "--max-model-len", "4096"]) == (
        None, ["--port", "8123", "--max-model-len", "4096"])
    assert split_serve_args([]) == (None, [])


def test_serve_adds_its_defaults_only_where_not_given(monkeypatch):
    from refrag_vllm.cli import with_serve_defaults
    from refrag_vllm.engine import KV_CACHE_BYTES
    from refrag_vllm.middleware import SIZE_LIMIT_MIDDLEWARE

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    defaults = ["--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--middleware", SIZE_LIMIT_MIDDLEWARE]
    assert with_serve_defaults(["--port", "8123"], "bfloat16") == ["--port", "8123", *defaults]
    assert with_serve_defaults([], "float32") == [*defaults, "--dtype", "float32"]
    mine = ["--dtype=bfloat16", "--kv-cache-memory-bytes", "1G", "--middleware", SIZE_LIMIT_MIDDLEWARE]
    assert with_serve_defaults(mine, "float32") == mine


def test_engines_and_the_index_run_in_float32_only_on_a_cpu_without_native_bf16(monkeypatch):
    import platform

    import torch

    from refrag_vllm import engine

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert isinstance(engine.cpu_has_native_bf16(), bool) if x86 else engine.cpu_has_native_bf16() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, dtype in ((True, "bfloat16"), (None, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda native=native: native)
        assert engine.serving_dtype() == dtype
        # the index's and the policy's encoder: bf16 weights run as the engines do; others as stored
        assert engine.compute_dtype(torch.bfloat16) == getattr(torch, dtype)
        assert engine.compute_dtype(torch.float32) == torch.float32
