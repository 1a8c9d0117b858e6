"""Stage 4, SFT on retrieval-augmented QA: question + compressed passages -> answer.

The QA pairs are derived from the Python documentation by ``refrag-train prepare``
(see :mod:`refrag_train.data.qa`): each question asks about an API entry, its passages are that
entry's documentation and other entries of the same page, all compressed.  The loss
is on the answer and the end-of-turn token.  With ``replay_batch_size``, every step also
holds CPT samples (next-paragraph prediction) and adds their mean loss: without them,
SFT washed out much of what CPT taught the model about compressed contexts.  With
``replay_distill``, that loss is the KL divergence from the model as it entered SFT
(learning without forgetting), which keeps more of it than the replay samples' NLL.
With ``raw_distill``, the answers also learn the KL divergence from a model reading the
passages as raw tokens: the one being trained (``raw_distill_teacher = "current"``, no
gradient through it) or the one that entered SFT (``"start"``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from refrag_vllm.prompt import RefragPromptBuilder

from .cpt import next_paragraph_sample
from .model import TrainingModel, learning_groups
from .samples import TokenCorpus, qa_sample
from .trainer import Stage, distill_loss, group_nll_losses, nll_loss, step_rng

NAME = "sft"


def prompt_builder(model: TrainingModel, chunk_size: int | None = None) -> RefragPromptBuilder:
    cfg = model.refrag.refrag_config
    if chunk_size:
        cfg = dataclasses.replace(cfg, chunk_size=chunk_size)
    return RefragPromptBuilder(model.tokenizer, cfg, model.refrag.config.hidden_size)


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (``eos`` otherwise)."""
    for token in ("<|im_end|>", "<|eot_id|>"):
        if token in tokenizer.get_vocab():
            return int(tokenizer.convert_tokens_to_ids(token))
    return int(tokenizer.eos_token_id)


def make_batch(model: TrainingModel, examples: list[dict], step: int, corpus: TokenCorpus | None = None):
    """QA samples; with ``replay_batch_size``, ``{"qa": [...], "replay": [CPT samples]}``."""
    sc = model.cfg.sft
    rng = step_rng(model.cfg.run.seed, NAME, step)
    builder = prompt_builder(model, model.cfg.run.default_chunk_size)
    eos = end_of_turn_id(model.tokenizer)
    batch = rng.sample(examples, min(sc.batch_size, len(examples)))
    qa = [qa_sample(builder, ex["question"], ex["passages"], ex["answer"], eos) for ex in batch]
    if sc.raw_distill:  # the teacher reads every passage as raw tokens
        qa = [dataclasses.replace(s, teacher_prompt=qa_sample(
                  builder, ex["question"], ex["passages"], ex["answer"], eos,
                  expand=builder.every_chunk(ex["passages"])).prompt)
              for s, ex in zip(qa, batch)]
    if not sc.replay_batch_size:
        return qa
    k = model.cfg.run.default_chunk_size
    return {"qa": qa, "replay": [next_paragraph_sample(model, corpus, sc.replay_chunks, k, rng)
                                 for _ in range(sc.replay_batch_size)]}


def train_sft(model: TrainingModel, examples: list[dict], run_dir: Path, corpus: TokenCorpus | None = None,
              *, teacher_delta: Path | None = None, use_mlflow: bool = False) -> Path:
    """``teacher_delta``: the previous stage's final weights, needed with ``replay_distill`` and with
    ``raw_distill`` from the ``start``."""
    sc = model.cfg.sft
    if not examples:
        raise ValueError("sft: no QA examples")
    if sc.replay_batch_size and corpus is None:
        raise ValueError("sft: replay_batch_size needs the training corpus")
    if sc.replay_distill and (not sc.replay_batch_size or teacher_delta is None):
        raise ValueError("sft: replay_distill needs replay_batch_size > 0 and the previous stage's weights")
    if sc.raw_distill_teacher not in ("current", "start"):
        raise ValueError(f"sft: raw_distill_teacher is 'current' or 'start', not {sc.raw_distill_teacher!r}")
    from_start = bool(sc.raw_distill) and sc.raw_distill_teacher == "start"
    if from_start and teacher_delta is None:
        raise ValueError("sft: raw_distill from the start needs the previous stage's weights")
    groups = learning_groups(sc)
    stage = Stage(NAME, run_dir, model, groups, sc.steps, sc.lr, sc.warmup, use_mlflow=use_mlflow)
    start = model.frozen_copy(teacher_delta).refrag if sc.replay_distill or from_start else None
    raw_teacher = start if from_start else model.refrag
    for step in stage.steps():
        batch = make_batch(model, examples, step, corpus)
        if not sc.replay_batch_size:
            losses = {"qa": nll_loss(model.refrag, batch)}
        elif not sc.replay_distill:  # each group's mean NLL, from one forward pass
            losses = dict(zip(batch, group_nll_losses(model.refrag, list(batch.values()))))
        else:  # the answers by NLL, the replayed CPT samples by KL from the model as it entered SFT
            losses = {"qa": nll_loss(model.refrag, batch["qa"]),
                      "replay_kl": sc.replay_distill * distill_loss(model.refrag, start, batch["replay"])}
        if sc.raw_distill:  # the answers by KL from a model reading the passages raw
            qa = batch["qa"] if sc.replay_batch_size else batch
            losses["qa_raw_kl"] = sc.raw_distill * distill_loss(model.refrag, raw_teacher, qa)
        loss = sum(losses.values())
        parts = {f"loss_{name}": v.item() for name, v in losses.items() if len(losses) > 1}
        stage.log(step, loss=loss.item(), **stage.update(step, loss), **parts)
        stage.checkpoint(step)
    return stage.finish()
