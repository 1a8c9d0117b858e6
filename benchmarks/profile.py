"""Where does a mode's TTFT go?  py-spy over the engine while it serves cold requests.

    python -m benchmarks.profile --model CKPT --mode refrag --context 7936 --out benchmarks/results/cpu/profile

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so one
py-spy recording covers the front end (prompt building, multimodal processing,
hashing), the scheduler, the encoder, the projector/merge and the decoder.
Writes ``<mode>.svg`` (flame graph), ``<mode>.txt`` (collapsed stacks) and
``<mode>.md`` (the frames holding most of the time, inclusive).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from refrag_vllm.markdown import table_lines
from refrag_vllm.modes import MODES, REFRAG

# Frames worth naming in the summary: ours, and vLLM's stages a request goes through.
KEY_FRAMES = ("refrag_vllm/", "benchmarks/workload.py", "multimodal/", "v1/engine/", "v1/core/sched",
              "model_executor/models/llama.py", "transformers/models/bert/", "tokenization")


def summarize(collapsed: Path, top: int = 25) -> list[tuple[str, float]]:
    """Inclusive share of samples per frame (each frame counted once per stack)."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        for frame in {re.sub(r":\d+\)$", ")", f) for f in stack.split(";")}:
            inclusive[frame] += n
    keep = [(f, c / total) for f, c in inclusive.most_common() if any(k in f for k in KEY_FRAMES)]
    return keep[:top]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--mode", default=REFRAG, choices=MODES)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--context", type=int, default=7936, help="context tokens per request")
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from .ttft import BenchConfig, OfflineEngine, engine_env
    from .workload import RequestFactory

    cfg = BenchConfig(enforce_eager=False)
    os.environ.update(engine_env(cfg))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    factory = RequestFactory(args.model)
    engine = OfflineEngine(args.model, cfg)
    engine.measure(factory.make(args.mode, 1024, args.k, args.fraction).prompt, 1)  # warm-up
    collapsed = out / f"{args.mode}.txt"
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()), "--rate", str(args.rate),
                            "--format", "raw", "--output", str(collapsed), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    ttfts = []
    for _ in range(args.requests):
        # the request is built inside the recording: for refrag-policy that is where the policy runs
        start = time.perf_counter()
        req = factory.make(args.mode, args.context, args.k, args.fraction)
        build = time.perf_counter() - start
        ttft, _, _ = engine.measure(req.prompt, 1)
        ttfts.append((build, req.prep_seconds, ttft))
    spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
    spy.wait(60)
    lines = [f"# Profile: {args.mode}, k={args.k}, {args.context} context tokens, {args.requests} cold requests", "",
             f"Command: `python -m benchmarks.profile --model {args.model} --mode {args.mode} --k {args.k} "
             f"--context {args.context} --out {args.out}`", ""]
    lines += table_lines(["request", "building the request s (policy s)", "engine TTFT s"],
                        [(i, f"{b:.3f} ({p:.3f})", f"{t:.3f}") for i, (b, p, t) in enumerate(ttfts)])
    lines += ["", "Inclusive share of py-spy samples (whole recording, idle threads included):", ""]
    lines += table_lines(["share", "frame"],
                        [(f"{100 * share:.1f}%", f"`{frame}`") for frame, share in summarize(collapsed)])
    (out / f"{args.mode}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    engine.shutdown()


if __name__ == "__main__":
    main()
