"""results.json -> results.md (paper-style tables with speed-up columns) and PNG plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from refrag_vllm.markdown import table_lines


def _label(row: dict) -> str:
    return row["mode"] if row.get("k") is None else f"{row['mode']} k={row['k']}"


def _index(rows: list[dict]) -> dict:
    return {(r["mode"], r.get("k"), r["context_tokens"]): r for r in rows}


def offline_table(res: dict) -> list[str]:
    rows = res["offline"]["rows"]
    idx = _index(rows)
    header = ["context tokens", "mode", "positions", "TTFT s (median, min–max)", "speed-up vs vanilla",
              "ceiling TTFT s", "ceiling speed-up", "% of ceiling", "ideal ratio", "TPOT ms", "KV blocks", "KV MiB"]
    table = []
    for n in sorted({r["context_tokens"] for r in rows}):
        vanilla = idx.get(("vanilla", None, n))
        for r in [x for x in rows if x["context_tokens"] == n and x["mode"] != "ceiling"]:
            t = r["ttft_s"]
            ceiling = idx.get(("ceiling", r.get("k"), n)) if r["mode"] != "vanilla" else None
            speed = f"{vanilla['ttft_s']['median'] / t['median']:.2f}×" if vanilla else "— (past the window)"
            c_ttft = ceiling["ttft_s"]["median"] if ceiling else None
            c_speed = f"{vanilla['ttft_s']['median'] / c_ttft:.2f}×" if (ceiling and vanilla) else "—"
            of_ceiling = f"{100 * c_ttft / t['median']:.0f}%" if ceiling else "—"
            ideal = f"{vanilla['positions'] / r['positions']:.1f}×" if vanilla else "—"
            table.append([n, _label(r), f"{r['positions']:.0f}", f"{t['median']:.3f} ({t['min']:.3f}–{t['max']:.3f})",
                          speed, "—" if c_ttft is None else f"{c_ttft:.3f}", c_speed, of_ceiling, ideal,
                          f"{1000 * r['tpot_s']:.1f}", r["kv_blocks"], r["kv_mib"]])
    return table_lines(header, table)


def throughput_table(res: dict) -> list[str]:
    rows = res["offline"]["throughput"]
    vanilla = next((r["output_tokens_per_s"] for r in rows if r["mode"] == "vanilla"), float("nan"))
    return table_lines(["mode", "context tokens", "requests", "output tokens", "seconds", "output tok/s", "× vanilla"],
                       [[_label(r), r["context_tokens"], r["requests"], r["output_tokens"], f"{r['seconds']:.2f}",
                         f"{r['output_tokens_per_s']:.2f}", f"{r['output_tokens_per_s'] / vanilla:.2f}"] for r in rows])


def transformers_table(res: dict) -> list[str]:
    idx = _index(res["offline"]["rows"])
    table = []
    for r in res.get("transformers", []):
        v = idx.get(("vanilla", None, r["context_tokens"]))
        hf = r["prefill_s"]["median"]
        vt = v["ttft_s"]["median"] if v else float("nan")
        table.append([r["context_tokens"], r["positions"], f"{hf:.3f}", f"{vt:.3f}", f"{hf / vt:.2f}"])
    return table_lines(["context tokens", "positions", "transformers prefill s", "vLLM vanilla TTFT s",
                        "transformers ÷ vLLM"], table)


def server_table(res: dict) -> list[str]:
    rows = res["server"]["rows"]
    idx = _index(rows)
    table = []
    for r in sorted(rows, key=lambda r: (r["context_tokens"], r["mode"] != "vanilla")):
        v = idx.get(("vanilla", None, r["context_tokens"]))
        t = r["ttft_s"]
        speed = f"{v['ttft_s']['median'] / t['median']:.2f}×" if v else "— (past the window)"
        table.append([r["context_tokens"], _label(r), f"{r['positions']:.0f}",
                      f"{t['median']:.3f} ({t['min']:.3f}–{t['max']:.3f})", speed, f"{1000 * r['tpot_s']:.1f}"])
    lines = table_lines(["context tokens", "mode", "positions", "TTFT s (median, min–max)", "speed-up vs vanilla",
                         "TPOT ms"], table)
    cross = res["server"].get("bench_serve") or []
    if cross:
        lines += ["", "Cross-check, vanilla, same prompts: our streaming client vs `vllm bench serve`",
                  "(max concurrency 1):", ""]
        lines += table_lines(["context tokens", "requests", "ours median TTFT ms", "vllm bench serve median TTFT ms",
                              "difference"],
                             [[c["context_tokens"], c["requests"], f"{c['ours_median_ttft_ms']:.0f}",
                               f"{c['bench_serve_median_ttft_ms']:.0f}", f"{c['difference_pct']:+.1f}%"] for c in cross])
    return lines


def memory_lines(eng: dict) -> list[str]:
    if "peak_memory_startup_mib" not in eng:
        return []
    def split(key: str) -> str:
        parts = eng.get(key)
        return f" ({', '.join(f'{n} {v / 1024:.1f}' for n, v in parts.items())})" if parts else ""

    return ["", f"Peak memory (the sum of the processes' peak RSS, GiB): "
            f"{eng['peak_memory_startup_mib'] / 1024:.1f} while the engine starts"
            f"{split('peak_memory_startup_by_process_mib')}, "
            f"{eng['peak_memory_measuring_mib'] / 1024:.1f} while measuring"
            f"{split('peak_memory_measuring_by_process_mib')}. All modes share one engine and "
            "memory is not returned between rows, so it is not split by mode; the client holds "
            "the fp32 reference model that fills the REFRAG cache and the policy."]


def encoder_alone_lines(res: dict) -> list[str]:
    """The text path's extra TTFT over cached vectors, against the encoder + projector alone."""
    alone = res.get("encoder_alone")
    rate = res.get("summary", {}).get("encoder_engine_vs_standalone_rate")
    if not alone or rate is None:
        return []
    s = alone["seconds"]["median"]
    return ["", f"Encoder + projector alone (this process, after the engine; {alone['torch_threads']} threads) on "
            f"{alone['chunks']} chunks of k={alone['k']}, a {alone['context_tokens']}-token context: {s:.3f} s. "
            f"The engine's text path pays {s / rate:.3f} s over cached vectors at that length: "
            f"`encoder_engine_vs_standalone_rate` {rate:.2f}."]


def markdown(res: dict) -> str:
    m = res["machine"]
    cfg = res["config"]
    dtype = cfg.get("dtype") or "bfloat16"  # results written before the field were all bf16
    eng = res["offline"]["engine"]
    out = [
        "# TTFT: REFRAG vs vanilla RAG on the same vLLM engine", "",
        f"Command: `{res['command']}`  ",
        f"Model: `{res['model']}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB; torch {m['torch']}, "
        f"vLLM {m['vllm']}  ",
        f"Engine (every mode): max_model_len {cfg['max_model_len']}, max_num_batched_tokens {cfg['max_model_len']}, "
        f"prefix caching off, mm processor cache off, "
        f"{'encoder start-up profile skipped, ' if cfg.get('skip_mm_profiling') else ''}{dtype}, KV cache {cfg['kv_cache_gib']} GiB, block size "
        f"{eng['block_size']}, {'eager' if cfg['enforce_eager'] else 'compiled'}, OpenMP threads bound to "
        f"{cfg.get('omp_bind', 'auto')!r} (VLLM_CPU_OMP_THREADS_BIND; reserved CPUs {cfg.get('reserved_cpus', -1)}); "
        f"startup {eng['startup_s']:.0f} s.  ",
        f"Every request has fresh passages ({cfg['passage_tokens']} tokens each), so every prefill is cold. "
        f"TTFT at batch 1 after warm-up, {cfg['repeats']} repeats; TPOT over {cfg['decode_tokens']} more tokens. "
        "The ceiling is plain tokens with as many decoder positions as the REFRAG-cached prompt of the same k. "
        "`refrag-policy` TTFT includes the policy's chunk selection on the client. "
        f"Total wall time {res['wall_s'] / 60:.1f} min.", "",
        "## Offline engine (`vllm.LLM`), batch 1, cold", "", *offline_table(res), "",
        "KV MiB: (prompt positions + output tokens) × bytes of K and V per position; blocks: the same / block size. "
        "TTFT: wall time of `generate` minus the engine's decode time; TPOT: the engine's first-to-last-token time / (tokens - 1).",
        *memory_lines(eng), *encoder_alone_lines(res),
        "", "## Throughput, concurrent requests", "", *throughput_table(res), "",
    ]
    if res.get("transformers"):
        out += [f"## Plain transformers prefill of the same decoder ({dtype}, SDPA, one forward pass)", "",
                *transformers_table(res), ""]
    if res.get("server"):
        out += ["## OpenAI-compatible server (`vllm serve`), streaming client", "", *server_table(res), ""]
    out += ["Plots: `ttft_vs_length.png`, `speedup_vs_length.png`."]
    return "\n".join(out) + "\n"


def plots(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["offline"]["rows"]
    idx = _index(rows)
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(_label(r), []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["context_tokens"])
        style = "--" if label.startswith("ceiling") else "-"
        ax.plot([r["context_tokens"] for r in rs], [r["ttft_s"]["median"] for r in rs], style, label=label,
                marker="o", markersize=3, linewidth=2.5 if label == "vanilla" else 1.2)
    ax.set_yscale("log")
    paths = [_save(fig, ax, out / "ttft_vs_length.png", "TTFT, batch 1, cold (s)",
                   "TTFT vs context length (offline vLLM engine)")]

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, rs in sorted(series.items()):
        if label == "vanilla":
            continue
        pts = [(r["context_tokens"], idx[("vanilla", None, r["context_tokens"])]["ttft_s"]["median"]
                / r["ttft_s"]["median"]) for r in sorted(rs, key=lambda r: r["context_tokens"])
               if ("vanilla", None, r["context_tokens"]) in idx]
        if pts:
            ax.plot(*zip(*pts), "--" if label.startswith("ceiling") else "-o", label=label, markersize=3)
    paths.append(_save(fig, ax, out / "speedup_vs_length.png", "TTFT speed-up over vanilla (×)",
                       "Speed-up vs context length (dashed: ceiling at the same positions)"))
    return paths


def _save(fig, ax, path: Path, ylabel: str, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xlabel("retrieved context (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(res: dict, out: Path) -> None:
    (out / "results.md").write_text(markdown(res))
    plots(res, out)


if __name__ == "__main__":  # re-render: python -m benchmarks.report RESULTS_DIR
    d = Path(sys.argv[1])
    write_report(json.loads((d / "results.json").read_text()), d)
