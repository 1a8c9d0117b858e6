"""What every stage shares: optimiser, schedule, metrics, checkpoints and resume.

A stage writes into ``RUN_DIR/<stage>/``:

    metrics.jsonl     one line per logged step
    last/             delta + optimizer.pt + state.json (step, seconds spent), every ``save_every`` steps
    final/            the stage's delta when it finished (the next stage starts from it)

Step ``i``'s data comes from ``step_rng(seed, stage, i)``, so a resumed stage sees
exactly the batches an uninterrupted one would have.
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

from .model import TrainingModel


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
                 peak_lr: float, warmup: float, *, use_mlflow: bool = False) -> None:
        self.name, self.model, self.total_steps = name, model, total_steps
        self.peak_lr, self.warmup = peak_lr, warmup
        self.dir = run_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.params = model.trainable(groups)
        if not self.params:
            raise ValueError(f"stage {name}: nothing to train in groups {groups}")
        self.optimizer = torch.optim.AdamW(self.params, lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.step = 0
        self._clock, self._elapsed_before = time.monotonic(), 0.0
        self.log = MetricsLog(self.dir / "metrics.jsonl", use_mlflow=use_mlflow,
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
        self.log.drop_after(self.step)
        print(f"[{self.name}] resuming at step {self.step}/{self.total_steps}")

    def save(self, where: Path) -> None:
        tmp = where.with_name(where.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_delta(tmp, meta={"stage": self.name, "step": self.step})
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "total_steps": self.total_steps,
                                                    "elapsed_s": round(self.elapsed_s, 3)}))
        shutil.rmtree(where, ignore_errors=True)
        tmp.replace(where)

    @property
    def elapsed_s(self) -> float:
        """Seconds spent reaching ``self.step``, summed over interrupted runs (steps redone
        after a crash are not counted twice)."""
        return self._elapsed_before + time.monotonic() - self._clock

    def set_lr(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.peak_lr, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def apply_gradients(self, max_norm: float = 1.0) -> float:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def progress(self) -> tqdm:
        return tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True)

    def end_step(self, bar: tqdm, **metrics: float) -> None:
        self.step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("loss", "reward")})
        if self.step % self.log_every == 0 or self.step == self.total_steps:
            self.log.log(self.step, **metrics)
        if self.step % self.save_every == 0 and self.step < self.total_steps:
            self.save(self.dir / "last")

    def finish(self) -> Path:
        self.save(self.final_dir)
        shutil.rmtree(self.dir / "last", ignore_errors=True)
        self.log.close()
        return self.final_dir


def nll_loss(model: TrainingModel, samples) -> torch.Tensor:
    """Mean negative log-likelihood of all samples' target tokens (the shared scoring path)."""
    return group_nll_losses(model, [samples])[0]


def group_nll_losses(model: TrainingModel, groups) -> list[torch.Tensor]:
    """Each group's mean target NLL, ``[()]``, from one forward pass over all groups' samples."""
    samples = [s for g in groups for s in g]
    if not samples:
        return []
    logprobs = iter(model.refrag.target_logprobs([s.prompt for s in samples], [s.num_targets for s in samples]))
    return [-torch.cat([next(logprobs) for _ in g]).mean() for g in groups]


def distill_loss(model: TrainingModel, teacher: TrainingModel, samples) -> torch.Tensor:
    """Mean over all target positions of KL(teacher || model) between next-token
    distributions, ``()``: how far ``model`` is from ``teacher`` on ``samples``.  The teacher
    reads each sample's ``teacher_prompt`` where it has one (e.g. the context as raw tokens)."""
    prompts, num = [s.prompt for s in samples], [s.num_targets for s in samples]
    teacher_prompts = [s.teacher_prompt or s.prompt for s in samples]
    with torch.no_grad():
        teacher_logits = torch.cat(teacher.refrag.target_logits(teacher_prompts, num))  # (T, vocab)
        teacher_lp = torch.log_softmax(teacher_logits, -1)
    student_lp = torch.log_softmax(torch.cat(model.refrag.target_logits(prompts, num)), -1)
    return torch.nn.functional.kl_div(student_lp, teacher_lp, log_target=True, reduction="batchmean")


def run_supervised(stage: Stage, make_batch, describe=lambda step: {}, *, teacher: TrainingModel | None = None,
                   distill: tuple[str, float] | None = None) -> Path:
    """The loop of every next-token stage: batch, loss, backward, clip, AdamW, log, save.

    ``make_batch(step)`` returns that step's samples (a pure function of the step), or a
    dict ``{name: samples}``: the loss is then the sum of each group's mean NLL, and each
    group's mean is logged as ``loss_<name>``.  With ``distill=(name, weight)`` that group
    is scored by ``weight * distill_loss`` against the frozen ``teacher`` instead, logged
    as ``loss_<name>_kl``.
    """
    model = stage.model
    model.train(False)  # no dropout: losses are comparable across steps and with evaluation
    with stage.progress() as bar:
        while stage.step < stage.total_steps:
            batch = make_batch(stage.step)
            groups = batch if isinstance(batch, dict) else {"": batch}
            lr = stage.set_lr()
            nll_groups = {k: v for k, v in groups.items() if v and (distill is None or k != distill[0])}
            losses = dict(zip(nll_groups, group_nll_losses(model, list(nll_groups.values()))))
            if distill is not None and groups.get(distill[0]):
                name, weight = distill
                losses[f"{name}_kl"] = weight * distill_loss(model, teacher, groups[name])
            loss = sum(losses.values())
            loss.backward()
            grad_norm = stage.apply_gradients()
            parts = {f"loss_{name}": v.item() for name, v in losses.items()} if len(groups) > 1 else {}
            stage.end_step(bar, loss=loss.item(), lr=lr, grad_norm=grad_norm, **parts, **describe(stage.step))
    return stage.finish()
