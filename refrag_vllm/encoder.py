"""The chunk encoder: a Hugging Face encoder pooled to one vector per chunk.

Two kinds of encoder fit: a BERT/RoBERTa-like model (all-MiniLM-L6-v2 by default),
or the decoder's own first N layers as a separate Llama stack (``model_type:
llama`` in the checkpoint's encoder config; see
:func:`refrag_vllm.default_models.decoder_layers_encoder`).

Shared by the vLLM model class and the PyTorch reference, so that both compute
exactly the same ``chunk_embeds``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import DECODER_STACK_TYPES, check_pooling, eos_token_id


def build_encoder_model(encoder_config: dict) -> nn.Module:
    """Instantiate the encoder from its HF config dict (random init; weights load later)."""
    from transformers import AutoConfig, AutoModel

    cfg = dict(encoder_config)
    model_type = cfg.pop("model_type")
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    if model_type in DECODER_STACK_TYPES:
        return AutoModel.from_config(hf_cfg)
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
        padding_side="right",  # ChunkEncoder trims buckets and places eos pooling's token so
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
    )
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


class ChunkEncoder(nn.Module):
    """``(num_chunks, L)`` encoder token ids -> ``(num_chunks, encoder_hidden)``.

    Chunks are encoded in buckets of similar length (sorted by length, ``bucket_size``
    per bucket, each trimmed to its longest chunk), then put back in order.  Chunk
    lengths vary a lot (code, symbols), and padding everything to the longest chunk
    doubled the encoder's time on real text (``benchmarks/profile.py``).  Masked
    positions do not change a chunk's vector, so this only changes speed.
    """

    def __init__(self, encoder_config: dict, pooling: str = "mean", bucket_size: int = 32) -> None:
        super().__init__()
        self.model = build_encoder_model(encoder_config)
        self.encoder_config = encoder_config
        self.eos_id = eos_token_id(encoder_config)
        self.set_pooling(pooling)
        self.bucket_size = bucket_size

    def set_pooling(self, pooling: str) -> None:
        """One of :data:`~refrag_vllm.config.POOLINGS` (:func:`~refrag_vllm.config.check_pooling`)."""
        check_pooling(pooling, self.encoder_config)
        self.pooling = pooling

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "eos":  # right-padded: each chunk's EOS goes where its padding starts
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            ends = attention_mask.sum(1)  # (n,)
            input_ids = torch.cat([input_ids, input_ids.new_zeros((len(rows), 1))], 1)  # (n, L + 1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_zeros((len(rows), 1))], 1)
            input_ids[rows, ends] = self.eos_id
            attention_mask[rows, ends] = 1
        token_states = self.model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (n, L, H_enc)
        if self.pooling == "eos":
            return token_states[rows, ends]
        if self.pooling == "cls":
            return token_states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(token_states.dtype)  # (n, L, 1)
        return (token_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[0]
        if n <= self.bucket_size:
            width = int(attention_mask.sum(1).max()) if n else input_ids.shape[1]
            return self._encode(input_ids[:, :width], attention_mask[:, :width])
        lengths = attention_mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        out = None
        for start in range(0, n, self.bucket_size):
            idx = order[start : start + self.bucket_size]
            width = int(lengths[idx].max())
            encoded = self._encode(input_ids[idx, :width], attention_mask[idx, :width])
            if out is None:
                out = encoded.new_empty((n, encoded.shape[1]))
            out[idx] = encoded
        return out
