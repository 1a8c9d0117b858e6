"""Chunk text -> encoder vectors -> projected vectors, written once.

:class:`ChunkEmbedder` holds a checkpoint's chunk encoder, its tokenizer and its projector
(modules owned by whoever built them). The PyTorch reference, the index's REFRAG cache and the
policy expander embed text through it; the vLLM model, whose multimodal processor tokenizes,
runs its :meth:`~ChunkEmbedder.encode_ids` and :meth:`~ChunkEmbedder.project`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .chunks import CompressedChunks
from .encoder import ChunkEncoder, tokenize_chunks
from .projector import ChunkProjector


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (``"projector."``), named without it: a submodule's state dict."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class ChunkEmbedder:
    """A checkpoint's chunk encoder + encoder tokenizer + projector (``projector`` may be None
    where only encoder vectors are needed, as for the expansion policy)."""

    def __init__(self, encoder: ChunkEncoder, projector: ChunkProjector | None, tokenizer, max_tokens: int) -> None:
        self.encoder, self.projector, self.tokenizer, self.max_tokens = encoder, projector, tokenizer, max_tokens

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, with_projector: bool = True,
                        dtype: torch.dtype | None = None) -> "ChunkEmbedder":
        """The encoder (and projector) of the checkpoint at ``model_dir`` alone, without the
        decoder, in eval mode, in ``dtype`` (default: as the engines run them here, the
        checkpoint's dtype or float32: :func:`refrag_vllm.engine.compute_dtype`)."""
        from transformers import AutoTokenizer

        from .checkpoint import load_tensors
        from .config import ENCODER_TOKENIZER_DIR, load_refrag_config
        from .engine import compute_dtype

        _, cfg = load_refrag_config(model_dir)
        tensors = load_tensors(model_dir, ("chunk_encoder.", "projector."))
        encoder_weights = strip_prefix(tensors, "chunk_encoder.")
        dtype = dtype or compute_dtype(next(iter(encoder_weights.values())).dtype)
        encoder = ChunkEncoder(cfg.encoder, cfg.encoder_pooling)
        encoder.load_state_dict(encoder_weights, strict=False)
        projector = None
        if with_projector:
            projector = ChunkProjector(cfg.projector)
            projector.load_state_dict(strip_prefix(tensors, "projector."))
            projector.to(dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(Path(model_dir) / ENCODER_TOKENIZER_DIR))
        return cls(encoder.to(dtype).eval(), projector, tokenizer, cfg.encoder_max_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk texts -> encoder ``(input_ids, attention_mask)``, both ``(n, L)`` int64."""
        return tokenize_chunks(self.tokenizer, texts, self.max_tokens)

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(n, L)`` encoder token ids -> ``(n, encoder_hidden)``, in the encoder's dtype."""
        return self.encoder(input_ids.to(self.device), attention_mask.to(self.device))

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Chunk texts -> ``(n, encoder_hidden)``, in the encoder's dtype."""
        return self.encode_ids(*self.tokenize(texts))

    def project(self, encoder_embeds: torch.Tensor) -> torch.Tensor:
        """``(n, encoder_hidden)`` -> ``(n, hidden)``, in the projector's dtype."""
        return self.projector(encoder_embeds.to(self.projector.fc1.weight.dtype))

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Chunk texts -> ``(n, hidden)`` projected vectors."""
        return self.project(self.encode(texts))

    def project_items(self, items: Sequence[CompressedChunks], dtype: torch.dtype) -> list[torch.Tensor]:
        """Items of any kind -> ``[(num_chunks_i, hidden)]`` in ``dtype``; all text chunks go
        through ONE encoder call."""
        texts = [t for item in items if item.kind == "text" for t in item.texts]
        encoded = iter(self.encode(texts).split(1) if texts else ())
        out = []
        for item in items:
            if item.kind == "projected":
                out.append(item.embeds.to(self.device, dtype))
                continue
            if item.kind == "encoder":
                enc = item.embeds.to(self.device)
            else:
                enc = torch.cat([next(encoded) for _ in range(item.num_chunks)])
            out.append(self.project(enc).to(dtype))
        return out
