"""Stage 1b, reading: reconstruction again, with the decoder's LoRA learning too.

Reconstruction (stage 1) keeps the decoder frozen, as the paper does, so that the encoder
and projector learn to put a chunk's content into its vector. A 135M decoder, though,
reads little of what its frozen layers were never trained to read: a one-vector
chunk is a new kind of input to it. In this stage the same 1 x k reconstruction samples
train the decoder's LoRA beside the projector (and the encoder's LoRA), so the decoder
learns to read the vectors. Only the chunk's vector tells the decoder which tokens to
reproduce, so the decoder cannot learn to do without it, unlike in CPT.

A share of each batch (``reading.recall_fraction``) can be recall samples
(:func:`~refrag_train.samples.recall_sample`): one chunk of an n-chunk window, reproduced
from all n vectors after a few cue tokens, so the decoder learns to find the vector that
matches the text it is reading among many. The content probe (``refrag_train/ABLATIONS.md``)
measures what each buys. ``reading.contrastive_weight`` adds reconstruction's contrastive
term on the vectors. ``reading.steps = 0`` skips the stage.

A second stage of the same kind, ``sequence_reading`` (its own ``[sequence_reading]`` table,
0 steps by default), follows it on n x k samples (``num_chunks`` > 1): the decoder learns to read
a sequence of vectors in order, as Table 1's 16 chunks and a RAG prompt's passages are, not one.
"""

from __future__ import annotations

from pathlib import Path

from .model import TrainingModel, learning_groups
from .reconstruction import reconstruction_batch
from .samples import TokenCorpus, recall_sample
from .trainer import Stage, step_rng, vector_loss

NAME = "reading"
SEQUENCE_NAME = "sequence_reading"
STAGE_NAMES = (NAME, SEQUENCE_NAME)
"""The stages this module trains, each from its own ``ReadingConfig`` table."""


def make_batch(model: TrainingModel, corpus: TokenCorpus, step: int, name: str = NAME):
    """Stage ``name``'s (its config: ``model.cfg.<name>``) ``batch_size`` samples: windows of
    ``num_chunks x k`` tokens (k: the run's default) to reconstruct, then
    ``round(recall_fraction * batch_size)`` recall samples."""
    c, k = getattr(model.cfg, name), model.cfg.run.default_chunk_size
    rng = step_rng(model.cfg.run.seed + c.seed, name, step)
    num_recall = round(c.recall_fraction * c.batch_size)
    batch = reconstruction_batch(model, corpus, rng, c.num_chunks, k, c.batch_size - num_recall)
    for _ in range(num_recall):
        n = rng.choice(c.recall_num_chunks)
        batch.append(recall_sample(model.tokenizer, model.placeholder_id, corpus.window(n * k, rng), k,
                                   rng.randrange(n), c.recall_cue_tokens, start=model.cfg.run.bos_first))
    return batch


def train_reading(model: TrainingModel, corpus: TokenCorpus, run_dir: Path, *, name: str = NAME,
                  use_mlflow: bool = False) -> Path:
    """Stage ``name`` (``reading`` or ``sequence_reading``), into ``run_dir/<name>/``."""
    c = getattr(model.cfg, name)
    stage = Stage(name, run_dir, model, learning_groups(c), c.steps, c.lr, c.warmup, use_mlflow=use_mlflow)
    for step in stage.steps():
        loss, parts = vector_loss(model, make_batch(model, corpus, step, name), c.contrastive_weight,
                                  c.contrastive_temperature)
        stage.log(step, loss=loss.item(), **parts, **stage.update(step, loss))
        stage.checkpoint(step)
    return stage.finish()
