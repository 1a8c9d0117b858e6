"""The curriculum (paper Table 8): from one chunk towards many.

Training is split into ``num_stages`` stages.  Data type ``n x k`` (reconstruct or
predict from n chunks) has a total sample count, spread over the stages as a
geometric sequence with the type's ratio: below 1 the type fades out (easy types
dominate stage 1), above 1 it grows (hard types dominate the last stage).  With the
default config this gives the paper's rows, e.g. ``1 x k``: 1333, 445, 148, 49, 16,
6, 2, 1, 0 and ``8 x k``: 20, 35, 61, 106, 185, 324, 565, 985, 1719.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from .config import CurriculumConfig


def geometric_counts(total: int, ratio: float, num_stages: int) -> list[int]:
    """``total`` samples over ``num_stages`` stages, stage i proportional to ``ratio**i``.

    Rounded by largest remainder, so the counts sum to ``total`` exactly.
    """
    if total < 0 or ratio <= 0 or num_stages < 1:
        raise ValueError(f"bad curriculum row: total={total}, ratio={ratio}, stages={num_stages}")
    weights = [ratio**i for i in range(num_stages)]
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(num_stages), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def stage_counts(cfg: CurriculumConfig) -> list[dict[int, int]]:
    """Per stage, ``{n: samples}`` for each data type ``n x k``."""
    if not len(cfg.num_chunks) == len(cfg.totals) == len(cfg.ratios):
        raise ValueError(
            f"curriculum: num_chunks, totals and ratios need one entry per type "
            f"(got {len(cfg.num_chunks)}, {len(cfg.totals)}, {len(cfg.ratios)})"
        )
    rows = {
        n: geometric_counts(round(total * cfg.scale), ratio, cfg.num_stages)
        for n, total, ratio in zip(cfg.num_chunks, cfg.totals, cfg.ratios)
    }
    return [{n: rows[n][s] for n in cfg.num_chunks} for s in range(cfg.num_stages)]


@dataclass(frozen=True)
class Batch:
    """One optimiser step of the curriculum: ``batch_size`` samples of ``num_chunks`` chunks of k tokens."""

    stage: int
    num_chunks: int
    chunk_size: int
    batch_size: int


def curriculum_batches(
    cfg: CurriculumConfig,
    positions_per_batch: int,
    chunk_sizes: list[int],
    chunk_size_weights: list[float],
    seed: int,
    positions_per_sample: Callable[[int, int], int],
) -> list[Batch]:
    """The whole run as an ordered list of steps: stage by stage, types shuffled within a stage.

    A step of type ``n x k`` holds ``positions_per_batch // positions_per_sample(n, k)``
    samples (at least one), so every step costs about the same decoder compute.
    The list is a pure function of its arguments: resuming at step i replays it.
    """
    rng = random.Random(seed)
    steps: list[Batch] = []
    for stage, counts in enumerate(stage_counts(cfg)):
        stage_steps = []
        for n, count in counts.items():
            while count > 0:
                k = rng.choices(chunk_sizes, weights=chunk_size_weights)[0]
                bs = min(count, max(1, positions_per_batch // positions_per_sample(n, k)))
                stage_steps.append(Batch(stage, n, k, bs))
                count -= bs
        rng.shuffle(stage_steps)
        steps += stage_steps
    return steps
