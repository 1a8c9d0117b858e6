"""Does a checkpoint's compression carry content?  ``python -m refrag_train.diagnose CKPT``

Prints, on held-out windows: reconstruction loss from the right chunks vs from
another window's chunks vs no chunks (the tokens alone), and the mean pairwise
cosine of encoder and projected vectors of one window's chunks (near 1: the
projector's output barely depends on the chunk).
"""

from __future__ import annotations

import argparse
import random

import torch

from refrag_vllm.prompt import chunk_text
from refrag_vllm.reference import RefragReferenceModel

from .data import read_jsonl
from .samples import TokenCorpus, context_sample, reconstruction_sample, split_chunks
from .trainer import nll_loss


def _mean_cosine(x: torch.Tensor) -> float:
    x = torch.nn.functional.normalize(x, dim=-1)
    sim = x @ x.T
    return float((sim.sum() - sim.diag().sum()) / (sim.numel() - len(sim)))


class _Scorer:
    """``nll_loss`` wants a TrainingModel; it only uses ``.refrag``."""

    def __init__(self, refrag):
        self.refrag = refrag


@torch.no_grad()
def diagnose(checkpoint: str, data: str, num: int = 16, seed: int = 0) -> None:
    from transformers import AutoTokenizer

    model = RefragReferenceModel.load(checkpoint, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    pid = model.refrag_config.placeholder_token_id
    docs = read_jsonl(f"{data}/heldout.jsonl")[:10]
    corpus = TokenCorpus.from_texts([d["text"] for d in docs], tok)
    rng = random.Random(seed)
    scorer = _Scorer(model)
    for n, k in [(1, 16), (1, 8), (4, 16)]:
        ws = [corpus.window(n * k, rng) for _ in range(num)]
        right = nll_loss(scorer, [reconstruction_sample(tok, pid, w, k) for w in ws]).item()
        other = nll_loss(scorer, [context_sample(tok, pid, ws[(i + 1) % num], w, k) for i, w in enumerate(ws)]).item()
        alone = nll_loss(scorer, [context_sample(tok, pid, [], [0] + w, k, num_targets=len(w)) for w in ws]).item()
        print(f"reconstruction {n}x{k}: right chunks {right:.3f}, another window's {other:.3f}, none {alone:.3f}")
    window = corpus.window(256, random.Random(seed + 1))
    enc = model.encode_texts([chunk_text(tok, c) for c in split_chunks(window, 16)]).float()
    proj = model.projector(enc.to(model.projector.fc1.weight.dtype)).float()
    emb = model.get_input_embeddings().weight.float()
    print(f"pairwise cosine of 16 chunks: encoder {_mean_cosine(enc):.2f}, projected {_mean_cosine(proj):.2f}")
    print(f"mean norm: projected {float(proj.norm(dim=-1).mean()):.1f}, token embedding {float(emb.norm(dim=-1).mean()):.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--data", default="data/python-docs")
    args = p.parse_args()
    torch.set_num_threads(2)
    diagnose(args.checkpoint, args.data)


if __name__ == "__main__":
    main()
