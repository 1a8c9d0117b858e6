"""How fast the index is built, against the encoder + projector alone on the same chunks.

    python -m benchmarks.index_rate --model CKPT --out benchmarks/results/cpu/index \
        [--summary benchmarks/results/cpu/results.json] [--quick]

Both arms run in this one process, over the same real passages (docstrings,
:class:`benchmarks.workload.PassageSource`), with their models loaded before the clock
starts and one untimed index batch first:

* ``index``: what ``refrag-vllm index`` does per batch of ``batch_size`` passages
  (:func:`refrag_vllm.retrieval.index.add_passages`: the retriever's passage embeddings,
  chunking, the checkpoint's encoder + projector, writing and committing to a fresh index);
* ``encoder + projector``: :meth:`ChunkEmbedder.embed` alone over the same chunk texts, as
  many chunks per call as one index batch holds;
* ``retriever``: the retriever's passage embeddings alone, in the same batches (the index's
  other model: what it costs beyond the encoder + projector), in its default bfloat16 and in
  float32, with the cosine between the two dtypes' embeddings.

Each arm runs ``repeats`` times and keeps its fastest. ``index_vs_encoder_rate`` is the
index's chunks/s over the encoder + projector's (``--summary FILE`` merges it into FILE's
``summary``); ``index_vs_encoder_and_retriever_rate`` counts both models' time, so what is
left is the index's own work (chunking, writing). Writes ``index_rate.json`` and ``index_rate.md`` to ``--out``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from refrag_vllm.markdown import table_lines

from .options import parse_profile, profile_parser, run_log
from .summary import merge_summary


@dataclass
class IndexRateProfile:
    """A profile; every field is also a command-line flag."""

    passages: int = 256
    """Passages indexed (real docstrings, :class:`benchmarks.workload.PassageSource`); every
    arm embeds the same ones."""
    passage_tokens: int = 256
    """Decoder tokens per passage: ``passage_tokens / k`` chunks each."""
    batch_size: int = 64
    """Passages per index batch (``refrag-vllm index --batch-size``'s default)."""
    repeats: int = 2
    """Runs of each arm; the fastest counts."""
    threads: int = 2
    """Torch threads (``torch.set_num_threads``) of every arm."""


PROFILES = {"default": IndexRateProfile(),
            "quick": IndexRateProfile(passages=24, passage_tokens=64, batch_size=8, repeats=1)}


def _best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def measure(model_dir: str | Path, cfg: IndexRateProfile, log=print) -> dict:
    from refrag_vllm.retrieval.index import (CacheProjector, IndexWriter, PassageIndex, PassageRecord, Retriever,
                                             add_passages, batches, cache_identity, content_id)

    from .workload import PassageSource

    projector = CacheProjector(model_dir)
    retriever = Retriever()
    texts = PassageSource(projector.builder.tokenizer, cfg.passage_tokens).passages(cfg.passages * cfg.passage_tokens)
    records = [PassageRecord(content_id(t), t) for t in texts]
    chunk_texts = [projector.builder.chunk_texts(t) for t in texts]
    calls = [[c for cs in group for c in cs] for group in batches(chunk_texts, cfg.batch_size)]
    num_chunks = sum(len(c) for c in calls)
    log(f"{len(texts)} passages, {num_chunks} chunks of k={projector.builder.k}")
    identity = cache_identity(model_dir)
    work = Path(tempfile.mkdtemp(prefix="index-rate-"))
    index_dir = work / "index"

    def build() -> None:
        shutil.rmtree(index_dir, ignore_errors=True)
        add_passages(IndexWriter(index_dir, identity, retriever.name), records, retriever, projector,
                     batch_size=cfg.batch_size, progress=False)

    def encode() -> None:
        for call in calls:
            projector.chunk_embedder.embed(call)

    def retrieve(model: Retriever) -> np.ndarray:
        return np.concatenate([model.embed(group) for group in batches(texts, cfg.batch_size)])

    try:  # one untimed index batch warms up both models
        add_passages(IndexWriter(work / "warm-up", identity, retriever.name), records[: cfg.batch_size],
                     retriever, projector, batch_size=cfg.batch_size, progress=False)
        index_s = _best_seconds(build, cfg.repeats)
        encoder_s = _best_seconds(encode, cfg.repeats)
        retriever_s = _best_seconds(lambda: retrieve(retriever), cfg.repeats)
        # The index's retriever dtype against float32: the time, and how far the embeddings move.
        retriever32 = Retriever(dtype="float32")
        retriever32.embed(texts[: cfg.batch_size])
        retriever32_s = _best_seconds(lambda: retrieve(retriever32), cfg.repeats)
        cosine = (retrieve(retriever) * retrieve(retriever32)).sum(axis=1)
        index = PassageIndex.open(index_dir)
        if index.meta["num_chunk_rows"] != num_chunks:
            raise RuntimeError(f"the index holds {index.meta['num_chunk_rows']} chunks, not {num_chunks}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [{"arm": arm, "seconds": s, "passages_per_s": len(texts) / s, "chunks_per_s": num_chunks / s}
            for arm, s in (("index", index_s), ("encoder + projector", encoder_s), ("retriever", retriever_s),
                           ("retriever, float32", retriever32_s))]
    return {"model": str(model_dir), "profile": asdict(cfg), "passages": len(texts), "chunks": num_chunks,
            "k": projector.builder.k, "rows": rows, "index_vs_encoder_rate": encoder_s / index_s,
            "index_vs_encoder_and_retriever_rate": (encoder_s + retriever_s) / index_s,
            "retriever_dtype": str(retriever.model.dtype).removeprefix("torch."),
            "retriever_cosine_to_float32": {"min": float(cosine.min()), "mean": float(cosine.mean())}}


def markdown(result: dict, command: str) -> str:
    lines = [f"Index build against the encoder + projector alone: {result['passages']} passages of "
             f"{result['profile']['passage_tokens']} tokens, {result['chunks']} chunks (k={result['k']}), "
             f"{result['profile']['threads']} threads, fastest of {result['profile']['repeats']}.", "",
             f"Command: `{command}`", ""]
    lines += table_lines(["arm", "s", "passages/s", "chunks/s"],
                         [(r["arm"], f"{r['seconds']:.2f}", f"{r['passages_per_s']:.1f}", f"{r['chunks_per_s']:.0f}")
                          for r in result["rows"]])
    lines += ["", f"index_vs_encoder_rate: {result['index_vs_encoder_rate']:.2f} (against the encoder + projector "
              f"and the retriever together: {result['index_vs_encoder_and_retriever_rate']:.2f})",
              f"retriever in {result['retriever_dtype']}: its passage embeddings' cosine to float32's, min "
              f"{result['retriever_cosine_to_float32']['min']:.4f}, mean {result['retriever_cosine_to_float32']['mean']:.4f}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import sys

    p = profile_parser(__doc__, "folder for index_rate.json / .md", "a few small passages (checks the harness)",
                       IndexRateProfile)
    p.add_argument("--summary", help="a results.json whose summary gains index_vs_encoder_rate")
    args, cfg = parse_profile(p, argv, PROFILES)
    torch.set_num_threads(cfg.threads)
    out = Path(args.out)
    log = run_log(out)
    result = measure(args.model, cfg, log)
    command = "python -m benchmarks.index_rate " + " ".join(sys.argv[1:] if argv is None else argv)
    result["command"] = command
    (out / "index_rate.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "index_rate.md").write_text(markdown(result, command))
    log(markdown(result, command))
    if args.summary:
        merge_summary(args.summary, {"index_vs_encoder_rate": result["index_vs_encoder_rate"]})


if __name__ == "__main__":
    main()
