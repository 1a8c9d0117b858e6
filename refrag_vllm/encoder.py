"""The chunk encoder: a Hugging Face BERT/RoBERTa model pooled to one vector per chunk.

Shared by the vLLM model class and the PyTorch reference, so that both compute
exactly the same ``chunk_embeds``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def build_encoder_model(encoder_config: dict) -> nn.Module:
    """Instantiate the encoder from its HF config dict (random init; weights load later)."""
    from transformers import AutoConfig, AutoModel

    cfg = dict(encoder_config)
    model_type = cfg.pop("model_type")
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    # The pooler (and its weights) is unused: we pool token states ourselves.
    return AutoModel.from_config(hf_cfg, add_pooling_layer=False)


def tokenize_chunks(
    encoder_tokenizer, texts: Sequence[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-tokenize chunk texts for the encoder.

    Returns ``(input_ids, attention_mask)``, both ``(num_chunks, L)`` int64, padded
    to the longest chunk of this call (``L <= max_tokens``).
    """
    enc = encoder_tokenizer(
        list(texts),
        padding="longest",
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
    )
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


class ChunkEncoder(nn.Module):
    """``(num_chunks, L)`` encoder token ids -> ``(num_chunks, encoder_hidden)``."""

    def __init__(self, encoder_config: dict, pooling: str = "mean") -> None:
        super().__init__()
        self.model = build_encoder_model(encoder_config)
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_states = self.model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (n, L, H_enc)
        if self.pooling == "cls":
            return token_states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(token_states.dtype)  # (n, L, 1)
        return (token_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
