"""The SFT family's objective: −log π on answer tokens, optionally reweighted, plus regularisers.

Loss of one optimizer step: Σ_t w_t·(−log π(y_t)) / N + Σ regularisers, N = the number of answer tokens (eos
included) in the whole step's batch — TRL SFTTrainer's reduction, also for weighted losses (EAFT, masking), which
lower the loss rather than renormalise it. Each micro-batch contributes its share, so gradient accumulation
changes nothing. Pretraining uses this objective too, with no weighting and no regulariser.
"""

from __future__ import annotations

import random
from typing import Callable, Protocol, Sequence

import torch

from retain.data import IGNORE, TokenBatch, TokenPair, collate, length_buckets, model_inputs
from retain.distributed import world_size
from retain.losses import confident_conflict_mask, dft_weights, eaft_weights, sft_loss

Sampler = Callable[[random.Random, int, int], Sequence[TokenPair]]  # (rng, k, step) -> token pairs
# (logits [B,T,V], targets [B,T], mask [B,T]) -> (weights or None, mask)
TokenWeighting = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]


class Regularizer(Protocol):
    def penalty(
        self, model: torch.nn.Module, batch: TokenBatch, logits: torch.Tensor, first: bool
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


def nll_weighting(logits, targets, mask):
    return None, mask


def eaft_weighting(k: int, alpha: float) -> TokenWeighting:
    def weigh(logits, targets, mask):
        return eaft_weights(logits, k=k, alpha=alpha), mask

    return weigh


def dft_weighting(logits, targets, mask):
    """DFT: each target token weighted by its own detached probability (arXiv 2508.05629)."""
    return dft_weights(logits, targets), mask


def conflict_masking(entropy_max: float, prob_max: float) -> TokenWeighting:
    def weigh(logits, targets, mask):
        return None, mask & ~confident_conflict_mask(logits, targets, entropy_max, prob_max)

    return weigh


class SFTObjective:
    """Each step draws ``batch_size`` token pairs from ``sampler`` (seeded by ``(seed, step)``, so resume is exact)
    and splits them into micro-batches of ``micro_batch_size`` (default: the whole batch, or one share per process
    under DDP, where the Trainer gives each process its share of the micro-batches).

    ``micro_batch_tokens`` (length bucketing): the step's sequences are sorted by length and cut into micro-batches
    of at most that many padded tokens (and at most ``micro_batch_size`` rows when that is given too), so short and
    long sequences stop sharing a padded row length; the cuts are the ones with the fewest padded positions plus a
    fixed price per micro-batch (``retain.data.length_buckets``). The step's examples and its loss are unchanged — every
    micro-batch is still normalised by the whole step's target tokens — only the padding (and float summation order)
    differ (bench/sft_varlen.py measures it on data of 5-400 tokens)."""

    def __init__(
        self,
        sampler: Sampler,
        pad_id: int,
        batch_size: int,
        micro_batch_size: int | None = None,
        seed: int = 0,
        weighting: TokenWeighting = nll_weighting,
        regularizers: Sequence[Regularizer] = (),
        micro_batch_tokens: int | None = None,
    ) -> None:
        self.sampler = sampler
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.micro = micro_batch_size or -(-batch_size // world_size())
        self.micro_rows = micro_batch_size  # the row cap under length bucketing (None: the token budget alone)
        self.micro_tokens = micro_batch_tokens
        self.seed = seed
        self.weighting = weighting
        self.regularizers = list(regularizers)

    def batches(self, step: int) -> list[TokenBatch]:
        rng = random.Random(self.seed * 1_000_003 + step)
        pairs = list(self.sampler(rng, self.batch_size, step))
        if self.micro_tokens:
            groups = length_buckets([len(p[0]) + len(p[1]) for p in pairs], self.micro_tokens, self.micro_rows)
            chunks = [collate([pairs[i] for i in group], self.pad_id) for group in groups]
        else:
            chunks = [collate(pairs[i : i + self.micro], self.pad_id) for i in range(0, len(pairs), self.micro)]
        step_tokens = sum(c.num_target_tokens for c in chunks)
        step_positions = sum(int(c.attention_mask[:, 1:].sum()) for c in chunks)  # positions that predict a token
        for i, chunk in enumerate(chunks):
            chunk.step_tokens, chunk.step_positions, chunk.first = step_tokens, step_positions, i == 0
        return chunks

    def loss(self, model: torch.nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        logits = model(**model_inputs(batch, device)).logits
        logits, targets = logits[:, :-1], batch.labels[:, 1:].to(device)
        mask = targets != IGNORE
        weights, kept = self.weighting(logits, targets, mask)
        loss = sft_loss(logits, kept, weights, targets=targets, num_items=batch.step_tokens)
        metrics = {"token_loss": float(loss.detach()), "tokens": float(mask.sum())}
        if kept is not mask:
            metrics["kept_share"] = float(kept.sum()) / max(1, int(mask.sum()))
        if weights is not None:
            metrics["mean_weight"] = float(weights[mask].mean()) if mask.any() else 0.0
        for reg in self.regularizers:
            extra, reg_metrics = reg.penalty(model, batch, logits, batch.first)
            loss = loss + extra
            metrics.update(reg_metrics)
        return loss, metrics
