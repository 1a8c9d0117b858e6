"""Selective expansion: which chunks stay raw tokens instead of one compressed position.

Paper, section A.1: a two-layer transformer over the chunk embeddings ``c_i``
gives one logit per chunk, computed once.  ``T' = round(p * L)`` chunks are then
picked one after another with pointer-network masking (a picked chunk's logit
becomes ``-inf``), so no chunk is picked twice.  It is trained GRPO-style, with reward
``-log-perplexity`` of the continuation under the mixed input (``refrag_train.policy_rl``).

At inference :func:`choose_expansions` picks greedily; the expansion fraction
``p`` is a parameter there too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import PolicyConfig


def _sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(..., )`` float positions -> ``(..., dim)`` sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.unsqueeze(-1).float() * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class ExpansionPolicy(nn.Module):
    """``chunk_embeds (B, L, in_dim)`` -> ``logits (B, L)``: how much expanding each chunk helps.

    Each chunk also sees where it sits: its index from the start and from the end
    of the context (sinusoidal), so the policy works for any L.
    """

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.in_dim, cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.num_heads, dim_feedforward=4 * cfg.d_model, dropout=0.0,
            batch_first=True, norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 1)

    def forward(self, chunk_embeds: torch.Tensor, chunk_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``chunk_mask (B, L)`` is True on real chunks; padded chunks get logit ``-inf``."""
        B, L, _ = chunk_embeds.shape
        if chunk_mask is None:
            chunk_mask = torch.ones(B, L, dtype=torch.bool, device=chunk_embeds.device)
        idx = torch.arange(L, device=chunk_embeds.device).expand(B, L)
        from_end = chunk_mask.sum(1, keepdim=True) - 1 - idx
        d = self.cfg.d_model
        h = self.in_proj(chunk_embeds.float()) + _sinusoid(idx, d) + _sinusoid(from_end, d)
        h = self.layers(h, src_key_padding_mask=~chunk_mask)
        logits = self.head(self.norm(h)).squeeze(-1)
        return logits.masked_fill(~chunk_mask, float("-inf"))


def num_expanded(num_chunks: int, fraction: float) -> int:
    """``T' = round(p * L)``, clipped to ``[0, L]``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"expansion fraction must be in [0, 1], got {fraction}")
    return min(num_chunks, int(round(fraction * num_chunks)))


def sample_expansions(
    logits: torch.Tensor, num_picks: int, *, greedy: bool = False, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``num_picks`` distinct chunks per row, one after another.

    ``logits (B, L)`` -> ``actions (B, num_picks)`` chunk indices in pick order and
    ``logprob (B,)``, the log-probability of that ordered sequence.  After each
    pick the chosen logit is masked to ``-inf`` (logits are not recomputed).
    """
    B, L = logits.shape
    masked = logits.clone()
    actions, logprob = [], torch.zeros(B, device=logits.device)
    for _ in range(num_picks):
        logp = torch.log_softmax(masked, -1)
        if greedy:
            a = logp.argmax(-1)
        else:
            a = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        logprob = logprob + logp.gather(1, a[:, None]).squeeze(1)
        masked = masked.scatter(1, a[:, None], float("-inf"))
        actions.append(a)
    if not actions:
        return torch.zeros(B, 0, dtype=torch.long, device=logits.device), logprob
    return torch.stack(actions, 1), logprob


def sequence_logprob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-probability ``(B,)`` of the ordered picks ``actions (B, T')`` under ``logits (B, L)``."""
    masked = logits
    total = torch.zeros(logits.shape[0], device=logits.device)
    for t in range(actions.shape[1]):
        a = actions[:, t : t + 1]
        total = total + torch.log_softmax(masked, -1).gather(1, a).squeeze(1)
        masked = masked.scatter(1, a, float("-inf"))
    return total


@torch.no_grad()
def choose_expansions(policy: ExpansionPolicy, chunk_embeds: torch.Tensor, fraction: float) -> list[int]:
    """Inference: ``chunk_embeds (L, in_dim)`` of one context -> sorted chunk indices to expand."""
    n = num_expanded(chunk_embeds.shape[0], fraction)
    if n == 0:
        return []
    logits = policy(chunk_embeds.unsqueeze(0))
    actions, _ = sample_expansions(logits, n, greedy=True)
    return sorted(actions[0].tolist())


class PolicyExpander:
    """Front-end selective expansion: the checkpoint's encoder + policy, run before the engine.

    Which chunks stay raw tokens changes the prompt's token layout, so the choice is
    made where the prompt is built (offline builder or server renderer), on CPU.  The
    encoder runs in the checkpoint's dtype, as in the engine, and its vectors go on to
    the engine for the chunks that stay compressed (:meth:`encode`, then
    :meth:`choose_from_embeds`).
    """

    def __init__(self, chunk_embedder, policy: ExpansionPolicy) -> None:
        self.chunk_embedder, self.policy = chunk_embedder, policy.eval()

    @classmethod
    def from_pretrained(cls, model_dir) -> "PolicyExpander":
        from .checkpoint import load_tensors
        from .config import load_refrag_config
        from .embedder import ChunkEmbedder, strip_prefix

        _, cfg = load_refrag_config(model_dir)
        if cfg.expansion_policy is None:
            raise ValueError(f"{model_dir}: this checkpoint has no trained expansion policy")
        policy = ExpansionPolicy(cfg.expansion_policy)
        weights = strip_prefix(load_tensors(model_dir, ("expansion_policy.",)), "expansion_policy.")
        policy.load_state_dict({k: v.float() for k, v in weights.items()})
        return cls(ChunkEmbedder.from_pretrained(model_dir, with_projector=False), policy)

    @torch.no_grad()
    def encode(self, chunk_texts: list[str]) -> torch.Tensor:
        """Chunk texts -> their encoder vectors ``(L, encoder_hidden)``, float32."""
        return self.chunk_embedder.encode(chunk_texts).float()

    def choose_from_embeds(self, chunk_embeds: torch.Tensor, fraction: float) -> list[int]:
        """Indices (sorted) of the chunks to keep expanded, ``round(fraction * L)`` of them."""
        if chunk_embeds.shape[0] == 0 or num_expanded(chunk_embeds.shape[0], fraction) == 0:
            return []
        return choose_expansions(self.policy, chunk_embeds, fraction)
