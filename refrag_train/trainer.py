"""What every stage shares: optimiser, schedule, metrics, checkpoints and resume.

A stage writes into ``RUN_DIR/<stage>/``:

    metrics.jsonl     one line per logged step
    last/             delta + optimizer.pt + state.json (step, seconds spent), every ``save_every`` steps
    final/            the stage's delta when it finished (the next stage starts from it)

Step ``i``'s data comes from ``step_rng(seed, stage, i)``, so a resumed stage sees
exactly the batches an uninterrupted one would have. Every stage's loop reads the same way:

    stage = Stage(NAME, run_dir, model, groups, total_steps, lr, warmup)
    for step in stage.steps():                  # resumes after the last save; progress bar
        batch = make_batch(..., step_rng(seed, NAME, step))
        loss = nll_loss(model.refrag, batch)
        stage.log(step, loss=loss.item(), **stage.update(step, loss))   # backward, clip, AdamW
        stage.checkpoint(step)                  # last/ every run.save_every steps
    return stage.finish()                       # final/
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from refrag_vllm.chunks import CompressedChunks
from refrag_vllm.config import MODALITY
from refrag_vllm.reference import RefragReferenceModel

from .model import TrainingModel
from .samples import context_sample


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to 10% of peak."""
    warm = max(1, int(round(warmup * total)))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def step_rng(seed: int, stage: str, step: int) -> random.Random:
    return random.Random(f"{seed}/{stage}/{step}")


class MetricsLog:
    """Metrics to ``metrics.jsonl`` and, with ``use_mlflow``, to a local MLflow store."""

    def __init__(self, path: Path, *, use_mlflow: bool = False, run_name: str = "",
                 params: dict[str, Any] | None = None, tracking_uri: str | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.mlflow = None
        if use_mlflow:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri or f"file:{path.parent.parent.resolve() / 'mlruns'}")
            mlflow.set_experiment("refrag")
            mlflow.start_run(run_name=run_name)
            flat = _flatten(params or {})
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
            self.mlflow = mlflow

    def log(self, step: int, **metrics: float) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.mlflow:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def drop_after(self, step: int) -> None:
        """Forget rows past ``step``: a resumed stage redoes them (no duplicate steps in the log)."""
        if self.path.exists():
            rows = self.path.read_text().splitlines()
            self.path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))

    def close(self) -> None:
        if self.mlflow:
            self.mlflow.end_run()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Stage:
    """One training stage's loop state: trainable groups, AdamW, schedule, resume."""

    def __init__(self, name: str, run_dir: Path, model: TrainingModel, groups: list[str], total_steps: int,
                 peak_lr: float, warmup: float, *, lr_scales: dict[str, float] | None = None,
                 use_mlflow: bool = False) -> None:
        """``lr_scales``: a group's learning rate as a share of the schedule's (default 1)."""
        self.name, self.model, self.total_steps = name, model, total_steps
        self.peak_lr, self.warmup = peak_lr, warmup
        self.dir = run_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        model.train(False)  # no dropout in any stage: losses are comparable across steps and with evaluation
        self.params = model.trainable(groups)
        if not self.params:
            raise ValueError(f"stage {name}: nothing to train in groups {groups}")
        named = model.named_groups()
        param_groups = [{"params": [p for _, p in named[g]], "lr_scale": (lr_scales or {}).get(g, 1.0)}
                        for g in groups if named.get(g)]
        self.optimizer = torch.optim.AdamW(param_groups, lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.step = 0
        self._clock, self._elapsed_before = time.monotonic(), 0.0
        self.log_file = MetricsLog(self.dir / "metrics.jsonl", use_mlflow=use_mlflow,
                                   run_name=f"{run_dir.name}/{name}", params=model.cfg.to_dict())
        self.save_every = model.cfg.run.save_every
        self.log_every = model.cfg.run.log_every
        self._resume()

    @property
    def final_dir(self) -> Path:
        return self.dir / "final"

    @property
    def finished(self) -> bool:
        return (self.final_dir / "refrag_delta.json").exists()

    def _resume(self) -> None:
        last = self.dir / "last"
        if not (last / "state.json").exists():
            return
        state = json.loads((last / "state.json").read_text())
        self.model.load_delta_weights(last)
        self.optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
        self.step = int(state["step"])
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self.log_file.drop_after(self.step)
        print(f"[{self.name}] resuming at step {self.step}/{self.total_steps}")

    def save(self, where: Path, done: int) -> None:
        """Weights, optimiser and clock after ``done`` steps, into ``where`` (atomically)."""
        tmp = where.with_name(where.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_delta(tmp, meta={"stage": self.name, "step": done})
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": done, "total_steps": self.total_steps,
                                                    "elapsed_s": round(self.elapsed_s, 3)}))
        shutil.rmtree(where, ignore_errors=True)
        tmp.replace(where)

    @property
    def elapsed_s(self) -> float:
        """Seconds spent reaching ``self.step``, summed over interrupted runs (steps redone
        after a crash are not counted twice)."""
        return self._elapsed_before + time.monotonic() - self._clock

    def steps(self):
        """The step indices still to run, from where the last save left off, with a progress bar.
        A step counts as done once the loop body for it has returned."""
        with tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step",
                  dynamic_ncols=True) as self._bar:
            for step in range(self.step, self.total_steps):
                yield step
                self.step = step + 1
                self._bar.update(1)

    def update(self, step: int, loss: torch.Tensor, max_norm: float = 1.0) -> dict[str, float]:
        """One optimiser step on ``loss`` at step ``step``'s learning rate (times each group's
        ``lr_scale``): backward, clip the gradient norm to ``max_norm``, AdamW. Returns
        ``{"lr", "grad_norm"}`` for the log."""
        lr = lr_at(step, self.total_steps, self.peak_lr, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": grad_norm}

    def log(self, step: int, **metrics: float) -> None:
        """Show ``loss``/``reward`` on the progress bar; every ``run.log_every`` steps (and at
        the last) append ``metrics`` to ``metrics.jsonl`` as step ``step + 1``."""
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("loss", "reward")})
        done = step + 1
        if done % self.log_every == 0 or done == self.total_steps:
            self.log_file.log(done, **metrics)

    def checkpoint(self, step: int) -> None:
        """Every ``run.save_every`` steps, save ``last/`` (weights, optimiser, step) to resume from."""
        done = step + 1
        if done % self.save_every == 0 and done < self.total_steps:
            self.save(self.dir / "last", done)

    def finish(self) -> Path:
        self.save(self.final_dir, self.step)
        shutil.rmtree(self.dir / "last", ignore_errors=True)
        self.log_file.close()
        return self.final_dir


def nll_loss(refrag: RefragReferenceModel, samples, projected: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of all samples' target tokens, ``()`` (the shared scoring
    path).  ``projected``: the samples' items already projected (:func:`project_sample_items`)."""
    return group_nll_losses(refrag, [samples], projected)[0]


def group_nll_losses(refrag: RefragReferenceModel, groups,
                     projected: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each group's mean target NLL, ``[()]``, from one forward pass over all groups' samples."""
    samples = [s for g in groups for s in g]
    if not samples:
        return []
    logprobs = iter(refrag.target_logprobs([s.prompt for s in samples], [s.num_targets for s in samples],
                                           projected))
    return [-torch.cat([next(logprobs) for _ in g]).mean() for g in groups]


def sample_items(samples) -> list[CompressedChunks]:
    """Every compressed-chunk item of ``samples``' prompts, in prompt order."""
    return [item for s in samples for item in s.prompt.get("multi_modal_data", {}).get(MODALITY, [])]


def project_sample_items(refrag: RefragReferenceModel, samples) -> list[torch.Tensor]:
    """``samples``' items through the encoder and projector, ``[(num_chunks, hidden)]``, for a
    loss on the vectors beside :func:`nll_loss` on the same forward."""
    return refrag.project_items(sample_items(samples))


def chunk_contrastive_loss(model: TrainingModel, items: list[CompressedChunks], projected: list[torch.Tensor],
                           temperature: float) -> torch.Tensor:
    """InfoNCE over a batch's text chunks, ``()``: each chunk's projected vector should be nearer,
    in cosine, to the mean decoder token embedding of its own text than to any other chunk's.

    Both sides are centred on their batch mean first, so only what tells chunks apart is
    compared: the vectors share a large common part (cosine about 0.9 within a window), which
    the decoder reads as a soft prompt and this term leaves alone.  ``projected`` as
    :func:`project_sample_items` returns it for ``items``; fewer than two chunks give 0.
    """
    texts = [t for item in items for t in item.texts]
    vectors = torch.cat(projected).float()  # (N, hidden)
    if len(texts) != vectors.shape[0]:
        raise ValueError(f"{vectors.shape[0]} projected vectors for {len(texts)} text chunks")
    if len(texts) < 2:
        return vectors.sum() * 0.0
    embed = model.refrag.get_input_embeddings()
    with torch.no_grad():
        ids = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
        token_means = torch.stack([embed(torch.tensor(i, device=embed.weight.device)).float().mean(0) if i
                                   else embed.weight.new_zeros(embed.weight.shape[1], dtype=torch.float32)
                                   for i in ids])  # (N, hidden)
    v = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=-1)
    t = torch.nn.functional.normalize(token_means - token_means.mean(0), dim=-1)
    logits = v @ t.T / temperature  # (N, N): chunk i's vector against chunk j's tokens
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(texts), device=logits.device))


def vector_loss(model: TrainingModel, samples, contrastive_weight: float = 0.0,
                temperature: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a stage that trains the chunk vectors on ``samples``: their NLL, plus
    ``contrastive_weight`` times :func:`chunk_contrastive_loss` on the same projected vectors.
    Returns ``(loss, parts)``; ``parts`` holds the two terms for the log (empty without the term)."""
    projected = project_sample_items(model.refrag, samples)
    loss = nll_loss(model.refrag, samples, projected)
    if not contrastive_weight:
        return loss, {}
    contrastive = chunk_contrastive_loss(model, sample_items(samples), projected, temperature)
    return loss + contrastive_weight * contrastive, {"nll": loss.item(), "contrastive": contrastive.item()}


@torch.no_grad()
def read_out(model, tokenizer, chunks: list[list[int]], *, start: bool = True, batch_size: int = 64,
             progress: bool = True) -> list[list[int]]:
    """Each chunk as the decoder reads it back from its vector alone: BOS, the chunk's
    projected vector, then ``len(chunk)`` greedy tokens.  Returns ``[[len(chunk)]]``.

    ``model``: a ``RefragReferenceModel`` (its decoder reads back its own vectors)."""
    pid = model.refrag_config.placeholder_token_id
    embed = model.get_input_embeddings()
    out: list[list[int]] = []
    for i in tqdm(range(0, len(chunks), batch_size), desc="reading chunks out", unit="batch", leave=False,
                  disable=not progress):
        batch = chunks[i : i + batch_size]
        # Every prompt is [BOS] + one vector: the same length, so no padding.
        prompts = [context_sample(tokenizer, pid, c, [], len(c), num_targets=0, start=start).prompt for c in batch]
        inputs_embeds, _ = model.embed_prompts(prompts)
        step = model(inputs_embeds=inputs_embeds, use_cache=True)
        tokens = [step.logits[:, -1].argmax(-1)]
        while len(tokens) < max(map(len, batch)):  # no forward pass after the last token
            step = model(inputs_embeds=embed(tokens[-1][:, None]), past_key_values=step.past_key_values, use_cache=True)
            tokens.append(step.logits[:, -1].argmax(-1))
        decoded = torch.stack(tokens, 1).tolist()
        out += [d[: len(c)] for d, c in zip(decoded, batch)]
    return out


def distill_loss(refrag: RefragReferenceModel, teacher: RefragReferenceModel, samples) -> torch.Tensor:
    """Mean over all target positions of KL(teacher || refrag) between next-token
    distributions, ``()``: how far ``refrag`` is from ``teacher`` on ``samples``.  The teacher
    reads each sample's ``teacher_prompt`` where it has one (e.g. the context as raw tokens)."""
    prompts, num = [s.prompt for s in samples], [s.num_targets for s in samples]
    teacher_prompts = [s.teacher_prompt or s.prompt for s in samples]
    with torch.no_grad():
        teacher_logits = torch.cat(teacher.target_logits(teacher_prompts, num))  # (T, vocab)
        teacher_lp = torch.log_softmax(teacher_logits, -1)
    student_lp = torch.log_softmax(torch.cat(refrag.target_logits(prompts, num)), -1)
    return torch.nn.functional.kl_div(student_lp, teacher_lp, log_target=True, reduction="batchmean")
