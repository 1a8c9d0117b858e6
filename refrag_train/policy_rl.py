"""Stage 3, the selective-expansion policy, trained GRPO-style (paper section A.1).

For each input (s context tokens in L chunks of k, then o tokens): the policy scores
the L chunk embeddings once; G sequences of ``T' = round(p*L)`` distinct chunks are
sampled; each is scored by the frozen model with those chunks expanded, reward
``r = -log-PPL(o)``; advantages are normalised within the group of G; the policy
takes ``ppo_epochs`` PPO-clipped steps on them.  Only the policy learns.
"""

from __future__ import annotations

from pathlib import Path

import torch

from refrag_vllm.expansion_policy import num_expanded, sample_expansions, sequence_logprob
from refrag_vllm.prompt import chunk_text

from .model import TrainingModel
from .samples import TokenCorpus, context_sample, split_chunks
from .trainer import Stage, step_rng

NAME = "policy"


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages: ``rewards (B, G)`` -> ``(r - mean_g r) / (std_g r + eps)``.

    ``std`` is the population standard deviation over the G samples of one input.
    """
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(
    new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> torch.Tensor:
    """PPO-clipped surrogate, negated for minimisation (all inputs the same shape)."""
    ratio = torch.exp(new_logprob - old_logprob)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -torch.minimum(ratio * advantages, clipped * advantages).mean()


@torch.no_grad()
def chunk_embeddings(model: TrainingModel, contexts: list[list[int]], k: int) -> torch.Tensor:
    """Encoder vectors of each context's chunks: ``(B, L, encoder_hidden)`` fp32."""
    chunks = [split_chunks(c, k) for c in contexts]
    texts = [chunk_text(model.tokenizer, ch) for row in chunks for ch in row]
    enc = model.refrag.encode_texts(texts).float()
    return enc.view(len(contexts), len(chunks[0]), -1)


@torch.no_grad()
def rewards_for(model: TrainingModel, contexts, continuations, actions: torch.Tensor, k: int) -> torch.Tensor:
    """``-log-PPL`` of each continuation with the chosen chunks expanded: ``(len(contexts),)``."""
    samples = [
        context_sample(model.tokenizer, model.placeholder_id, ctx, cont, k, expand=a.tolist(),
                       start=model.cfg.run.bos_first)
        for ctx, cont, a in zip(contexts, continuations, actions)
    ]
    logprobs = model.refrag.target_logprobs([s.prompt for s in samples], [s.num_targets for s in samples])
    return torch.stack([lp.mean() for lp in logprobs])


def make_inputs(model: TrainingModel, corpus: TokenCorpus, step: int):
    pc = model.cfg.policy_rl
    rng = step_rng(model.cfg.run.seed, NAME, step)
    s = pc.context_chunks * model.cfg.run.default_chunk_size
    windows = [corpus.window(s + pc.continuation_tokens, rng) for _ in range(pc.batch_size)]
    return [w[:s] for w in windows], [w[s:] for w in windows]


def train_policy(model: TrainingModel, corpus: TokenCorpus, run_dir: Path, *, use_mlflow: bool = False) -> Path:
    pc = model.cfg.policy_rl
    G, k = pc.group_size, model.cfg.run.default_chunk_size
    picks = num_expanded(pc.context_chunks, pc.expand_fraction)
    if picks == 0:
        raise ValueError(f"policy_rl: expand_fraction {pc.expand_fraction} of {pc.context_chunks} chunks picks none")
    stage = Stage(NAME, run_dir, model, ["policy"], pc.steps, pc.lr, 0.04, use_mlflow=use_mlflow)
    for step in stage.steps():
        contexts, continuations = make_inputs(model, corpus, step)
        embeds = chunk_embeddings(model, contexts, k)  # (B, L, d_enc)
        generator = torch.Generator().manual_seed(model.cfg.run.seed * 100003 + step)
        with torch.no_grad():
            logits = model.policy(embeds).repeat_interleave(G, 0)  # (B*G, L)
            actions, old_logprob = sample_expansions(logits, picks, generator=generator)
        rewards = rewards_for(model, [c for c in contexts for _ in range(G)],
                              [c for c in continuations for _ in range(G)], actions, k)
        advantages = grpo_advantages(rewards.view(-1, G)).view(-1)
        for _ in range(pc.ppo_epochs):
            new_logprob = sequence_logprob(model.policy(embeds).repeat_interleave(G, 0), actions)
            loss = grpo_loss(new_logprob, old_logprob, advantages, pc.clip_eps)
            update = stage.update(step, loss)
        group_spread = rewards.view(-1, G).std(1).mean()
        stage.log(step, loss=loss.item(), reward=float(rewards.mean()), reward_group_std=float(group_spread),
                  **update)
        stage.checkpoint(step)
    return stage.finish()
