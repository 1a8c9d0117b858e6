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
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from refrag_vllm.chunks import CompressedChunks
from refrag_vllm.markdown import table_lines
from refrag_vllm.prompt import chunk_text

from .data import read_jsonl
from .evaluate import score_samples
from .samples import TokenCorpus, context_sample, lm_sample, split_chunks

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
            "other": [context_sample(tokenizer, pid, windows[(i + 1) % len(windows)], w, k, start=start)
                      for i, w in enumerate(windows)],
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
    p.add_argument("--no-bos", action="store_true", help="samples without the leading BOS (the old layout; "
                                                         "a run trained with run.bos_first=false is probed so)")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.checkpoint:
        from transformers import AutoTokenizer

        from refrag_vllm.reference import RefragReferenceModel

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
    result = content_probe(model, tokenizer, probe_texts(data), num_windows=args.windows,
                           start=trained_with_bos and not args.no_bos)
    print(probe_markdown(result))
    if args.out:
        write_probe(result, args.out)


if __name__ == "__main__":
    main()
