"""The projector phi: encoder space -> decoder token-embedding space."""

from __future__ import annotations

import torch
from torch import nn

from .config import ProjectorConfig

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class ChunkProjector(nn.Module):
    """2-layer MLP, ``(n, in_dim) -> (n, out_dim)``; paper: hidden_dim == out_dim."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown projector activation {cfg.activation!r}")
        self.fc1 = nn.Linear(cfg.in_dim, cfg.hidden_dim)
        self.act = _ACTIVATIONS[cfg.activation]()
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.out_dim)

    def forward(self, chunk_embeds: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(chunk_embeds)))
