"""TTFT / TPOT / throughput / KV of REFRAG vs vanilla RAG on the same vLLM engine.

    python -m benchmarks.ttft --model CKPT --out benchmarks/results/cpu [--quick]

One run measures, side by side (same engine settings for every mode, prefix
caching off, fresh passages for every request, so every prefill is cold):

* **offline engine** (``vllm.LLM``): per mode, k and context length, TTFT at batch 1
  (wall time of ``generate(max_tokens=1)``, median and spread over repeats, after a
  warm-up), time per output token, KV-cache blocks, peak memory of the engine's
  processes; throughput with many concurrent requests;
* the **ceiling**: plain tokens with exactly as many decoder positions as each
  REFRAG prompt, on the same engine (the best any compression could do);
* **plain transformers** prefill of the same decoder at the vanilla lengths (the
  engine is not a strawman);
* the **OpenAI-compatible server** (``vllm serve``) seen from a streaming client,
  and, for vanilla, ``vllm bench serve`` on the same prompts as a cross-check;
* the checkpoint's **encoder + projector alone**, after the engine, on as many chunks as
  the longest vanilla length holds (``encoder_engine_vs_standalone_rate``).

Writes ``results.json``, ``results.md`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from refrag_vllm.modes import REFRAG, REFRAG_CACHED, REFRAG_POLICY, VANILLA

from .options import parse_profile, profile_dtype, profile_parser, run_log


@dataclass
class BenchConfig:
    """A profile; every field is also a command-line flag."""

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 0])
    """Context lengths (tokens) every mode serves; 0: the longest vanilla fits in max_model_len."""
    beyond: list[int] = field(default_factory=lambda: [16384, 32768])
    """Longer contexts, for REFRAG modes only (past the decoder's window uncompressed)."""
    ks: list[int] = field(default_factory=lambda: [8, 16, 32])
    """Chunk sizes of the REFRAG modes."""
    repeats: int = 3
    """Timed runs per point; the median counts."""
    decode_tokens: int = 16
    """Output tokens of the TPOT run (one per point)."""
    policy_k: int = 16
    """k of the policy mode (the checkpoint's RL policy expands some chunks)."""
    policy_fraction: float = 0.1
    """Share of chunks the policy mode keeps as raw tokens."""
    throughput_length: int = 2048
    """Context tokens per request of the throughput run."""
    throughput_requests: int = 8
    """Requests submitted together in the throughput run."""
    throughput_tokens: int = 32
    """Output tokens per request of the throughput run."""
    passage_tokens: int = 256
    """Decoder tokens per passage: contexts are whole passages."""
    max_model_len: int = 8192
    """The engines' ``max_model_len``."""
    kv_cache_gib: int = 4
    """The engines' KV cache (VLLM_CPU_KVCACHE_SPACE)."""
    omp_bind: str = "all"
    """VLLM_CPU_OMP_THREADS_BIND: ``all`` (the model's OpenMP threads on every core), ``auto``
    (vLLM's default: one core kept for the scheduler process) or a core list such as ``0-1``.
    On the 2-core machine ``all`` made vanilla prefill 1.8x faster (benchmarks/results/tuning)."""
    reserved_cpus: int = 0
    """VLLM_CPU_NUM_OF_RESERVED_CPU (-1: vLLM's default)."""
    threads: int = 0
    """Threads of the plain-transformers baseline (0: torch's default)."""
    enforce_eager: bool = False
    """The engines' ``enforce_eager`` (no CUDA graphs or ``torch.compile``)."""
    skip_mm_profiling: bool = True
    """Skip vLLM's start-up run of the chunk encoder on its largest dummy batch (32 items of
    256 chunks).  On this CPU machine that run left the engine's worker at 17.2 GiB resident
    instead of 5.5 GiB, and it sizes nothing on CPU (the KV cache size is set explicitly)."""
    server: bool = True
    """Also time the OpenAI server with a streaming client."""
    server_lengths: list[int] = field(default_factory=lambda: [2048, 0])
    """The server run's context lengths (0 as in ``lengths``)."""
    server_beyond: list[int] = field(default_factory=lambda: [32768])
    """The server run's longer contexts, REFRAG modes only."""
    server_k: int = 16
    """k of the server run's REFRAG modes."""
    bench_serve: bool = True
    """Also cross-check vanilla with vLLM's own ``vllm bench serve``."""
    bench_serve_lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    """Vanilla lengths cross-checked with ``vllm bench serve`` (same prompts, ours vs theirs)."""
    hf_baseline: bool = True
    """Also time plain transformers (the same checkpoint, no vLLM)."""
    hf_repeats: int = 2
    """Timed runs per point of the transformers baseline."""
    dtype: str = ""
    """The engines' and the transformers baseline's dtype (empty: ``refrag_vllm.engine.serving_dtype``,
    bfloat16 unless this is an x86 CPU without native bf16)."""


PROFILES = {
    "default": BenchConfig(),
    "quick": BenchConfig(lengths=[256, 512], beyond=[2048], ks=[16], repeats=1, decode_tokens=4,
                         throughput_length=256, throughput_requests=2, throughput_tokens=4,
                         passage_tokens=128, max_model_len=1024, kv_cache_gib=1, enforce_eager=True,
                         server_lengths=[256], server_beyond=[2048], bench_serve_lengths=[256], hf_repeats=1),
}


def _median_spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "all": xs}


class PeakMemory:
    """Peak resident memory of this process and its children (the engine), from the
    kernel's own high-water marks (``VmHWM``), so nothing is sampled while timing.

    Entering resets the marks (``/proc/PID/clear_refs``); ``peak`` is the sum of the
    processes' peaks on exit (shared pages count once per process, so it is an upper bound).
    """

    def __enter__(self) -> "PeakMemory":
        for pid in self._pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        self.by_process: dict[str, int] = {}
        for pid, name in self._processes():
            self.by_process[name] = self.by_process.get(name, 0) + self._hwm(pid)
        self.peak = sum(self.by_process.values())

    def mib(self) -> dict[str, int]:
        return {name: round(b / 2**20) for name, b in self.by_process.items() if b >= 2**20}

    @classmethod
    def _pids(cls) -> list[int]:
        return [pid for pid, _ in cls._processes()]

    @staticmethod
    def _processes() -> list[tuple[int, str]]:
        """(pid, name): this process is ``client``; vLLM names its own (``VLLM::Worker``...)."""
        import psutil

        me = psutil.Process()
        out = [(me.pid, "client")]
        for c in me.children(recursive=True):
            try:
                out.append((c.pid, c.cmdline()[0] if c.cmdline() and c.cmdline()[0].startswith("VLLM::") else "other"))
            except psutil.Error:
                pass
        return out

    @staticmethod
    def _hwm(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


# ---------------------------------------------------------------- offline engine
class OfflineEngine:
    """``vllm.LLM`` with the benchmark's engine settings (identical for every mode)."""

    def __init__(self, model: str, cfg: BenchConfig) -> None:
        from vllm import LLM

        self.llm = LLM(**engine_args(model, cfg))
        vc = self.llm.llm_engine.vllm_config
        self.block_size = vc.cache_config.block_size
        hf = vc.model_config.hf_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        itemsize = 2 if str(vc.model_config.dtype) in ("torch.bfloat16", "torch.float16") else 4
        self.kv_bytes_per_position = 2 * hf.num_hidden_layers * hf.num_key_value_heads * head_dim * itemsize

    def generate(self, prompts: list[dict], max_tokens: int):
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return self.llm.generate(prompts, sp, use_tqdm=False)

    def measure(self, prompt: dict, decode_tokens: int) -> tuple[float, float, int]:
        """One request, ``1 + decode_tokens`` output tokens, batch 1.

        Returns (TTFT, TPOT, positions the engine saw).  TTFT is the wall time of
        ``generate`` minus the engine's decode time (first to last token), so it
        covers everything from the call to the first token, input processing included.
        """
        start = time.perf_counter()
        out = self.generate([prompt], 1 + decode_tokens)[0]
        wall = time.perf_counter() - start
        m = out.metrics
        decode = m.last_token_ts - m.first_token_ts
        return wall - decode, decode / max(1, m.num_generation_tokens - 1), len(out.prompt_token_ids)

    def kv_blocks(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    def shutdown(self) -> None:
        import gc

        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del self.llm
        gc.collect()


def engine_args(model: str, cfg: BenchConfig) -> dict:
    """One place for the engine settings, so the offline engine and the server match."""
    return dict(model=model, max_model_len=cfg.max_model_len, max_num_batched_tokens=cfg.max_model_len,
                max_num_seqs=max(cfg.throughput_requests, 1), enable_prefix_caching=False,
                mm_processor_cache_gb=0, enforce_eager=cfg.enforce_eager, dtype=profile_dtype(cfg), seed=0,
                disable_log_stats=False, skip_mm_profiling=cfg.skip_mm_profiling, enable_mm_embeds=True)


def server_flags(cfg: BenchConfig) -> list[str]:
    args = engine_args("", cfg)
    flags = ["--max-model-len", str(args["max_model_len"]),
             "--max-num-batched-tokens", str(args["max_num_batched_tokens"]),
             "--max-num-seqs", str(args["max_num_seqs"]), "--no-enable-prefix-caching",
             "--mm-processor-cache-gb", "0", "--dtype", args["dtype"], "--seed", "0", "--enable-mm-embeds"]
    flags += ["--skip-mm-profiling"] if args["skip_mm_profiling"] else []
    return flags + (["--enforce-eager"] if cfg.enforce_eager else [])


def engine_env(cfg: BenchConfig) -> dict:
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}" if cfg.omp_bind == "all" else cfg.omp_bind}
    if cfg.reserved_cpus >= 0:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.reserved_cpus)
    return env


def vanilla_max_length(factory, cfg: BenchConfig) -> int:
    """The longest context (tokens, multiple of 256) whose vanilla prompt + output fit the window."""
    overhead = len(factory._head) + len(factory._tail) + 64  # separators between passages, margin
    return (cfg.max_model_len - cfg.decode_tokens - overhead) // 256 * 256


def measure_point(engine: OfflineEngine, make, cfg: BenchConfig) -> dict:
    """TTFT and TPOT over ``repeats`` fresh requests, KV blocks and peak memory."""
    ttfts, tpots, prep, positions = [], [], [], []
    for _ in range(cfg.repeats):
        req = make()
        ttft, tpot, engine_positions = engine.measure(req.prompt, cfg.decode_tokens)
        if engine_positions != req.positions:
            raise RuntimeError(f"{req.mode}: engine saw {engine_positions} positions, prompt has {req.positions}")
        ttfts.append(ttft + req.prep_seconds)
        tpots.append(tpot)
        prep.append(req.prep_seconds)
        positions.append(req.positions)
    pos = statistics.median(positions)
    return {"mode": req.mode, "k": req.k, "context_tokens": req.context_tokens, "positions": pos,
            "ttft_s": _median_spread(ttfts), "prep_s": statistics.median(prep), "tpot_s": statistics.median(tpots),
            "kv_blocks": engine.kv_blocks(int(pos) + 1 + cfg.decode_tokens),
            "kv_mib": round((pos + 1 + cfg.decode_tokens) * engine.kv_bytes_per_position / 2**20, 2),
            **req.extra}


def run_offline(model: str, factory, cfg: BenchConfig, lengths: list[int], beyond: list[int], log) -> dict:
    """All offline measurements on one engine."""
    os.environ.update(engine_env(cfg))
    started = time.perf_counter()
    with PeakMemory() as startup_memory:
        engine = OfflineEngine(model, cfg)
    startup = time.perf_counter() - started
    with PeakMemory() as run_memory:
        rows = measure_batch1(engine, factory, cfg, lengths, beyond, log)
        throughput = measure_throughput(engine, factory, cfg, log)
    info = {"startup_s": startup, "block_size": engine.block_size,
            "kv_bytes_per_position": engine.kv_bytes_per_position,
            "peak_memory_startup_mib": round(startup_memory.peak / 2**20),
            "peak_memory_measuring_mib": round(run_memory.peak / 2**20),
            "peak_memory_startup_by_process_mib": startup_memory.mib(),
            "peak_memory_measuring_by_process_mib": run_memory.mib()}
    engine.shutdown()
    return {"rows": rows, "throughput": throughput, "engine": info}


def measure_batch1(engine: OfflineEngine, factory, cfg: BenchConfig, lengths: list[int], beyond: list[int],
                   log) -> list[dict]:
    """TTFT/TPOT at batch 1 for every mode, k and length; the ceiling right after its REFRAG row."""
    from tqdm import tqdm

    plan: list[tuple[str, int | None, int]] = [(VANILLA, None, n) for n in lengths]
    for k in cfg.ks:
        for n in lengths + beyond:
            plan += [(REFRAG_CACHED, k, n), (REFRAG, k, n), ("ceiling", k, n)]
    if factory.has_policy:
        plan += [(REFRAG_POLICY, cfg.policy_k, n) for n in lengths + beyond]
    # warm-up: one request of each mode at the shortest length
    for mode in (VANILLA, REFRAG, REFRAG_CACHED) + ((REFRAG_POLICY,) if factory.has_policy else ()):
        engine.measure(factory.make(mode, lengths[0], cfg.ks[0], cfg.policy_fraction).prompt, 1)
    rows: list[dict] = []
    cached_positions: dict[tuple[int, int], int] = {}
    for mode, k, n in tqdm(plan, desc="offline", unit="point", file=sys.stdout):
        if mode == "ceiling":
            target = cached_positions[(k, n)]
            row = measure_point(engine, lambda: factory.ceiling(target, n, k), cfg)
        else:
            row = measure_point(engine, lambda: factory.make(mode, n, k, cfg.policy_fraction), cfg)
        if mode == REFRAG_CACHED:
            cached_positions[(k, n)] = int(row["positions"])
        rows.append(row)
        log(f"offline {mode:14s} k={k} s={n}: ttft {row['ttft_s']['median']:.3f}s positions {row['positions']}")
    return rows


def measure_encoder_alone(model: str, factory, cfg: BenchConfig, n: int, k: int, log) -> dict:
    """The checkpoint's encoder + projector alone (the index's :class:`CacheProjector`, in the
    checkpoint's dtype, in this process after the engine has shut down) on the chunks of
    ``repeats`` fresh contexts of ``n`` tokens, cut at ``k`` as the text path cuts them: the
    standalone rate the engine's text path is held against (``encoder_engine_vs_standalone_rate``)."""
    import torch

    from refrag_vllm.retrieval.index import CacheProjector

    projector = CacheProjector(model)
    if projector.builder.k != k:
        raise ValueError(f"the checkpoint's k is {projector.builder.k}, not {k}")
    seconds, chunks = [], 0
    with torch.no_grad():
        projector.chunk_embedder.embed([c for p in factory.source.passages(n)[:4] for c in projector.builder.chunk_texts(p)])
        for _ in range(cfg.repeats):
            texts = [c for p in factory.source.passages(n) for c in projector.builder.chunk_texts(p)]
            start = time.perf_counter()
            projector.chunk_embedder.embed(texts)
            seconds.append(time.perf_counter() - start)
            chunks = len(texts)
    row = {"context_tokens": n, "k": k, "chunks": chunks, "seconds": _median_spread(seconds),
           "torch_threads": torch.get_num_threads(),
           "encoder": {key: projector.builder.cfg.encoder.get(key) for key in ("model_type", "num_hidden_layers")}}
    log(f"encoder + projector alone, k={k} s={n}: {row['seconds']['median']:.3f}s for {chunks} chunks")
    return row


def measure_throughput(engine: OfflineEngine, factory, cfg: BenchConfig, log) -> list[dict]:
    """Output tokens/s with ``throughput_requests`` requests submitted at once."""
    out = []
    n = cfg.throughput_length
    plan = [(VANILLA, None)] + [(mode, k) for k in cfg.ks for mode in (REFRAG, REFRAG_CACHED)]
    for mode, k in plan + ([(REFRAG_POLICY, cfg.policy_k)] if factory.has_policy else []):
        reqs = [factory.make(mode, n, k, cfg.policy_fraction) for _ in range(cfg.throughput_requests)]
        prep = sum(r.prep_seconds for r in reqs)
        start = time.perf_counter()
        outs = engine.generate([r.prompt for r in reqs], cfg.throughput_tokens)
        seconds = time.perf_counter() - start + prep
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        out.append({"mode": mode, "k": k, "context_tokens": n, "requests": len(reqs),
                    "output_tokens": tokens, "seconds": seconds, "output_tokens_per_s": tokens / seconds})
        log(f"throughput {mode:14s} k={k}: {tokens / seconds:.2f} output tok/s")
    return out


# ---------------------------------------------------------------- transformers
def run_hf_baseline(model: str, factory, cfg: BenchConfig, lengths: list[int], log) -> list[dict]:
    """Plain transformers prefill (one forward pass, the engines' dtype, SDPA) of the same decoder."""
    import torch
    from transformers import LlamaForCausalLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the checkpoint's encoder/projector weights are not the decoder's
    decoder = LlamaForCausalLM.from_pretrained(model, dtype=getattr(torch, profile_dtype(cfg))).eval()
    rows = []
    with torch.inference_mode():
        decoder(torch.tensor([factory.vanilla(lengths[0]).prompt["prompt_token_ids"]]))  # warm-up
        for n in lengths:
            times, positions = [], 0
            for _ in range(cfg.hf_repeats):
                ids = factory.vanilla(n).prompt["prompt_token_ids"]
                positions = len(ids)
                start = time.perf_counter()
                decoder(torch.tensor([ids]), logits_to_keep=1)
                times.append(time.perf_counter() - start)
            rows.append({"context_tokens": n, "positions": positions, "prefill_s": _median_spread(times)})
            log(f"transformers prefill s={n}: {statistics.median(times):.3f}s")
    del decoder
    return rows


# ---------------------------------------------------------------- server
def run_server(model: str, factory, cfg: BenchConfig, lengths: list[int], beyond: list[int], out: Path,
               log) -> dict:
    """``vllm serve`` with the same engine settings; TTFT/TPOT as a streaming client sees them."""
    from openai import OpenAI

    from .server import VllmServer

    k = cfg.server_k
    with VllmServer(model, server_flags(cfg), env=engine_env(cfg), log_path=out / "server.log") as server:
        client = OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
        plan = [(VANILLA, None, n) for n in lengths]
        plan += [(m, k, n) for n in lengths + beyond for m in (REFRAG_CACHED, REFRAG)]
        if factory.has_policy:
            plan += [(REFRAG_POLICY, k, n) for n in lengths + beyond]
        for mode in {m for m, _, _ in plan}:  # warm-up
            stream_request(client, server.model, factory.make(mode, lengths[0], k, cfg.policy_fraction), 2)
        rows = []
        for mode, kk, n in plan:
            ttfts, tpots, positions = [], [], []
            for _ in range(cfg.repeats):
                req = factory.make(mode, n, kk, cfg.policy_fraction)
                ttft, tpot = stream_request(client, server.model, req, 1 + cfg.decode_tokens)
                ttfts.append(ttft + req.prep_seconds)
                tpots.append(tpot)
                positions.append(req.positions)
            rows.append({"mode": mode, "k": kk, "context_tokens": n, "positions": statistics.median(positions),
                         "ttft_s": _median_spread(ttfts), "tpot_s": statistics.median(tpots)})
            log(f"server  {mode:14s} k={kk} s={n}: ttft {statistics.median(ttfts):.3f}s")
        cross = []
        if cfg.bench_serve:
            for n in cfg.bench_serve_lengths:
                cross.append(bench_serve_crosscheck(server, factory, cfg, n, out, client, log))
    return {"rows": rows, "bench_serve": cross}


def stream_request(client, model: str, req, max_tokens: int) -> tuple[float, float]:
    """Streaming completion: (seconds to the first streamed token, seconds per later token)."""
    start = time.perf_counter()
    stream = client.completions.create(model=model, prompt=req.text, max_tokens=max_tokens, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    stamps, tokens = [], 0
    for chunk in stream:
        if chunk.choices:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if not stamps or tokens != max_tokens:
        raise RuntimeError(f"{req.mode}: the server streamed {tokens} tokens, {max_tokens} asked")
    return stamps[0] - start, (stamps[-1] - stamps[0]) / max(1, tokens - 1)


def bench_serve_crosscheck(server, factory, cfg: BenchConfig, n: int, out: Path, client, log) -> dict:
    """vLLM's own ``vllm bench serve`` on vanilla prompts, and our client on the same prompts."""
    import subprocess

    reqs = [factory.vanilla(n) for _ in range(cfg.repeats)]
    dataset = out / f"bench_serve_vanilla_{n}.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": r.text}) + "\n" for r in reqs))
    ours = [stream_request(client, server.model, r, 1 + cfg.decode_tokens)[0] for r in reqs]
    result_name = f"bench_serve_vanilla_{n}.json"
    cmd = [str(Path(sys.executable).parent / "vllm"), "bench", "serve", "--backend", "vllm",
           "--base-url", server.base, "--model", server.model, "--tokenizer", server.model_dir,
           "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
           "--custom-output-len", str(1 + cfg.decode_tokens), "--num-prompts", str(len(reqs)),
           "--max-concurrency", "1", "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
           "--num-warmups", "0", "--disable-tqdm", "--save-result", "--result-dir", str(out),
           "--result-filename", result_name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (out / f"bench_serve_vanilla_{n}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed (see {out}/bench_serve_vanilla_{n}.log):\n{proc.stderr[-2000:]}")
    theirs = json.loads((out / result_name).read_text())
    ours_ms = statistics.median(ours) * 1000
    row = {"context_tokens": n, "requests": len(reqs), "ours_median_ttft_ms": ours_ms,
           "bench_serve_median_ttft_ms": theirs["median_ttft_ms"],
           "difference_pct": 100 * (ours_ms - theirs["median_ttft_ms"]) / theirs["median_ttft_ms"]}
    log(f"cross-check s={n}: ours {ours_ms:.0f} ms, vllm bench serve {theirs['median_ttft_ms']:.0f} ms")
    return row


# ---------------------------------------------------------------- main
def machine() -> dict:
    import psutil
    import torch
    import vllm

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
            "torch_threads": torch.get_num_threads()}


def parse_args(argv=None) -> tuple[argparse.Namespace, BenchConfig]:
    parser = profile_parser(__doc__, "folder for results.json / results.md / plots",
                            "tiny sweep for CI: checks the harness, not timings", BenchConfig)
    parser.add_argument("--summary", default=None,
                        help="also merge this run's encoder keys into that results.json's summary: "
                             "encoder_engine_vs_standalone_rate, and the cold text path's share of the ceiling "
                             "named after the checkpoint's encoder (another checkpoint's sweep keeps its own)")
    return parse_profile(parser, argv, PROFILES)


def encoder_summary(results: dict, summary: dict) -> dict:
    """The keys ``--summary`` merges: the engine-vs-standalone rate, and the text path's share of
    the ceiling as ``k16_text_cold_vs_ceiling_N_<model_type>_<layers>_layers``."""
    encoder = results["encoder_alone"]["encoder"]
    label = f"{encoder['model_type']}_{encoder['num_hidden_layers']}_layers"
    keys = {key: value for key, value in summary.items() if key == "encoder_engine_vs_standalone_rate"}
    keys |= {f"{key}_{label}": value for key, value in summary.items() if "_text_cold_vs_ceiling_" in key}
    return keys


def main(argv=None) -> dict:
    from .report import write_report
    from .summary import SUMMARY_K, cold_summary, merge_summary, read_summary
    from .workload import RequestFactory

    args, cfg = parse_args(argv)
    cfg.dtype = profile_dtype(cfg)  # results.json records the dtype the engines ran in
    out = Path(args.out)
    log = run_log(out)
    started = time.perf_counter()
    factory = RequestFactory(args.model, cfg.passage_tokens)
    longest = vanilla_max_length(factory, cfg)
    lengths = sorted({n if n else longest for n in cfg.lengths})
    beyond = sorted(n for n in cfg.beyond if n > longest)
    server_lengths = sorted({n if n else longest for n in cfg.server_lengths})
    server_beyond = sorted(n for n in cfg.server_beyond if n > longest)
    log(f"lengths {lengths}, beyond the window {beyond}, k {cfg.ks}, longest vanilla context {longest}")
    results = {"command": " ".join(["python -m benchmarks.ttft"] + (argv if argv is not None else sys.argv[1:])),
               "config": dataclasses.asdict(cfg), "machine": machine(), "model": str(args.model),
               "longest_vanilla_context": longest}
    results["offline"] = run_offline(args.model, factory, cfg, lengths, beyond, log)
    if SUMMARY_K in cfg.ks:
        results["encoder_alone"] = measure_encoder_alone(args.model, factory, cfg, max(lengths), SUMMARY_K, log)
    if cfg.hf_baseline:
        results["transformers"] = run_hf_baseline(args.model, factory, cfg, lengths, log)
    if cfg.server:
        results["server"] = run_server(args.model, factory, cfg, server_lengths, server_beyond, out, log)
    results["wall_s"] = time.perf_counter() - started
    results["text_tokens_used"] = factory.source.used_tokens
    results["summary"] = {**read_summary(out / "results.json"), **cold_summary(results)}  # keeps a warm run's keys
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out)
    if args.summary:
        merge_summary(args.summary, encoder_summary(results, results["summary"]))
    log(f"done in {results['wall_s']:.0f}s: {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
