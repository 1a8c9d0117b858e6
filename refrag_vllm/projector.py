"""The projector phi: encoder space -> decoder token-embedding space."""

from __future__ import annotations

import torch
from torch import nn

from .config import ProjectorConfig

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class ChunkProjector(nn.Module):
    """2-layer MLP, ``(n, in_dim) -> (n, out_dim)``; paper: hidden_dim == out_dim.

    With ``cfg.standardize_inputs`` the input is first standardized per dimension by the
    buffers ``input_mean`` and ``input_inv_std`` (both ``(in_dim,)``, saved with the weights).
    With ``cfg.output_norm`` every output row is scaled to that L2 norm.
    """

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown projector activation {cfg.activation!r}")
        self.fc1 = nn.Linear(cfg.in_dim, cfg.hidden_dim)
        self.act = _ACTIVATIONS[cfg.activation]()
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.out_dim)
        self.standardize_inputs = cfg.standardize_inputs
        self.output_norm = cfg.output_norm
        if cfg.standardize_inputs:
            self.register_buffer("input_mean", torch.zeros(cfg.in_dim))
            self.register_buffer("input_inv_std", torch.ones(cfg.in_dim))

    @torch.no_grad()
    def set_input_statistics(self, encoder_embeds: torch.Tensor, min_std: float = 1e-4) -> None:
        """Measure ``input_mean`` / ``input_inv_std`` on ``(n, in_dim)`` encoder vectors."""
        if not self.standardize_inputs:
            raise ValueError("this projector does not standardize its inputs")
        x = encoder_embeds.float()
        self.input_mean.copy_(x.mean(0))
        self.input_inv_std.copy_(1.0 / x.std(0).clamp(min=min_std))

    def forward(self, chunk_embeds: torch.Tensor) -> torch.Tensor:
        if self.standardize_inputs:
            chunk_embeds = (chunk_embeds - self.input_mean.to(chunk_embeds.dtype)) * self.input_inv_std.to(chunk_embeds.dtype)
        out = self.fc2(self.act(self.fc1(chunk_embeds)))
        if self.output_norm:
            out = out * (self.output_norm / out.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return out
