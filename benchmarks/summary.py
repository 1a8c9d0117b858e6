"""The benchmarks' headline ratios, kept as one ``summary`` object in a ``results.json``.

``benchmarks.ttft`` writes its keys into the ``summary`` of its own ``results.json``;
``benchmarks.warm --summary FILE`` merges its keys into FILE's (the cold run's
``results.json``), so that one object holds both. Every value is a ratio of two numbers
measured side by side in one run, or a byte count:

* ``k16_cached_vs_ceiling_N``, ``k16_text_cold_vs_ceiling_N``: the ceiling's TTFT over
  REFRAG k=16's, with cached projected vectors and with chunk text (the encoder in the
  engine, every chunk new), at N context tokens, the longest length measured;
* ``encoder_engine_vs_standalone_rate``: the text path's extra TTFT over cached vectors at
  that length, against the checkpoint's encoder + projector alone on as many chunks (how close
  the engine runs its encoder to the encoder's standalone rate);
* ``warm_text_cached_vs_vector_ttft_p50``: on the warm benchmark, the TTFT p50 of text
  passages with the engine's chunk-vector cache over that of client-sent vectors (at the
  lowest concurrency level, ``warm_concurrency``), the cache filled by the traffic itself;
  ``warm_text_preloaded_vs_vector_ttft_p50`` the same with the cache preloaded from an index
  of the passages (as the cached client's store is filled from one);
* ``warm_text_vs_vanilla_prefix_ttft_p50``: vanilla with vLLM's prefix cache over REFRAG
  text passages with the chunk-vector cache;
* ``index_vs_encoder_rate`` (``benchmarks.index_rate --summary FILE``): the index build's
  chunks/s over the checkpoint's encoder + projector alone on the same chunks;
* ``bytes_per_cached_chunk`` (one projected vector in the chunk-vector cache) and
  ``kv_bytes_per_chunk`` (the KV cache of the k tokens it stands for).
"""

from __future__ import annotations

import json
from pathlib import Path

from refrag_vllm.modes import REFRAG, REFRAG_CACHED, VANILLA

PRELOADED = REFRAG + "-preloaded"
"""``benchmarks.warm``'s chunk text with the engine's chunk-vector cache preloaded from an index."""

SUMMARY_K = 16


def cold_summary(results: dict) -> dict:
    """The ``benchmarks.ttft`` keys, from its results (offline engine, batch 1)."""
    rows = results["offline"]["rows"]
    n = max(r["context_tokens"] for r in rows if r["mode"] == VANILLA)
    ttft = {r["mode"]: r["ttft_s"]["median"] for r in rows if r["k"] == SUMMARY_K and r["context_tokens"] == n}
    summary = {"kv_bytes_per_chunk": results["offline"]["engine"]["kv_bytes_per_position"] * SUMMARY_K}
    if "ceiling" in ttft:
        summary[f"k{SUMMARY_K}_cached_vs_ceiling_{n}"] = ttft["ceiling"] / ttft[REFRAG_CACHED]
        summary[f"k{SUMMARY_K}_text_cold_vs_ceiling_{n}"] = ttft["ceiling"] / ttft[REFRAG]
    alone = results.get("encoder_alone")
    if alone and alone["context_tokens"] == n and REFRAG in ttft and REFRAG_CACHED in ttft:
        summary["encoder_engine_vs_standalone_rate"] = alone["seconds"]["median"] / (ttft[REFRAG] - ttft[REFRAG_CACHED])
    return summary


def warm_summary(results: dict) -> dict:
    """The ``benchmarks.warm`` keys, from its results (the conditions it ran), at the first (lowest)
    concurrency level."""
    first = {condition: result["rows"][0] for condition, result in results["conditions"].items()}
    p50 = {condition: row["ttft_p50_s"] for condition, row in first.items()}
    summary = {"warm_concurrency": next(iter(first.values()))["concurrency"]}
    if REFRAG in p50 and REFRAG_CACHED in p50:
        summary["warm_text_cached_vs_vector_ttft_p50"] = p50[REFRAG] / p50[REFRAG_CACHED]
    if PRELOADED in p50 and REFRAG_CACHED in p50:
        summary["warm_text_preloaded_vs_vector_ttft_p50"] = p50[PRELOADED] / p50[REFRAG_CACHED]
    if REFRAG in p50 and VANILLA in p50:
        summary["warm_text_vs_vanilla_prefix_ttft_p50"] = p50[VANILLA] / p50[REFRAG]
    sizes = results["passage_bytes"]
    if sizes.get("bytes_per_vector"):
        summary["bytes_per_cached_chunk"] = sizes["bytes_per_vector"]
    summary["kv_bytes_per_chunk"] = sizes["kv_bytes_per_token"] * sizes["chunk_size"]
    return summary


def read_summary(path: str | Path) -> dict:
    """The ``summary`` of the results file ``path``; empty when there is none yet."""
    path = Path(path)
    return json.loads(path.read_text()).get("summary", {}) if path.exists() else {}


def merge_summary(path: str | Path, keys: dict) -> dict:
    """Add ``keys`` to the ``summary`` of the JSON file ``path`` (created if missing); returns it."""
    path = Path(path)
    results = json.loads(path.read_text()) if path.exists() else {}
    results["summary"] = {**results.get("summary", {}), **keys}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results["summary"]
