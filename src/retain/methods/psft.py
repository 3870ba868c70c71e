"""Proximal SFT (arXiv 2508.17784): the SFT family's data through PPO's clipped ratio against the pre-update policy.

Every ``updates_per_batch`` (μ) steps the SFT objective draws one batch (seeded by the first step of the μ, so resume
is exact at a multiple of μ) and the current model scores it once: π_old. The μ optimizer steps on that batch then
minimise Σ_t −min(ρ_t, clip(ρ_t, 1−ε, 1+ε)) / N (:func:`retain.losses.proximal_sft_loss`), N the step's target
tokens as in SFT; the SFT objective's regularisers are added as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retain.data import IGNORE, TokenBatch, model_inputs
from retain.losses import proximal_sft_loss, token_logprobs
from retain.methods.sft import SFTObjective


@dataclass
class ProximalBatch:
    tokens: TokenBatch
    old_logp: torch.Tensor  # [B, T-1] log π_old of each next token (valid on target tokens)


class ProximalSFTObjective:
    def __init__(self, sft: SFTObjective, model: torch.nn.Module, eps: float, updates_per_batch: int) -> None:
        self.sft, self.model, self.eps, self.mu = sft, model, eps, updates_per_batch
        self.cached: tuple[int, list[ProximalBatch]] | None = None

    @staticmethod
    def _logp(model: torch.nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        logits = model(**model_inputs(batch, device)).logits[:, :-1]
        targets = batch.labels[:, 1:].to(device)
        return token_logprobs(logits, targets), targets != IGNORE, logits

    def batches(self, step: int) -> list[ProximalBatch]:
        first = step - step % self.mu
        if self.cached is None or self.cached[0] != first:
            with torch.no_grad():
                chunks = self.sft.batches(first)
                self.cached = (first, [ProximalBatch(c, self._logp(self.model, c)[0]) for c in chunks])
        return self.cached[1]

    def loss(self, model: torch.nn.Module, batch: ProximalBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logp, mask, logits = self._logp(model, batch.tokens)
        old = batch.old_logp.to(logp.device)
        loss = proximal_sft_loss(logp, old, mask, self.eps, num_items=batch.tokens.step_tokens)
        with torch.no_grad():
            clipped = (logp - old).exp() > 1 + self.eps
        metrics = {"token_loss": float(loss.detach()), "tokens": float(mask.sum()),
                   "clip_fraction": float(clipped[mask].float().mean()) if mask.any() else 0.0}
        for reg in self.sft.regularizers:
            extra, reg_metrics = reg.penalty(model, batch.tokens, logits, batch.tokens.first)
            loss = loss + extra
            metrics.update(reg_metrics)
        return loss, metrics
