"""Retrieve, compress, generate: ``RefragRAG(index, llm).generate(questions, top_k=3)``.

Modes (:mod:`refrag_vllm.modes`), on the same engine and decoder:

* ``refrag-cached``  the passages' chunk vectors from the index's REFRAG cache (no encoder work at query time);
* ``refrag``         the passages' chunk text (the engine encodes it, through its chunk-vector cache);
* ``vanilla``        the passages as plain tokens (vanilla RAG).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..chunks import CompressedChunks
from ..modes import REFRAG, REFRAG_CACHED, VANILLA
from ..prompt import RefragPromptBuilder
from .index import Hit, PassageIndex, Retriever

MODES = (REFRAG_CACHED, REFRAG, VANILLA)


@dataclass
class RagAnswer:
    question: str
    answer: str
    passages: list[Hit]
    positions: int
    """Decoder positions of the prompt."""
    mode: str
    token_ids: list[int] = field(default_factory=list)


class RefragRAG:
    """A passage index + a REFRAG checkpoint (served by ``llm``, a ``vllm.LLM``).

    ``model_dir`` defaults to the checkpoint ``llm`` serves.  The index's cache must
    belong to that checkpoint and its k (checked here, once).
    """

    def __init__(self, index: PassageIndex | str | Path, llm=None, *, model_dir: str | Path | None = None,
                 retriever: Retriever | None = None) -> None:
        self.index = index if isinstance(index, PassageIndex) else PassageIndex.open(index)
        self.llm = llm
        if model_dir is None:
            if llm is None:
                raise ValueError("give llm (a vllm.LLM) or model_dir")
            model_dir = llm.llm_engine.vllm_config.model_config.model
        self.model_dir = str(model_dir)
        self.index.check_model(self.model_dir)
        self.builder = RefragPromptBuilder.from_pretrained(self.model_dir)
        self.retriever = retriever or Retriever.from_spec(self.index.meta["retriever"])

    def retrieve(self, questions: Sequence[str], top_k: int = 3) -> list[list[Hit]]:
        return self.index.search(self.retriever.embed(questions), top_k)

    def prompt(self, question: str, hits: Sequence[Hit], mode: str = REFRAG_CACHED) -> dict:
        """The engine prompt for one question and its passages."""
        if mode == REFRAG_CACHED:
            passages = [CompressedChunks.from_projected_embeds(self.index.chunk_embeds(h.row)) for h in hits]
            return self.builder.build(question, passages)
        texts = [h.text for h in hits]
        if mode == REFRAG:
            return self.builder.build(question, texts)
        if mode == VANILLA:
            expand = [range(len(self.builder.chunk_passage(t))) for t in texts]
            return self.builder.build(question, texts, expand=expand)
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")

    def generate(self, questions: Sequence[str], top_k: int = 3, *, mode: str = REFRAG_CACHED, sampling_params=None,
                 use_tqdm: bool = False) -> list[RagAnswer]:
        """Answers for many questions in one offline batch."""
        from vllm import SamplingParams

        if self.llm is None:
            raise ValueError("RefragRAG was built without an llm")
        questions = list(questions)
        hits = self.retrieve(questions, top_k)
        prompts = [self.prompt(q, h, mode) for q, h in zip(questions, hits)]
        params = sampling_params or SamplingParams(max_tokens=128, temperature=0.0)
        outputs = self.llm.generate(prompts, params, use_tqdm=use_tqdm)
        return [RagAnswer(q, o.outputs[0].text, h, RefragPromptBuilder.num_positions(p), mode,
                          list(o.outputs[0].token_ids))
                for q, h, p, o in zip(questions, hits, prompts, outputs)]
