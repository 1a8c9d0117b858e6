"""Stage 2, continual pre-training: predict the next o tokens after s compressed tokens.

The curriculum grows s = n*k as in reconstruction.  A share (``mixed_fraction``) of
the samples keep a random fraction p of their chunks as raw tokens, so the model
learns mixed inputs (the paper's p = 0.1 stage before RL); another share
(``reconstruction_fraction``) are reconstruction samples, so the chunk vectors'
content stays readable while the decoder adapts, and a share of the next-paragraph
samples (``plain_fraction``) have no context, so the decoder keeps its plain language
modelling.  With ``distill_weight``, the next-paragraph samples learn the base
decoder's next-token distributions after the same context as raw tokens (KL), instead
of the corpus's one next token; with ``distill_teacher = "readout"`` the base decoder reads
each compressed chunk as the model reads it back from its vector instead, a teacher whose
content the vectors can reach.  The encoder
LoRA (with ``train_encoder``), the projector (unless ``train_projector`` is false) and the
decoder's LoRA (with ``train_decoder``) learn.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from .curriculum import curriculum_batches
from .model import DECODER_LORA, TrainingModel, learning_groups
from .samples import (Sample, TokenCorpus, context_sample, lm_sample, random_expansion, reconstruction_sample,
                      split_chunks)
from .trainer import Stage, distill_loss, nll_loss, read_out, step_rng

NAME = "cpt"


def plan(model: TrainingModel):
    cfg = model.cfg
    c = cfg.cpt
    # n chunk positions (a few expanded to k) and the o predicted tokens
    expanded = lambda n, k: round(c.mixed_fraction * round(c.expand_fraction * n)) * (k - 1)
    return curriculum_batches(c.curriculum, c.positions_per_batch, cfg.run.chunk_sizes,
                              cfg.run.chunk_size_weights, cfg.run.seed + 1,
                              lambda n, k: n + c.continuation_tokens + expanded(n, k))


def next_paragraph_sample(model: TrainingModel, corpus: TokenCorpus, num_chunks: int, k: int,
                          rng: random.Random) -> Sample:
    """One CPT sample: ``num_chunks * k`` context tokens compressed (with probability
    ``mixed_fraction`` a random p of the chunks stay raw), then the o tokens to predict
    (``num_chunks = 0``: BOS, then the o tokens)."""
    context, continuation, expand = draw_paragraph(model, corpus, num_chunks, k, rng)
    return paragraph_sample(model, context, continuation, k, expand)


def draw_paragraph(model: TrainingModel, corpus: TokenCorpus, num_chunks: int, k: int,
                   rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """A window's ``num_chunks * k`` context tokens, its o continuation tokens, and the chunks
    kept raw (with probability ``mixed_fraction``, a random p of them)."""
    c = model.cfg.cpt
    s = num_chunks * k
    window = corpus.window(s + c.continuation_tokens, rng)
    mixed = rng.random() < c.mixed_fraction
    expand = random_expansion(num_chunks, c.expand_fraction, rng) if mixed else []
    return window[:s], window[s:], expand


def paragraph_sample(model: TrainingModel, context: list[int], continuation: list[int], k: int,
                     expand, teacher_context: list[int] | None = None) -> Sample:
    """BOS, ``context`` in chunks of k (``expand`` raw), then ``continuation`` to predict;
    ``teacher_context``: what the teacher reads instead, as raw tokens (``teacher_prompt``)."""
    start = model.cfg.run.bos_first
    sample = context_sample(model.tokenizer, model.placeholder_id, context, continuation, k, expand, start=start)
    if teacher_context is not None:
        raw = lm_sample(model.tokenizer, model.placeholder_id, list(teacher_context) + list(continuation),
                        len(continuation), start)
        sample = dataclasses.replace(sample, teacher_prompt=raw.prompt)
    return sample


def read_out_contexts(model: TrainingModel, drawn: list[tuple[list[int], list[int], list[int]]], k: int
                      ) -> list[list[int]]:
    """Each drawn context with its compressed chunks replaced by what the decoder reads back
    from their vectors (k greedy tokens each, one batched read-out), its raw chunks kept."""
    chunks = [split_chunks(context, k) for context, _, _ in drawn]
    compressed = [(i, j) for i, (_, _, expand) in enumerate(drawn) for j in range(len(chunks[i]))
                  if j not in expand]
    back = read_out(model.refrag, model.tokenizer, [chunks[i][j] for i, j in compressed],
                    start=model.cfg.run.bos_first, progress=False)
    for (i, j), tokens in zip(compressed, back):
        chunks[i][j] = tokens
    return [[t for chunk in window for t in chunk] for window in chunks]


def make_batch(model: TrainingModel, corpus: TokenCorpus, steps, step: int):
    """The step's samples; with ``distill_weight``, ``{"reconstruction": samples,
    "paragraph": next-paragraph samples with their teacher prompts}``."""
    b = steps[step]
    c = model.cfg.cpt
    rng = step_rng(model.cfg.run.seed, NAME, step)
    batch, drawn = [], []
    for _ in range(b.batch_size):
        if c.reconstruction_fraction and rng.random() < c.reconstruction_fraction:
            n = min(b.num_chunks, c.reconstruction_max_chunks)
            batch.append(reconstruction_sample(model.tokenizer, model.placeholder_id,
                                               corpus.window(n * b.chunk_size, rng), b.chunk_size,
                                               start=model.cfg.run.bos_first))
        else:
            n = 0 if c.plain_fraction and rng.random() < c.plain_fraction else b.num_chunks
            context, continuation, expand = draw_paragraph(model, corpus, n, b.chunk_size, rng)
            if c.distill_weight:  # scored apart, once every teacher context is known
                drawn.append((context, continuation, expand))
            else:
                batch.append(paragraph_sample(model, context, continuation, b.chunk_size, expand))
    if not c.distill_weight:
        return batch
    teachers = ([context for context, _, _ in drawn] if c.distill_teacher == "raw"
                else read_out_contexts(model, drawn, b.chunk_size))
    return {"reconstruction": batch,
            "paragraph": [paragraph_sample(model, context, continuation, b.chunk_size, expand, teacher)
                          for (context, continuation, expand), teacher in zip(drawn, teachers)]}


def train_cpt(model: TrainingModel, corpus: TokenCorpus, run_dir: Path, *, use_mlflow: bool = False) -> Path:
    c = model.cfg.cpt
    if c.distill_teacher not in ("raw", "readout"):
        raise ValueError(f"cpt: distill_teacher is 'raw' or 'readout', not {c.distill_teacher!r}")
    steps = plan(model)
    groups = learning_groups(c)
    stage = Stage(NAME, run_dir, model, groups, len(steps), c.lr, c.warmup,
                  lr_scales={DECODER_LORA: c.decoder_lr_scale}, use_mlflow=use_mlflow)
    teacher = model.frozen_copy(None).refrag if c.distill_weight else None  # the base decoder
    for step in stage.steps():
        batch = make_batch(model, corpus, steps, step)
        if teacher is None:  # one NLL over all target tokens
            losses = {"": nll_loss(model.refrag, batch)}
        else:  # reconstruction samples by NLL, next-paragraph samples by KL from the teacher
            losses = {}
            if batch["reconstruction"]:
                losses["reconstruction"] = nll_loss(model.refrag, batch["reconstruction"])
            if batch["paragraph"]:
                losses["paragraph_kl"] = c.distill_weight * distill_loss(model.refrag, teacher, batch["paragraph"])
        loss = sum(losses.values())
        b = steps[step]
        parts = {f"loss_{name}": v.item() for name, v in losses.items() if name}
        stage.log(step, loss=loss.item(), **stage.update(step, loss), **parts, curriculum_stage=b.stage,
                  num_chunks=b.num_chunks, k=b.chunk_size)
        stage.checkpoint(step)
    return stage.finish()
