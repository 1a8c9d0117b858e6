"""Stage 1, reconstruction: the decoder (frozen) reproduces n*k tokens from n chunk embeddings.

Only the encoder's LoRA and the projector learn, on the tokens' NLL and, with
``reconstruction.contrastive_weight``, a contrastive term on the vectors themselves.
Data follow the curriculum: step i holds ``batch_size`` windows of ``n * k`` tokens, n growing stage by stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from refrag_vllm.prompt import chunk_text

from .curriculum import curriculum_batches
from .model import ENCODER_LORA, TrainingModel
from .samples import TokenCorpus, reconstruction_sample
from .trainer import Stage, step_rng, vector_loss

NAME = "reconstruction"


def plan(model: TrainingModel):
    cfg = model.cfg
    rc = cfg.reconstruction
    # n chunk positions, then the n*k reconstructed tokens
    return curriculum_batches(rc.curriculum, rc.positions_per_batch, cfg.run.chunk_sizes,
                              cfg.run.chunk_size_weights, cfg.run.seed, lambda n, k: n * (k + 1))


def reconstruction_batch(model: TrainingModel, corpus: TokenCorpus, rng, num_chunks: int, k: int,
                         batch_size: int):
    """``batch_size`` reconstruction samples of ``num_chunks x k`` tokens, windows drawn with ``rng``."""
    return [
        reconstruction_sample(model.tokenizer, model.placeholder_id, corpus.window(num_chunks * k, rng), k,
                              start=model.cfg.run.bos_first)
        for _ in range(batch_size)
    ]


def make_batch(model: TrainingModel, corpus: TokenCorpus, steps, step: int):
    """Step ``step`` of the plan ``steps``: its reconstruction samples."""
    b = steps[step]
    return reconstruction_batch(model, corpus, step_rng(model.cfg.run.seed, NAME, step), b.num_chunks,
                                b.chunk_size, b.batch_size)


@torch.no_grad()
def measure_projector_inputs(model: TrainingModel, corpus: TokenCorpus, num_chunks: int = 2048,
                             batch_size: int = 64) -> None:
    """Set the standardizing projector's per-dimension mean and std from the encoder
    vectors of ``num_chunks`` training chunks of the default k (seeded)."""
    k = model.cfg.run.default_chunk_size
    rng = step_rng(model.cfg.run.seed, "projector-inputs", 0)
    texts = [chunk_text(model.tokenizer, corpus.window(k, rng)) for _ in range(num_chunks)]
    vectors = [model.refrag.encode_texts(texts[i:i + batch_size]).float()
               for i in tqdm(range(0, num_chunks, batch_size), desc="projector input statistics", unit="batch")]
    model.refrag.projector.set_input_statistics(torch.cat(vectors))


def train_reconstruction(model: TrainingModel, corpus: TokenCorpus, run_dir: Path, *, use_mlflow: bool = False) -> Path:
    rc = model.cfg.reconstruction
    steps = plan(model)
    groups = ["projector"] + ([ENCODER_LORA] if rc.train_encoder else [])
    stage = Stage(NAME, run_dir, model, groups, len(steps), rc.lr, rc.warmup, use_mlflow=use_mlflow)
    if stage.step == 0 and not stage.finished and model.refrag.projector.standardize_inputs:
        measure_projector_inputs(model, corpus)
    for step in stage.steps():
        loss, parts = vector_loss(model, make_batch(model, corpus, steps, step), rc.contrastive_weight,
                                  rc.contrastive_temperature)
        b = steps[step]
        stage.log(step, loss=loss.item(), **parts, **stage.update(step, loss), curriculum_stage=b.stage,
                  num_chunks=b.num_chunks, k=b.chunk_size)
        stage.checkpoint(step)
    return stage.finish()
