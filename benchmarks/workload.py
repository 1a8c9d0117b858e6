"""Benchmark requests: real offline text cut into unique passages, one prompt per mode.

Text: :func:`refrag_vllm.retrieval.corpora.docstring_texts` (docstrings of the standard library
and the installed packages).  Every request takes fresh passages from a cursor,
so no two requests share a chunk (cold prefill: no prefix-cache or encoder-cache hits).

Modes, all for the same question and passages on the same engine and decoder:

* ``vanilla``        passages as plain tokens;
* ``refrag``         raw chunk text, the encoder runs in the engine (uncached);
* ``refrag-cached``  precomputed projected vectors (the REFRAG cache path);
* ``refrag-policy``  the RL policy (timed, client side) keeps a fraction of chunks raw; the
                     others go to the engine as the encoder vectors the policy computed;
* ``ceiling``        plain tokens, as many decoder positions as a REFRAG prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from refrag_vllm.prompt import rag_user_message
from refrag_vllm.retrieval.corpora import docstring_texts

QUESTION = "Which function should I use, and what does it return?"


class PassageSource:
    """Hands out passages of ``passage_tokens`` decoder tokens; never the same text twice."""

    def __init__(self, tokenizer, passage_tokens: int = 256) -> None:
        self.tokenizer = tokenizer
        self.passage_tokens = passage_tokens
        self._docs = docstring_texts()
        self._buffer: list[int] = []
        self.used_tokens = 0

    def _fill(self, need: int) -> None:
        while len(self._buffer) < need:
            doc = next(self._docs, None)
            if doc is None:
                raise RuntimeError(f"out of unique benchmark text after {self.used_tokens} tokens")
            self._buffer += self.tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]

    def take(self, n: int) -> list[int]:
        """The next ``n`` unused token ids."""
        self._fill(n)
        ids, self._buffer = self._buffer[:n], self._buffer[n:]
        self.used_tokens += n
        return ids

    def passages(self, context_tokens: int) -> list[str]:
        """About ``context_tokens`` tokens of fresh text as passages of ``passage_tokens``."""
        out = []
        remaining = context_tokens
        while remaining > 0:
            n = min(self.passage_tokens, remaining)
            out.append(self.tokenizer.decode(self.take(n)).strip())
            remaining -= n
        return out


def plain_user_message(question: str, passages: list[str]) -> str:
    """Vanilla RAG: the REFRAG user turn's layout, with the passages as plain text."""
    return rag_user_message(passages, question)


def chat_text(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


@dataclass
class Request:
    """One benchmark request in both forms: a prompt dict (offline) and marked text (server)."""

    mode: str
    k: int | None
    context_tokens: int
    prompt: dict
    text: str
    positions: int
    prep_seconds: float = 0.0
    """Client-side work before the engine (policy selection; the cache lookup is not timed)."""
    extra: dict = field(default_factory=dict)


class RequestFactory:
    """Builds the benchmark requests of every mode for one checkpoint.

    ``project`` (encoder + projector on CPU, outside any timed region) fills the
    REFRAG cache for ``refrag-cached``; ``expander`` (the checkpoint's policy) picks
    the raw chunks for ``refrag-policy``, and that choice *is* timed (``prep_seconds``).
    """

    def __init__(self, model_dir: str | Path, passage_tokens: int = 256, question: str = QUESTION) -> None:
        import dataclasses

        import torch

        from refrag_vllm.prompt import RefragPromptBuilder
        from refrag_vllm.reference import RefragReferenceModel

        self.model_dir = str(model_dir)
        self.question = question
        from refrag_vllm.config import load_refrag_config

        has_policy = load_refrag_config(model_dir)[1].expansion_policy is not None
        self._base = RefragPromptBuilder.from_pretrained(model_dir, load_policy=has_policy)
        self.tokenizer = self._base.tokenizer
        self._builders = {}
        self._replace = dataclasses.replace
        self.source = PassageSource(self.tokenizer, passage_tokens)
        self._reference = RefragReferenceModel.load(model_dir, dtype=torch.float32)
        head, tail = chat_text(self.tokenizer, rag_user_message(["\x00"], question)).split("\x00")
        self._head = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        self._tail = self.tokenizer(tail, add_special_tokens=False)["input_ids"]

    @property
    def has_policy(self) -> bool:
        return self._base.expander is not None

    def builder(self, k: int):
        """The checkpoint's prompt builder with chunk size ``k`` (the policy is shared)."""
        from refrag_vllm.prompt import RefragPromptBuilder

        if k not in self._builders:
            b = self._base
            self._builders[k] = RefragPromptBuilder(b.tokenizer, self._replace(b.cfg, chunk_size=k),
                                                    b.decoder_hidden_size, b.expander)
        return self._builders[k]

    def _request(self, mode, k, context_tokens, prompt, text, prep=0.0, **extra) -> Request:
        from refrag_vllm.prompt import RefragPromptBuilder

        return Request(mode, k, context_tokens, prompt, text, RefragPromptBuilder.num_positions(prompt), prep, extra)

    def vanilla(self, context_tokens: int) -> Request:
        text = chat_text(self.tokenizer, plain_user_message(self.question, self.source.passages(context_tokens)))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._request("vanilla", None, context_tokens, {"prompt_token_ids": ids}, text)

    def ceiling(self, positions: int, context_tokens: int, k: int) -> Request:
        """Plain tokens filling exactly ``positions`` decoder positions."""
        fill = positions - len(self._head) - len(self._tail)
        if fill < 1:
            raise ValueError(f"{positions} positions leave no room for context")
        ids = self._head + self.source.take(fill) + self._tail
        text = self.tokenizer.decode(ids)
        return self._request("ceiling", k, context_tokens, {"prompt_token_ids": ids}, text)

    def refrag(self, context_tokens: int, k: int) -> Request:
        b = self.builder(k)
        passages = self.source.passages(context_tokens)
        prompt = b.build(self.question, passages)
        return self._request("refrag", k, context_tokens, prompt,
                             chat_text(self.tokenizer, b.format_user_message(self.question, passages)))

    def refrag_cached(self, context_tokens: int, k: int) -> Request:
        import torch

        from refrag_vllm.chunks import CompressedChunks

        b = self.builder(k)
        passages = self.source.passages(context_tokens)
        texts = [b.chunk_texts(p) for p in passages]
        with torch.no_grad():
            items = self._reference.project_items([CompressedChunks.from_texts(t) for t in texts])
        cached = [CompressedChunks.from_projected_embeds(x.float()) for x in items]
        prompt = b.build(self.question, cached)
        return self._request("refrag-cached", k, context_tokens, prompt,
                             chat_text(self.tokenizer, b.format_user_message(self.question, cached)))

    def refrag_policy(self, context_tokens: int, k: int, fraction: float) -> Request:
        import time

        b = self.builder(k)
        passages = self.source.passages(context_tokens)
        start = time.perf_counter()
        marked = b.policy_passages(passages, fraction)
        prep = time.perf_counter() - start
        prompt = b.build(self.question, marked)
        return self._request("refrag-policy", k, context_tokens, prompt,
                             chat_text(self.tokenizer, b.format_user_message(self.question, marked)), prep,
                             fraction=fraction, expanded=sum(len(p.expand) for p in marked))

    def make(self, mode: str, context_tokens: int, k: int | None = None, fraction: float = 0.1) -> Request:
        if mode == "vanilla":
            return self.vanilla(context_tokens)
        if mode == "refrag":
            return self.refrag(context_tokens, k)
        if mode == "refrag-cached":
            return self.refrag_cached(context_tokens, k)
        if mode == "refrag-policy":
            return self.refrag_policy(context_tokens, k, fraction)
        raise ValueError(f"unknown mode {mode!r}")
