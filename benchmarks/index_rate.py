"""How fast the index is built, against the encoder + projector alone on the same chunks.

    python -m benchmarks.index_rate --model CKPT --out benchmarks/results/cpu/index \
        [--summary benchmarks/results/cpu/results.json] [--qa FILE ...] [--quick]

Both arms run in this one process, over the same real passages (docstrings,
:class:`benchmarks.workload.PassageSource`), with their models loaded before the clock
starts and one untimed index batch first:

* ``index``: what ``refrag-vllm index`` does per batch of ``batch_size`` passages
  (:func:`refrag_vllm.retrieval.index.add_passages`: the retriever's passage embeddings,
  chunking, the checkpoint's encoder + projector, writing and committing to a fresh index);
* ``encoder + projector``: :meth:`ChunkEmbedder.embed` alone over the same chunk texts, as
  many chunks per call as one index batch holds;
* ``retriever``: the retriever's passage embeddings alone, in the same batches (the index's
  other model: what it costs beyond the encoder + projector), as the index runs it (``serving_dtype()``,
  :data:`~refrag_vllm.retrieval.index.RETRIEVER_MAX_TOKENS` word pieces), reading 256 word
  pieces (sentence-transformers' default for the model), and in float32, with the cosine between
  the two dtypes' embeddings.

``--qa FILE ...`` (QA jsonl files whose rows name their answer's passage, ``passages[gold]``,
as ``refrag-train prepare`` writes them) adds what the retriever's two lengths find: per file,
every question against all the file's distinct passages, hit@1 and hit@3 of the answer's passage.

The arms run in turn, ``repeats`` rounds, and each keeps its fastest. ``index_vs_encoder_rate`` is the
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
    repeats: int = 3
    """Rounds of all arms in turn; each arm's fastest counts."""
    threads: int = 2
    """Torch threads (``torch.set_num_threads``) of every arm."""
    long_tokens: int = 256
    """The retriever's other length, timed and scored beside the index's."""


PROFILES = {"default": IndexRateProfile(),
            "quick": IndexRateProfile(passages=24, passage_tokens=64, batch_size=8, repeats=1)}


def best_seconds(arms: dict, repeats: int) -> dict:
    """``{name: fastest seconds}`` of each ``arms[name]()``, in ``repeats`` rounds that run every
    arm once in turn, so that a machine whose speed drifts slows all arms alike."""
    best = {name: float("inf") for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def retrieval_hits(retriever, qa_file: str | Path, ks: tuple[int, ...] = (1, 3)) -> dict:
    """hit@k of each question's answer passage (``passages[gold]``) among all of ``qa_file``'s
    distinct passages: ``{"questions", "passages", "hit@1", "hit@3"}``."""
    from refrag_vllm.retrieval.corpora import iter_jsonl

    rows = [row for _, row in iter_jsonl(qa_file)]
    if not rows or any("gold" not in r for r in rows):
        raise ValueError(f"{qa_file}: every row must name its answer's passage (\"gold\")")
    pool = sorted({p for r in rows for p in r["passages"]})
    row_of = {p: i for i, p in enumerate(pool)}
    gold = np.array([row_of[r["passages"][r["gold"]]] for r in rows])
    scores = retriever.embed([r["question"] for r in rows]) @ retriever.embed(pool).T  # (questions, passages)
    ranked = np.argsort(-scores, axis=1)
    return {"questions": len(rows), "passages": len(pool),
            **{f"hit@{k}": float((ranked[:, :k] == gold[:, None]).any(1).mean()) for k in ks}}


@torch.no_grad()
def measure(model_dir: str | Path, cfg: IndexRateProfile, log=print, qa_files=()) -> dict:
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
        add_passages(IndexWriter(index_dir, identity, retriever.spec), records, retriever, projector,
                     batch_size=cfg.batch_size, progress=False)

    def encode() -> None:
        for call in calls:
            projector.chunk_embedder.embed(call)

    def retrieve(model: Retriever) -> np.ndarray:
        return np.concatenate([model.embed(group) for group in batches(texts, cfg.batch_size)])

    try:  # one untimed index batch warms up both models
        add_passages(IndexWriter(work / "warm-up", identity, retriever.spec), records[: cfg.batch_size],
                     retriever, projector, batch_size=cfg.batch_size, progress=False)
        retriever_long = Retriever(max_tokens=cfg.long_tokens)
        retriever32 = Retriever(dtype="float32")  # the index's dtype against float32: time and embeddings
        for model in (retriever_long, retriever32):
            model.embed(texts[: cfg.batch_size])
        seconds = best_seconds({"index": build, "encoder": encode, "retriever": lambda: retrieve(retriever),
                                "retriever_long": lambda: retrieve(retriever_long),
                                "retriever32": lambda: retrieve(retriever32)}, cfg.repeats)
        index_s, encoder_s, retriever_s = seconds["index"], seconds["encoder"], seconds["retriever"]
        retriever_long_s, retriever32_s = seconds["retriever_long"], seconds["retriever32"]
        cosine = (retrieve(retriever) * retrieve(retriever32)).sum(axis=1)
        index = PassageIndex.open(index_dir)
        if index.meta["num_chunk_rows"] != num_chunks:
            raise RuntimeError(f"the index holds {index.meta['num_chunk_rows']} chunks, not {num_chunks}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hits = [{"qa": str(f), "max_tokens": model.spec["max_tokens"], **retrieval_hits(model, f)}
            for f in qa_files for model in (retriever, retriever_long)]
    short = retriever.spec["max_tokens"]
    rows = [{"arm": arm, "seconds": s, "passages_per_s": len(texts) / s, "chunks_per_s": num_chunks / s}
            for arm, s in (("index", index_s), ("encoder + projector", encoder_s),
                           (f"retriever ({short} tokens)", retriever_s),
                           (f"retriever, {cfg.long_tokens} tokens", retriever_long_s),
                           (f"retriever, float32 ({short} tokens)", retriever32_s))]
    return {"model": str(model_dir), "profile": asdict(cfg), "passages": len(texts), "chunks": num_chunks,
            "k": projector.builder.k, "rows": rows, "index_vs_encoder_rate": encoder_s / index_s,
            "index_vs_encoder_and_retriever_rate": (encoder_s + retriever_s) / index_s,
            "retriever_dtype": str(retriever.model.dtype).removeprefix("torch."),
            "retriever_max_tokens": short, "retrieval_hits": hits,
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
    if result["retrieval_hits"]:
        lines += ["", "What the retriever finds at each length: every question of a QA file against all its "
                  "distinct passages, the answer's passage in the top 1 / top 3.", ""]
        lines += table_lines(["QA file", "questions", "passages", "word pieces read", "hit@1", "hit@3"],
                             [(h["qa"], h["questions"], h["passages"], h["max_tokens"], f"{h['hit@1']:.3f}",
                               f"{h['hit@3']:.3f}") for h in result["retrieval_hits"]])
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import sys

    p = profile_parser(__doc__, "folder for index_rate.json / .md", "a few small passages (checks the harness)",
                       IndexRateProfile)
    p.add_argument("--summary", help="a results.json whose summary gains index_vs_encoder_rate")
    p.add_argument("--qa", nargs="*", default=[], metavar="FILE",
                   help="QA jsonl files (rows with passages and gold): the retriever's hit@k at both lengths")
    args, cfg = parse_profile(p, argv, PROFILES)
    torch.set_num_threads(cfg.threads)
    out = Path(args.out)
    log = run_log(out)
    result = measure(args.model, cfg, log, args.qa)
    command = "python -m benchmarks.index_rate " + " ".join(sys.argv[1:] if argv is None else argv)
    result["command"] = command
    (out / "index_rate.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "index_rate.md").write_text(markdown(result, command))
    log(markdown(result, command))
    if args.summary:
        merge_summary(args.summary, {"index_vs_encoder_rate": result["index_vs_encoder_rate"]})


if __name__ == "__main__":
    main()
