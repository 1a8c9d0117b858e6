"""The content probe: do a model's chunk vectors carry their chunks' content?

    python -m refrag_train.diagnose --checkpoint CKPT [--data DIR_OR_JSONL] [--out DIR]
    python -m refrag_train.diagnose --run-dir RUN [--out DIR]   # a training run's latest weights
    python -m refrag_train.diagnose --run-dir RUN --delta RUN/reconstruction/final   # one stage's

On held-out windows of n x k tokens (1x16 and 4x16 by default) the decoder
reconstructs the window's tokens, after BOS, from n chunk vectors taken from

* **own**: the window's own chunks;
* **other**: another window's chunks;
* **mean**: one constant vector for every chunk (the mean projected vector of the probe's windows);
* **none**: no vectors at all (the tokens alone).

``other - own`` is the content the vectors carry (nats per token); ``mean - own`` is
what a chunk's vector adds over a generic soft prompt.  It also reports the vectors'
geometry: the mean pairwise cosine of one window's 16 projected chunk vectors
(256 tokens at k=16), the share of the average norm that the shared mean holds, and the
projected norm against the decoder's token-embedding norm.

A few hundred reconstruction steps tell which design learns content; a full recipe
takes an hour.  Every ablation (``refrag_train/ABLATIONS.md``) and shipped table reports it.

    python -m refrag_train.diagnose --checkpoint CKPT --data DIR --readout [--out DIR]

``--readout`` asks where the continuation's content is lost instead: in the vectors or in
their reading.  On Table 1's windows (:mod:`refrag_train.evaluate`, the same seed) the
decoder reads each context chunk back as text from its vector alone (BOS, the vector, k
greedy tokens: the probe's 1xk reconstruction, decoded), and the same decoder continues
from that text as raw tokens.  Its content (another window's read-out minus the window's
own) is what the vectors hold that a reader can use, set beside what the decoder takes
from the vectors directly (REFRAG-k against another window's chunks) and what the raw
tokens give (full context against another window's tokens).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

from refrag_vllm.chunks import CompressedChunks
from refrag_vllm.markdown import table_lines
from refrag_vllm.prompt import chunk_text

from .data import read_jsonl
from .evaluate import RAW_CONTROL, score_samples
from .qa_generation import paired_difference
from .samples import TokenCorpus, context_sample, control_partners, lm_sample, split_chunks
from .trainer import read_out

SHAPES = ((1, 16), (4, 16))
CONDITIONS = ("own", "other", "mean", "none")


def _mean_cosine(x: torch.Tensor) -> float:
    """Mean pairwise cosine of the rows of ``x (n, d)``, the diagonal left out."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = x @ x.T
    return float((sim.sum() - sim.diag().sum()) / (sim.numel() - len(sim)))


def _project(model, tokenizer, chunks: list[list[int]]) -> torch.Tensor:
    """Decoder-token chunks -> projected vectors ``(len(chunks), hidden)``."""
    return model.project_item(CompressedChunks.from_texts([chunk_text(tokenizer, c) for c in chunks]))


@torch.no_grad()
def content_probe(model, tokenizer, texts: list[str], *, shapes=SHAPES, num_windows: int = 64, seed: int = 0,
                  batch_size: int = 16, start: bool = True) -> dict:
    """Reconstruction log-PPL per shape and condition, and the vectors' geometry.

    ``model`` is a ``RefragReferenceModel`` (a loaded checkpoint, or a training run's
    model with its LoRA active).  Returns ``{"shapes": [{"n", "k", own, other, mean,
    none}], "geometry": {...}}``.
    """
    pid = model.refrag_config.placeholder_token_id
    corpus = TokenCorpus.from_texts(texts, tokenizer, desc="tokenizing probe text")
    rows = []
    for n, k in shapes:
        windows = corpus.windows(n * k, num_windows, seed)
        mean = _project(model, tokenizer, [c for w in windows for c in split_chunks(w, k)]).mean(0)
        mean_item = CompressedChunks.from_projected_embeds(mean.expand(n, -1).float().contiguous())
        samples = {
            "own": [context_sample(tokenizer, pid, w, w, k, start=start) for w in windows],
            "other": [context_sample(tokenizer, pid, other, w, k, start=start)
                      for other, w in zip(control_partners(windows), windows)],
            "mean": [lm_sample(tokenizer, pid, [mean_item] + w, len(w), start) for w in windows],
            # Without BOS the first token has nothing before it to be predicted from.
            "none": [lm_sample(tokenizer, pid, w, len(w) if start else len(w) - 1, start) for w in windows],
        }
        row = {"n": n, "k": k, "windows": len(windows)}
        # Every sample of a condition scores the same number of tokens: the mean of the
        # per-sample means is the token-weighted mean.
        row.update({c: statistics.fmean(score_samples(model, samples[c], batch_size, c)) for c in CONDITIONS})
        rows.append(row)
    k = shapes[0][1]  # geometry: up to 8 windows of 16 chunks
    available = sum(len(d) // (16 * k) for d in corpus.docs)
    window = corpus.windows(16 * k, min(8, available), seed + 1)
    projected = [_project(model, tokenizer, split_chunks(w, k)).float() for w in window]
    every = torch.cat(projected)
    token_norm = float(model.get_input_embeddings().weight.float().norm(dim=-1).mean())
    geometry = {
        "pairwise_cosine": sum(map(_mean_cosine, projected)) / len(projected),
        "mean_share": float(every.mean(0).norm() / every.norm(dim=-1).mean()),
        "projected_norm": float(every.norm(dim=-1).mean()),
        "token_embedding_norm": token_norm,
    }
    return {"start_token": start, "shapes": rows, "geometry": geometry}


READOUT = "Read-out context"
READOUT_CONTROL = "Read-out, another window's (control)"


def readout_content(model, tokenizer, texts: list[str], *, context_tokens: int = 256, continuation_tokens: int = 64,
                    k: int | None = None, num_windows: int = 64, seed: int = 0, batch_size: int = 8,
                    start: bool = True, examples: int = 3, reader=None) -> dict:
    """Table 1's content three ways, on its windows: read-out text, compressed chunks, raw tokens.

    ``reader``: another model (the same tokenizer) whose own vectors are read out by its own
    decoder, for ``model`` to continue from; by default ``model`` reads out its own.

    Returns ``{"rows": [{condition, log_ppl, gap_recovered, per_window}], "content": {read_out,
    compressed, raw: paired_difference (another window's context - the window's own), nats per
    token}, "read_out_minus_compressed", "token_accuracy", "token_recall", "examples"}``:
    ``token_accuracy`` is the share of context tokens read out in their place, ``token_recall``
    the mean share of a chunk's distinct tokens found anywhere in its read-out.
    """
    s, o = context_tokens, continuation_tokens
    k = k or model.refrag_config.chunk_size
    pid = model.refrag_config.placeholder_token_id
    corpus = TokenCorpus.from_texts(texts, tokenizer, desc="tokenizing held-out")
    windows = corpus.windows(s + o, num_windows, seed)  # Table 1's windows
    contexts = [w[:s] for w in windows]
    per_context = [len(split_chunks(ctx, k)) for ctx in contexts]
    chunks = [c for ctx in contexts for c in split_chunks(ctx, k)]
    read_chunks = read_out(reader or model, tokenizer, chunks, start=start)
    ends = list(itertools.accumulate(per_context))
    read = [[t for r in read_chunks[end - n : end] for t in r] for n, end in zip(per_context, ends)]

    def continuing(context: list[int], w: list[int], compressed: bool = False):
        if compressed:
            return context_sample(tokenizer, pid, context, w[s:], k, num_targets=o - 1, start=start)
        return lm_sample(tokenizer, pid, context + w[s:], o - 1, start)

    compressed, compressed_control = f"REFRAG{k}", f"REFRAG{k}, another window's chunks (control)"
    conditions = {
        "No context": [continuing([], w) for w in windows],
        "Full context": [continuing(w[:s], w) for w in windows],
        RAW_CONTROL: [continuing(other, w) for other, w in zip(control_partners(contexts), windows)],
        READOUT: [continuing(r, w) for r, w in zip(read, windows)],
        READOUT_CONTROL: [continuing(other, w) for other, w in zip(control_partners(read), windows)],
        compressed: [continuing(w[:s], w, True) for w in windows],
        compressed_control: [continuing(other, w, True) for other, w in zip(control_partners(contexts), windows)],
    }
    nll = {name: score_samples(model, samples, batch_size, name) for name, samples in conditions.items()}
    mean = {name: statistics.fmean(v) for name, v in nll.items()}
    gap = mean["No context"] - mean["Full context"]
    pairs = {"read_out": (READOUT_CONTROL, READOUT), "compressed": (compressed_control, compressed),
             "raw": (RAW_CONTROL, "Full context")}
    per_window = {key: [c - t for c, t in zip(nll[control], nll[treatment])] for key, (control, treatment) in pairs.items()}
    matched = [a == b for c, r in zip(chunks, read_chunks) for a, b in zip(c, r)]
    return {
        "context_tokens": s, "continuation_tokens": o, "k": k, "num_windows": len(windows),
        "rows": [{"condition": name, "log_ppl": mean[name], "per_window": v,
                  "gap_recovered": (mean["No context"] - mean[name]) / gap if gap > 0 else None}
                 for name, v in nll.items()],
        "content": {key: paired_difference(nll[control], nll[treatment]) for key, (control, treatment) in pairs.items()},
        "read_out_minus_compressed": paired_difference(per_window["read_out"], per_window["compressed"]),
        "token_accuracy": sum(matched) / len(matched),
        "token_recall": statistics.fmean(len(set(c) & set(r)) / len(set(c)) for c, r in zip(chunks, read_chunks)),
        "examples": [{"chunk": tokenizer.decode(c), "read_out": tokenizer.decode(r)}
                     for c, r in zip(chunks[:examples], read_chunks[:examples])],
    }


def _cell(text: str) -> str:
    """Text as one markdown table cell: its repr, pipes escaped."""
    return repr(text).replace("|", "\\|")


def readout_markdown(result: dict) -> str:
    lines = [f"Log-perplexity of {result['continuation_tokens'] - 1} continuation tokens after "
             f"s={result['context_tokens']} context tokens, {result['num_windows']} windows (Table 1's); "
             f"*read-out*: each chunk of k={result['k']} read back as text from its vector alone"
             f"{' by ' + result['reader'] if result.get('reader') else ''}, then continued from as raw tokens.", ""]
    lines += table_lines(["Condition", "log-PPL", "gap recovered"],
                         [(r["condition"], f"{r['log_ppl']:.3f}",
                           "" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.0f}%")
                          for r in result["rows"]])
    c, d = result["content"], result["read_out_minus_compressed"]
    lines += ["", "Content, another window's context minus the window's own (nats per token, paired over the windows):", ""]
    lines += table_lines(["context as", "content"],
                         [(name, f"{c[key]['mean']:+.3f} ± {c[key]['se']:.3f}") for name, key in
                          (("read-out text", "read_out"), ("compressed chunks", "compressed"), ("raw tokens", "raw"))])
    lines += ["", f"Read-out minus compressed: {d['mean']:+.3f} ± {d['se']:.3f} nats ({d['wins']} of "
                  f"{result['num_windows']} windows higher). Read-out tokens in place: "
                  f"{100 * result['token_accuracy']:.1f}%; a chunk's distinct tokens found in its read-out: "
                  f"{100 * result['token_recall']:.1f}%.", ""]
    lines += table_lines(["chunk", "read out"], [(_cell(e["chunk"]), _cell(e["read_out"])) for e in result["examples"]])
    return "\n".join(lines) + "\n"


def probe_markdown(result: dict) -> str:
    lines = table_lines(
        ["probe", "own", "other", "mean", "none", "other - own", "mean - own"],
        [(f"{r['n']}x{r['k']}", *(f"{x:.3f}" for x in (r["own"], r["other"], r["mean"], r["none"],
                                                      r["other"] - r["own"], r["mean"] - r["own"])))
         for r in result["shapes"]])
    g = result["geometry"]
    lines += ["", f"Projected vectors: pairwise cosine {g['pairwise_cosine']:.2f} within a 16-chunk window, "
                  f"shared mean {g['mean_share']:.2f} of the average norm, norm {g['projected_norm']:.1f} "
                  f"(token embeddings {g['token_embedding_norm']:.1f})."]
    return "\n".join(lines) + "\n"


def probe_texts(data: str | Path) -> list[str]:
    """Held-out documents: a prepared data folder (its ``heldout.jsonl``) or a jsonl file."""
    path = Path(data)
    return [d["text"] for d in read_jsonl(path / "heldout.jsonl" if path.is_dir() else path)]


def write_probe(result: dict, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "probe.md").write_text(probe_markdown(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a REFRAG checkpoint folder")
    p.add_argument("--run-dir", help="a training run: probe its latest weights (no export needed)")
    p.add_argument("--delta", help="with --run-dir: probe this delta of the run instead, e.g. RUN/reconstruction/final")
    p.add_argument("--data", default=None, help="prepared data folder or held-out jsonl (default: the config's, "
                                                "else data/python-docs)")
    p.add_argument("--out", default=None, help="write probe.json and probe.md here")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--readout", action="store_true",
                   help="instead of the probe: Table 1's content from chunks read back out as text (readout.json, readout.md)")
    p.add_argument("--k", type=int, default=None, help="with --readout: the chunk size (default: the checkpoint's)")
    p.add_argument("--reader", help="with --readout: this checkpoint reads its own vectors out (default: the model itself)")
    p.add_argument("--no-bos", action="store_true", help="samples without the leading BOS (the old layout; "
                                                         "a run trained with run.bos_first=false is probed so)")
    args = p.parse_args()
    if (args.reader or args.k) and not args.readout:
        p.error("--reader and --k go with --readout")
    torch.set_num_threads(2)
    from refrag_vllm.reference import RefragReferenceModel

    if args.checkpoint:
        from transformers import AutoTokenizer

        model = RefragReferenceModel.load(args.checkpoint, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        data = args.data or "data/python-docs"
        trained_with_bos = True
    elif args.run_dir:
        from .cli import latest_delta
        from .config import load_config
        from .model import TrainingModel

        cfg = load_config(Path(args.run_dir) / "config.json")
        training = TrainingModel(cfg)
        training.load_delta_weights(Path(args.delta) if args.delta else latest_delta(Path(args.run_dir)))
        training.train(False)
        model, tokenizer = training.refrag, training.tokenizer
        data = args.data or cfg.data.dir
        trained_with_bos = cfg.run.bos_first
    else:
        p.error("give --checkpoint or --run-dir")
    start = trained_with_bos and not args.no_bos
    if args.readout:
        reader = RefragReferenceModel.load(args.reader, dtype=torch.float32) if args.reader else None
        result = readout_content(model, tokenizer, probe_texts(data), num_windows=args.windows, start=start,
                                 reader=reader, k=args.k)
        result["reader"] = args.reader
        table = readout_markdown(result)
        print(table)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "readout.json").write_text(json.dumps(result, indent=2) + "\n")
            (out / "readout.md").write_text(table)
            from .plots import plot_readout

            plot_readout(result, out / "readout.png")
        return
    result = content_probe(model, tokenizer, probe_texts(data), num_windows=args.windows, start=start)
    print(probe_markdown(result))
    if args.out:
        write_probe(result, args.out)


if __name__ == "__main__":
    main()
