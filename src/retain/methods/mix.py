"""A weighted sum of objectives in one optimizer step (CHORD, arXiv 2508.11408: (1 − μ_t)·GRPO + μ_t·SFT).

Each part's micro-batches go into the step, each loss scaled by its part's weight at that step; every part
normalises by its own whole-step denominator, so the step's gradient is Σ_i w_i·∇L_i exactly, with gradient
accumulation or DDP. A part whose weight is 0 at a step is skipped (no rollout, no forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from retain.train import Objective


@dataclass
class WeightedPart:
    part: int
    batch: Any
    weight: float


class WeightedSum:
    """``parts``: (metric prefix, objective, weight at a step); the first part's metrics keep their names."""

    def __init__(self, parts: Sequence[tuple[str, Objective, Callable[[int], float]]]) -> None:
        self.parts = list(parts)

    def batches(self, step: int) -> list[WeightedPart]:
        out = []
        for i, (_, objective, weight) in enumerate(self.parts):
            w = weight(step)
            if w != 0:
                out += [WeightedPart(i, b, w) for b in objective.batches(step)]
        return out

    def loss(self, model: torch.nn.Module, micro: WeightedPart) -> tuple[torch.Tensor, dict[str, float]]:
        prefix, objective, _ = self.parts[micro.part]
        loss, metrics = objective.loss(model, micro.batch)
        named = {(f"{prefix}_{k}" if prefix else k): v for k, v in metrics.items()}
        return micro.weight * loss, {**named, f"{prefix or 'main'}_weight": micro.weight}
