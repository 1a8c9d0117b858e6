"""Training and evaluation samples as vLLM-style prompt dicts.

Every stage and the evaluation score ``(prompt, num_targets)`` pairs with the shared
reference model's ``target_logprobs``: the prompt is exactly what the engine would
receive (token ids with one placeholder per compressed run, plus ``refrag_chunk``
items holding the chunks' text), and the loss is on its last ``num_targets`` tokens.
Contexts are cut into chunks by :func:`refrag_vllm.prompt.chunk_pieces`, the same
function serving uses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from refrag_vllm.prompt import chunk_pieces, pieces_to_prompt

Prompt = dict


@dataclass
class Sample:
    prompt: Prompt
    num_targets: int
    teacher_prompt: Prompt | None = None
    """What a distillation teacher scores instead of ``prompt`` (the same targets last)."""


class TokenCorpus:
    """Documents as decoder-token arrays, for drawing windows of a given length."""

    def __init__(self, docs: Sequence[np.ndarray]) -> None:
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, desc: str = "tokenizing") -> "TokenCorpus":
        docs = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=np.int64)
                for t in tqdm(texts, desc=desc, unit="doc")]
        return cls(docs)

    @classmethod
    def cached(cls, texts: Sequence[str], tokenizer, cache: Path, desc: str = "tokenizing") -> "TokenCorpus":
        """Tokenize once; later runs load plain int arrays (``allow_pickle=False``)."""
        if cache.exists():
            with np.load(cache, allow_pickle=False) as z:
                if int(z["num_docs"]) == len(texts):
                    return cls(np.split(z["tokens"], z["offsets"][1:-1]))
        corpus = cls.from_texts(texts, tokenizer, desc)
        offsets = np.cumsum([0] + [len(d) for d in corpus.docs])
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, tokens=np.concatenate(corpus.docs), offsets=offsets, num_docs=len(texts))
        tmp.replace(cache)
        return corpus

    @property
    def num_tokens(self) -> int:
        return int(sum(len(d) for d in self.docs))

    def window(self, length: int, rng: random.Random) -> list[int]:
        """A random run of ``length`` consecutive tokens; documents weighted by how many they hold."""
        weights = [max(0, len(d) - length + 1) for d in self.docs]
        if not any(weights):
            raise ValueError(f"no document has {length} tokens")
        doc = self.docs[rng.choices(range(len(self.docs)), weights=weights)[0]]
        start = rng.randrange(len(doc) - length + 1)
        return doc[start : start + length].tolist()

    def windows(self, length: int, count: int, seed: int) -> list[list[int]]:
        """``count`` non-overlapping windows, in document order (for evaluation)."""
        rng = random.Random(seed)
        out = []
        for doc in self.docs:
            for start in range(0, len(doc) - length + 1, length):
                out.append(doc[start : start + length].tolist())
        rng.shuffle(out)
        if len(out) < count:
            raise ValueError(f"only {len(out)} windows of {length} tokens, {count} wanted")
        return out[:count]


def control_partners(items: Sequence) -> list:
    """Each item's control partner, the next one (the last's is the first): another window's
    context, paired so in Table 1, the probe and the read-out alike."""
    return list(items[1:]) + list(items[:1])


def split_chunks(tokens: Sequence[int], k: int) -> list[list[int]]:
    return [list(tokens[i : i + k]) for i in range(0, len(tokens), k)]


def start_ids(tokenizer, start: bool = True) -> list[int]:
    """The fixed first token of every language-modelling sample: the tokenizer's BOS.

    Position 0 of a Llama-family decoder is its attention sink: later tokens attend to
    it heavily but read little content from it, so a chunk vector placed there is
    mostly wasted.  Served chat prompts already start with a template token; this gives
    training and evaluation samples the same layout.  ``start=False`` gives ``[]``.
    """
    if not start:
        return []
    if tokenizer.bos_token_id is None:
        raise ValueError("the decoder tokenizer has no BOS token to start samples with")
    return [int(tokenizer.bos_token_id)]


def lm_sample(tokenizer, placeholder_id: int, pieces: Sequence, num_targets: int, start: bool = True) -> Sample:
    """BOS, then ``pieces`` (token ids and compressed-chunk items); the loss is on the
    last ``num_targets`` tokens."""
    return Sample(pieces_to_prompt(start_ids(tokenizer, start) + list(pieces), placeholder_id), num_targets)


def context_sample(tokenizer, placeholder_id: int, context: Sequence[int], continuation: Sequence[int],
                   k: int, expand: Sequence[int] = (), num_targets: int | None = None,
                   start: bool = True) -> Sample:
    """BOS, the context compressed into chunks of k (``expand`` kept raw), then the continuation.

    The targets are the continuation's last ``num_targets`` tokens (all by default).
    """
    pieces = chunk_pieces(tokenizer, split_chunks(context, k), expand) if context else []
    return lm_sample(tokenizer, placeholder_id, list(pieces) + list(continuation),
                     len(continuation) if num_targets is None else num_targets, start)


def reconstruction_sample(tokenizer, placeholder_id: int, tokens: Sequence[int], k: int,
                          start: bool = True) -> Sample:
    """Reconstruction: the decoder reproduces all ``n*k`` tokens from their n chunk embeddings."""
    return context_sample(tokenizer, placeholder_id, tokens, tokens, k, start=start)


def recall_sample(tokenizer, placeholder_id: int, tokens: Sequence[int], k: int, chunk: int, cue: int,
                  start: bool = True) -> Sample:
    """Recall: all n chunks of ``tokens`` compressed, then chunk ``chunk``'s tokens raw; the
    loss is on all but its first ``cue``.

    The cue says which of the n vectors to read, as the text before a copied span does in a
    continuation; the chunks before it are not shown raw, so the decoder cannot predict the
    chunk from them and must read its vector.
    """
    target = split_chunks(tokens, k)[chunk]
    if not 0 <= cue < len(target):
        raise ValueError(f"cue of {cue} tokens leaves nothing to recall in a chunk of {len(target)}")
    return context_sample(tokenizer, placeholder_id, tokens, target, k, num_targets=len(target) - cue, start=start)


def random_expansion(num_chunks: int, fraction: float, rng: random.Random) -> list[int]:
    """``round(p * L)`` distinct chunk indices chosen uniformly."""
    from refrag_vllm.expansion_policy import num_expanded

    return sorted(rng.sample(range(num_chunks), num_expanded(num_chunks, fraction)))


def qa_sample(builder, question: str, passages: Sequence[str], answer: str, eos_id: int,
              expand: Sequence[Sequence[int]] | None = None) -> Sample:
    """SFT: chat prompt with compressed passages (``expand`` as in ``builder.build``),
    then the answer and end-of-turn token."""
    prompt = builder.build(question, passages, expand=expand)
    answer_ids = builder.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos_id]
    prompt = dict(prompt, prompt_token_ids=list(prompt["prompt_token_ids"]) + answer_ids)
    return Sample(prompt, len(answer_ids))
