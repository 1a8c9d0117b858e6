"""Stage 1b, reading: reconstruction again, with the decoder's LoRA learning too.

Reconstruction (stage 1) keeps the decoder frozen, as the paper does, so that the encoder
and projector learn to put a chunk's content into its vector. A 135M decoder, though,
reads little of what its frozen layers were never trained to read: a one-vector
chunk is a new kind of input to it. In this stage the same 1 x k reconstruction samples
train the decoder's LoRA beside the projector (and the encoder's LoRA), so the decoder
learns to read the vectors. Only the chunk's vector tells the decoder which tokens to
reproduce, so the decoder cannot learn to do without it, unlike in CPT. The content probe
(``refrag_train/ABLATIONS.md``) measures what this buys. ``reading.steps = 0`` skips it.
"""

from __future__ import annotations

from pathlib import Path

from .model import DECODER_LORA, ENCODER_LORA, TrainingModel
from .reconstruction import reconstruction_batch
from .samples import TokenCorpus
from .trainer import Stage, nll_loss, step_rng

NAME = "reading"


def make_batch(model: TrainingModel, corpus: TokenCorpus, step: int):
    """``batch_size`` windows of ``num_chunks x k`` tokens (k: the run's default)."""
    c = model.cfg.reading
    return reconstruction_batch(model, corpus, step_rng(model.cfg.run.seed, NAME, step), c.num_chunks,
                                model.cfg.run.default_chunk_size, c.batch_size)


def train_reading(model: TrainingModel, corpus: TokenCorpus, run_dir: Path, *, use_mlflow: bool = False) -> Path:
    c = model.cfg.reading
    groups = ["projector", DECODER_LORA] + ([ENCODER_LORA] if c.train_encoder else [])
    stage = Stage(NAME, run_dir, model, groups, c.steps, c.lr, c.warmup, use_mlflow=use_mlflow)
    for step in stage.steps():
        loss = nll_loss(model.refrag, make_batch(model, corpus, step))
        stage.log(step, loss=loss.item(), **stage.update(step, loss))
        stage.checkpoint(step)
    return stage.finish()
