"""Warm RAG traffic through the OpenAI server: repeated passages, a stock streaming client.

    python -m benchmarks.warm --model CKPT --out benchmarks/results/cpu/warm [--quick]

Real RAG traffic repeats passages (popular documents, follow-up questions). This benchmark
draws every request's ``top_k`` passages from one fixed pool of real passages (docstrings,
:class:`benchmarks.workload.PassageSource`) with Zipf-like popularity (passage ``i`` of the
pool is drawn with weight ``1 / (i + 1) ** zipf``, without replacement within a request, in
a random rank order), then asks one of a few questions about them. Every condition replays
the same request sequence on its own fresh ``vllm serve`` with the same flags (the README's,
vLLM's defaults otherwise: prefix caching on), one condition after another in this one run:

* ``vanilla``         passages as plain text; vLLM's prefix cache is its reuse;
* ``refrag``          ``<passage>`` markup, what a stock client sends; the engine's
                      chunk-vector cache on (its default size);
* ``refrag-preloaded``  the same text, the chunk-vector cache preloaded when the server starts
                      (``REFRAG_CHUNK_CACHE_PRELOAD``) from an index of the pool built by
                      ``refrag-vllm index``'s code, before the run and not timed, as the cached
                      client's store is;
* ``refrag-no-chunk-cache``  the same with ``REFRAG_CHUNK_CACHE_BYTES=0``;
* ``refrag-cached``   the client sends projected vectors (``format="projected"``) from its
                      own REFRAG cache, filled before the run and not timed (the mode names
                      are :mod:`refrag_vllm.modes`).

Per condition: ``warmup`` untimed requests, then for each concurrency level ``requests``
streamed chat requests: TTFT p50/p99, requests/s and output tokens/s, the chunk-vector
cache's hit rate (its stats file) and vLLM's prefix-cache hit rate (``/metrics``), beside how
many of the level's requests bring a passage no earlier request had (the same for every
condition: no cache filled by traffic can have it, and text passages pay the encoder). It also
reports the bytes one cached passage holds in the chunk cache against the KV-cache bytes of
the same tokens. Writes ``warm.json``, ``warm.md`` and ``warm_ttft.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from refrag_vllm.markdown import table_lines
from refrag_vllm.modes import REFRAG, REFRAG_CACHED, VANILLA

from .options import parse_profile, profile_dtype, profile_parser, run_log
from .summary import PRELOADED, merge_summary, warm_summary

NO_CHUNK_CACHE = REFRAG + "-no-chunk-cache"
"""Chunk text with the engine's chunk-vector cache turned off."""
CONDITIONS = (VANILLA, REFRAG, PRELOADED, NO_CHUNK_CACHE, REFRAG_CACHED)
QUESTIONS = (
    "Which function fits here, and what does it return?",
    "What arguments does it take?",
    "Which exception can it raise, and when?",
    "How do these two functions differ?",
    "Give a one-line example of its use.",
    "What is the default behaviour?",
)


@dataclass
class WarmConfig:
    """A profile; every field is also a command-line flag."""

    pool_passages: int = 160
    """Distinct real passages every request draws from."""
    passage_tokens: int = 256
    """Decoder tokens per passage."""
    top_k: int = 8
    """Passages per request."""
    zipf: float = 1.0
    """Exponent of the popularity law: passage i is drawn with weight ``1 / (i + 1) ** zipf``."""
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    """Requests in flight, one timed level each."""
    requests: int = 24
    """Timed requests per concurrency level."""
    warmup: int = 96
    """Untimed requests first (at concurrency 4), so that the caches are warm when timing starts:
    the default's show the server 140 of the pool's 160 passages, and 5 of the first level's 24
    requests still bring one never seen (12 of 24 after a warm-up of 32)."""
    output_tokens: int = 16
    """Tokens each request generates."""
    max_model_len: int = 8192
    """The servers' ``--max-model-len``."""
    kv_cache_bytes: str = "2G"
    """The servers' ``--kv-cache-memory-bytes``."""
    seed: int = 0
    """Seed of the request sequence (the same for every condition)."""
    enforce_eager: bool = False
    """The servers' ``--enforce-eager``."""
    dtype: str = ""
    """The servers' ``--dtype``; empty: what ``refrag-vllm serve`` picks
    (:func:`refrag_vllm.engine.serving_dtype`)."""


PROFILES = {
    "default": WarmConfig(),
    "quick": WarmConfig(pool_passages=12, passage_tokens=64, top_k=3, concurrency=[1, 2], requests=4, warmup=4,
                        output_tokens=4, max_model_len=1024, kv_cache_bytes="512M", enforce_eager=True),
}


def zipf_requests(cfg: WarmConfig) -> list[tuple[list[int], str]]:
    """The request sequence every condition replays: (passage indices in rank order, question)."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    weights = 1.0 / np.arange(1, cfg.pool_passages + 1) ** cfg.zipf
    weights /= weights.sum()
    total = cfg.warmup + cfg.requests * len(cfg.concurrency)
    out = []
    for i in range(total):
        picked = rng.choice(cfg.pool_passages, size=cfg.top_k, replace=False, p=weights)
        out.append(([int(j) for j in picked], QUESTIONS[i % len(QUESTIONS)]))
    return out


def first_sight_requests(plan, cfg: WarmConfig) -> list[int]:
    """Per concurrency level, its timed requests that bring a passage no earlier request of
    ``plan`` (warm-up included) had."""
    seen: set[int] = set()
    new = []
    for picked, _ in plan:
        new.append(any(j not in seen for j in picked))
        seen.update(picked)
    return [sum(new[cfg.warmup + i * cfg.requests: cfg.warmup + (i + 1) * cfg.requests])
            for i in range(len(cfg.concurrency))]


class Messages:
    """Each condition's chat message for a request, from the same pool of passages."""

    def __init__(self, model_dir: str, cfg: WarmConfig) -> None:
        import torch
        from tqdm import tqdm

        from refrag_vllm.chunks import CompressedChunks
        from refrag_vllm.prompt import RefragPromptBuilder
        from refrag_vllm.reference import RefragReferenceModel

        from .workload import PassageSource, plain_user_message

        self.builder = RefragPromptBuilder.from_pretrained(model_dir)
        source = PassageSource(self.builder.tokenizer, cfg.passage_tokens)
        self.pool = [source.passages(cfg.passage_tokens)[0] for _ in range(cfg.pool_passages)]
        self._plain = plain_user_message
        reference = RefragReferenceModel.load(model_dir, dtype=torch.float32)
        self.vectors = []  # the client's store: one projected item per pool passage
        with torch.no_grad():
            for text in tqdm(self.pool, desc="client vector store", unit="passage"):
                chunks = self.builder.chunk_texts(text)
                projected = reference.project_item(CompressedChunks.from_texts(chunks)).float()
                self.vectors.append(CompressedChunks.from_projected_embeds(projected))
        del reference
        self.chunks_per_passage = statistics.mean(item.num_chunks for item in self.vectors)

    def content(self, condition: str, picked: list[int], question: str) -> str:
        if condition == VANILLA:
            return self._plain(question, [self.pool[i] for i in picked])
        if condition == REFRAG_CACHED:
            return self.builder.format_user_message(question, [self.vectors[i] for i in picked])
        return self.builder.format_user_message(question, [self.pool[i] for i in picked])


def stream_chat(client, model: str, content: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed chat request: (start, seconds to the first token, output tokens)."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    first, tokens = None, 0
    for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None or tokens != max_tokens:
        raise RuntimeError(f"the server streamed {tokens} tokens, {max_tokens} asked")
    return start, first - start, tokens


_COUNTER = re.compile(r"^(vllm:prefix_cache_(?:queries|hits))(?:_total)?(?:\{[^}]*\})? ([0-9.eE+]+)$", re.M)


def prefix_cache_counters(base_url: str) -> dict[str, float]:
    """vLLM's prefix-cache query and hit counters (tokens), summed over label sets."""
    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = {"vllm:prefix_cache_queries": 0.0, "vllm:prefix_cache_hits": 0.0}
    for name, value in _COUNTER.findall(text):
        out[name] += float(value)
    return out


def _rate(after: dict, before: dict, hits: str, total: str | None = None, misses: str | None = None) -> float | None:
    h = after[hits] - before[hits]
    n = (after[total] - before[total]) if total else h + after[misses] - before[misses]
    return h / n if n else None


def server_flags(cfg: WarmConfig) -> list[str]:
    """The README's serve flags, with what ``refrag-vllm serve`` adds to them (vLLM defaults
    otherwise), plus client-sent vectors allowed."""
    from refrag_vllm.cli import with_serve_defaults

    flags = ["--max-model-len", str(cfg.max_model_len), "--skip-mm-profiling",
             "--kv-cache-memory-bytes", cfg.kv_cache_bytes, "--enable-mm-embeds", "--seed", str(cfg.seed)]
    return with_serve_defaults(flags + (["--enforce-eager"] if cfg.enforce_eager else []), profile_dtype(cfg))


def pool_index(model_dir: str, messages: Messages, folder: Path) -> Path:
    """The pool's passages indexed for ``model_dir`` in ``folder`` (``refrag-vllm index``'s
    build): what the ``refrag-preloaded`` server loads into its chunk-vector cache."""
    from refrag_vllm.retrieval.index import build_index

    corpus = folder / "pool.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in messages.pool))
    return build_index(corpus, folder / "index", model_dir).path


def run_condition(condition: str, model_dir: str, cfg: WarmConfig, messages: Messages, plan, out: Path,
                  log, index_dir: Path | None = None) -> dict:
    from openai import OpenAI

    from refrag_vllm.chunk_cache import CACHE_BYTES_ENV, PRELOAD_ENV, STATS_FILE_ENV

    from .server import VllmServer

    stats_file = out / f"chunk_cache_{condition}.json"
    stats_file.unlink(missing_ok=True)
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", STATS_FILE_ENV: str(stats_file),
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}",
           CACHE_BYTES_ENV: "0" if condition == NO_CHUNK_CACHE else None,
           PRELOAD_ENV: str(index_dir) if condition == PRELOADED else None}
    empty = {"hits": 0, "misses": 0, "entries": 0, "bytes": 0}
    read_stats = lambda: json.loads(stats_file.read_text()) if stats_file.exists() else dict(empty)
    with VllmServer(model_dir, server_flags(cfg), env=env, log_path=out / f"server_{condition}.log") as server:
        client = OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
        send = lambda req: stream_chat(client, server.model, messages.content(condition, *req), cfg.output_tokens)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, plan[:cfg.warmup]))
        rows, offset = [], cfg.warmup
        for c, first_sight in zip(cfg.concurrency, first_sight_requests(plan, cfg)):
            batch = plan[offset:offset + cfg.requests]
            offset += cfg.requests
            stats_before, prefix_before = read_stats(), prefix_cache_counters(server.base)
            began = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                results = list(pool.map(send, batch))
            wall = time.perf_counter() - began
            stats_after, prefix_after = read_stats(), prefix_cache_counters(server.base)
            ttfts = sorted(r[1] for r in results)
            row = {"condition": condition, "concurrency": c, "requests": len(batch), "first_sight_requests": first_sight,
                   "ttft_p50_s": statistics.median(ttfts),
                   "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
                   "requests_per_s": len(batch) / wall, "output_tokens_per_s": sum(r[2] for r in results) / wall,
                   "chunk_cache_hit_rate": None if condition == VANILLA else
                   _rate(stats_after, stats_before, "hits", misses="misses"),
                   "prefix_cache_hit_rate": _rate(prefix_after, prefix_before, "vllm:prefix_cache_hits",
                                                  "vllm:prefix_cache_queries")}
            rows.append(row)
            log(f"{condition:20s} c={c:<3d} ttft p50 {row['ttft_p50_s']:.3f}s p99 {row['ttft_p99_s']:.3f}s "
                f"{row['requests_per_s']:.2f} req/s, chunk-cache hits {row['chunk_cache_hit_rate']}, "
                f"prefix-cache hits {row['prefix_cache_hit_rate']}")
        final = read_stats()
    return {"rows": rows, "chunk_cache": final}


def passage_bytes(model_dir: str, cfg: WarmConfig, messages: Messages, cache: dict) -> dict:
    """Bytes one pool passage holds in the chunk-vector cache vs its tokens' KV cache."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_per_token = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 2  # bf16
    per_vector = cache["bytes"] / cache["entries"] if cache.get("entries") else None
    vector_bytes = per_vector * messages.chunks_per_passage if per_vector else None
    kv_bytes = kv_per_token * cfg.passage_tokens
    return {"chunks_per_passage": messages.chunks_per_passage, "chunk_size": config["refrag"]["chunk_size"],
            "kv_bytes_per_token": kv_per_token, "bytes_per_vector": per_vector,
            "chunk_cache_bytes_per_passage": vector_bytes, "kv_bytes_per_passage": kv_bytes,
            "kv_over_chunk_cache": kv_bytes / vector_bytes if vector_bytes else None}


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [f"# Warm RAG traffic through `vllm serve`: {cfg['top_k']} of {cfg['pool_passages']} passages "
             f"({cfg['passage_tokens']} tokens each), Zipf {cfg['zipf']}", "",
             f"Command: `{res['command']}` ({res['wall_s']:.0f} s). Model: `{res['model']}`, served in "
             f"{cfg['dtype']}.", ""]
    vanilla = {r["concurrency"]: r["ttft_p50_s"] for r in res["conditions"][VANILLA]["rows"]}
    pct = lambda x: "—" if x is None else f"{100 * x:.0f}%"
    lines += table_lines(
        ["condition", "concurrency", "requests with a new passage", "TTFT p50 (s)", "TTFT p99 (s)", "req/s",
         "output tok/s", "chunk-cache hits", "prefix-cache hits", "TTFT p50 vs vanilla"],
        [(condition, r["concurrency"], f"{r['first_sight_requests']} of {r['requests']}", f"{r['ttft_p50_s']:.3f}",
          f"{r['ttft_p99_s']:.3f}",
          f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.1f}", pct(r["chunk_cache_hit_rate"]),
          pct(r["prefix_cache_hit_rate"]), f"{vanilla[r['concurrency']] / r['ttft_p50_s']:.1f}x")
         for condition, result in res["conditions"].items() for r in result["rows"]])
    b = res["passage_bytes"]
    if b["chunk_cache_bytes_per_passage"]:
        lines += ["", f"One cached passage ({cfg['passage_tokens']} tokens, {b['chunks_per_passage']:.1f} chunks) "
                  f"holds {b['chunk_cache_bytes_per_passage'] / 1024:.1f} KiB in the chunk-vector cache; the KV "
                  f"cache of the same tokens is {b['kv_bytes_per_passage'] / 1024:.0f} KiB "
                  f"({b['kv_over_chunk_cache']:.0f}x more)."]
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = res["config"]["concurrency"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(res["conditions"])
    for i, (condition, result) in enumerate(res["conditions"].items()):
        p50 = [r["ttft_p50_s"] for r in result["rows"]]
        ax.bar([x + i * width for x in range(len(levels))], p50, width, label=condition)
    ax.set_xticks([x + width * (len(res["conditions"]) - 1) / 2 for x in range(len(levels))], [str(c) for c in levels])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("TTFT p50 (s)")
    ax.set_title("Warm RAG traffic, stock streaming client")
    ax.legend()
    path = out / "warm_ttft.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None) -> tuple[argparse.Namespace, WarmConfig]:
    p = profile_parser(__doc__, "folder for warm.json / warm.md / warm_ttft.png", "tiny profile: checks the harness, not timings", WarmConfig)
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated subset of " + ",".join(CONDITIONS))
    p.add_argument("--summary", default=None, help="merge the headline ratios into this results.json's summary "
                   "(benchmarks/summary.py), e.g. the cold run's benchmarks/results/cpu/results.json")
    args, cfg = parse_profile(p, argv, PROFILES)
    unknown = set(args.conditions.split(",")) - set(CONDITIONS)
    if unknown:
        p.error(f"unknown condition(s) {sorted(unknown)}")
    return args, cfg


def main(argv=None) -> dict:
    args, cfg = parse_args(argv)
    cfg.dtype = profile_dtype(cfg)  # warm.json records the dtype the servers ran in
    out = Path(args.out)
    log = run_log(out)
    started = time.perf_counter()
    messages = Messages(args.model, cfg)
    plan = zipf_requests(cfg)
    distinct = len({j for picked, _ in plan for j in picked})
    warmed = len({j for picked, _ in plan[:cfg.warmup] for j in picked})
    log(f"{len(plan)} requests over {distinct} distinct passages of {cfg.pool_passages}; the {cfg.warmup} "
        f"warm-up requests show {warmed}; timed requests with a new passage, per level: "
        f"{first_sight_requests(plan, cfg)} of {cfg.requests}")
    results = {"command": " ".join(["python -m benchmarks.warm"] + (argv if argv is not None else sys.argv[1:])),
               "config": dataclasses.asdict(cfg), "model": str(args.model), "distinct_passages": distinct,
               "warmup_passages": warmed,
               "conditions": {}}
    conditions = [c for c in CONDITIONS if c in args.conditions.split(",")]
    with tempfile.TemporaryDirectory(prefix="warm-pool-") as folder:  # the index is not a result
        index_dir = pool_index(args.model, messages, Path(folder)) if PRELOADED in conditions else None
        for condition in conditions:
            results["conditions"][condition] = run_condition(condition, args.model, cfg, messages, plan, out, log,
                                                             index_dir)
    cache = results["conditions"].get(REFRAG, {}).get("chunk_cache", {})
    results["passage_bytes"] = passage_bytes(args.model, cfg, messages, cache)
    results["wall_s"] = time.perf_counter() - started
    results["summary"] = warm_summary(results)
    (out / "warm.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.summary:
        merge_summary(args.summary, results["summary"])
    if VANILLA in results["conditions"]:
        (out / "warm.md").write_text(markdown(results))
    plot(results, out)
    log(f"done in {results['wall_s']:.0f}s: {out / 'warm.md'}")
    return results


if __name__ == "__main__":
    main()
