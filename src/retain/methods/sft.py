"""Supervised finetuning on (prompt, answer) token pairs, the objective pretraining uses too.

Loss: −log π(y_t) summed over answer tokens (eos included) and divided by the number of answer tokens in the
optimizer step's batch (TRL SFTTrainer's convention), computed in float32. ``token_weights`` lets a method
(EAFT, conflict masking) weight tokens without changing the reduction.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from retain.data import IGNORE, TokenBatch, collate

Pair = tuple[list[int], list[int]]  # (prompt ids, answer ids ending with eos)
Sampler = Callable[[random.Random, int], Sequence[Pair]]


class SFTObjective:
    """Each step draws ``batch_size`` pairs from ``sampler`` (seeded by ``(seed, step)``, so resume is exact) and
    splits them into micro-batches of ``micro_batch_size``."""

    def __init__(self, sampler: Sampler, pad_id: int, batch_size: int, micro_batch_size: int | None = None, seed: int = 0):
        self.sampler = sampler
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.micro = micro_batch_size or batch_size
        self.seed = seed

    def batches(self, step: int) -> list[TokenBatch]:
        rng = random.Random(self.seed * 1_000_003 + step)
        pairs = list(self.sampler(rng, self.batch_size))
        chunks = [collate(pairs[i : i + self.micro], self.pad_id) for i in range(0, len(pairs), self.micro)]
        step_tokens = sum(c.num_target_tokens for c in chunks)
        for chunk in chunks:
            chunk.step_tokens = step_tokens
        return chunks

    def loss(self, model: torch.nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        loss = next_token_ce(logits, batch.labels.to(device), denominator=batch.step_tokens)
        return loss, {"tokens": float(batch.num_target_tokens)}


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor, denominator: int | None = None) -> torch.Tensor:
    """Σ −log p over positions whose label is not IGNORE (logits at t predict label t+1), divided by
    ``denominator`` (default: this batch's target-token count)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    count = denominator if denominator is not None else int((shift_labels != IGNORE).sum())
    return total / max(1, count)
