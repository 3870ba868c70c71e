"""What pulls the weights back toward earlier skills, as penalties added to a method's loss.

- ``KLToReference`` (KL-regularised SFT): β·Σ_t KL(π_ref(·|x,y<t) ‖ π(·|x,y<t)) / N over answer tokens, exact over
  the vocabulary; π_ref = the stage's starting model.
- ``Distillation`` (LwF): λ·T²·Σ_t KL(π_prev^T ‖ π^T) / P over every attended position (prompt and answer),
  temperature T; π_prev = the previous stage's model (= the stage's starting model).
- ``L2SP``: λ·Σ(θ − θ_ref)² over the parameters present in the reference, once per step.
- ``EWC``: λ/2·Σ F·(θ − θ*)², F the diagonal empirical Fisher accumulated over earlier stages, θ* the weights
  at the end of the last stage; its ``end_stage`` adds the stage's Fisher (``update_fisher``) — penalty and Fisher
  in one part, which therefore needs task boundaries.
N and P are the step's answer-token and position counts, so micro-batches add up to the full batch. Each class
builds itself from its config and the stage context (``build``); ``REGULARIZERS`` maps a config kind to it.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from retain.data import IGNORE, TokenBatch, collate, encode_text, model_inputs
from retain.logprobs import Encoder
from retain.losses import distill_kl, sft_loss
from retain.methods.config import DistillReg, EWCReg, KLRefReg, L2SPReg
from retain.methods.parts import StagePart
from retain.methods.sources import reference_pairs
from retain.methods.stage import MethodState, StageContext


def _ref_logits(reference: torch.nn.Module, batch: TokenBatch, device) -> torch.Tensor:
    with torch.no_grad():
        return reference(**model_inputs(batch, device)).logits[:, :-1]


class KLToReference(StagePart):
    def __init__(self, reference: torch.nn.Module, weight: float) -> None:
        self.reference, self.weight = reference, weight

    @classmethod
    def build(cls, cfg: KLRefReg, ctx: StageContext) -> KLToReference:
        return cls(ctx.reference, cfg.weight)

    def penalty(self, model, batch: TokenBatch, logits, first):
        mask = batch.labels[:, 1:].to(logits.device) != IGNORE
        kl = distill_kl(logits, _ref_logits(self.reference, batch, logits.device), mask, direction="forward")
        value = torch.where(mask, kl, torch.zeros_like(kl)).sum() / max(1, batch.step_tokens or int(mask.sum()))
        return self.weight * value, {"kl_ref": float(value.detach())}


class Distillation(StagePart):
    def __init__(self, previous: torch.nn.Module, weight: float, temperature: float) -> None:
        self.previous, self.weight, self.temperature = previous, weight, temperature

    @classmethod
    def build(cls, cfg: DistillReg, ctx: StageContext) -> Distillation:
        return cls(ctx.reference, cfg.weight, cfg.temperature)

    def penalty(self, model, batch: TokenBatch, logits, first):
        mask = batch.attention_mask[:, 1:].to(logits.device).bool()
        kl = distill_kl(logits, _ref_logits(self.previous, batch, logits.device), mask, "forward", self.temperature)
        value = torch.where(mask, kl, torch.zeros_like(kl)).sum() / max(1, batch.step_positions or int(mask.sum()))
        return self.weight * self.temperature**2 * value, {"distill_kl": float(value.detach())}


def _named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name.replace("base_model.model.", "").replace(".base_layer", ""): p for name, p in model.named_parameters()}


class L2SP(StagePart):
    def __init__(self, reference: torch.nn.Module, weight: float) -> None:
        self.weight = weight
        self.anchor = {n: p.detach().clone() for n, p in _named(reference).items()}

    @classmethod
    def build(cls, cfg: L2SPReg, ctx: StageContext) -> L2SP:
        return cls(ctx.reference, cfg.weight)

    def penalty(self, model, batch, logits, first):
        if not first:
            return logits.new_zeros(()), {}
        total = logits.new_zeros(())
        for name, p in _named(model).items():
            if p.requires_grad and name in self.anchor:
                total = total + (p - self.anchor[name].to(p.device)).pow(2).sum()
        return self.weight * total, {"l2sp": float(total.detach())}


class EWC(StagePart):
    """The penalty toward the earlier stages' anchor, and (``end_stage``) this stage's Fisher added to the sum
    over ``fisher_samples`` of the task's reference pairs (a seeded shuffle) with the anchor moved to the trained
    weights."""

    def __init__(self, state: MethodState, weight: float, fisher_samples: int = 128) -> None:
        self.state, self.weight, self.fisher_samples = state, weight, fisher_samples

    @classmethod
    def build(cls, cfg: EWCReg, ctx: StageContext) -> EWC:
        return cls(ctx.state, cfg.weight, cfg.fisher_samples)

    @classmethod
    def streaming_refusal(cls, cfg: EWCReg, field: str) -> str | None:
        return f"{field} (ewc) needs task boundaries"

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        pairs = reference_pairs(ctx, ctx.task_name, "canonical", ctx.seed)
        random.Random(ctx.seed).shuffle(pairs)
        update_fisher(self.state, model, ctx.tokenizer, pairs, self.fisher_samples, ctx.kind.encode)
        return model

    def penalty(self, model, batch, logits, first):
        if not first or not self.state.fisher:
            return logits.new_zeros(()), {}
        total = logits.new_zeros(())
        for name, p in _named(model).items():
            if p.requires_grad and name in self.state.fisher:
                diff = p - self.state.anchor[name].to(p.device)
                total = total + (self.state.fisher[name].to(p.device) * diff.pow(2)).sum()
        return 0.5 * self.weight * total, {"ewc": float(total.detach())}


def update_fisher(
    state: MethodState, model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], samples: int,
    encode: Encoder = encode_text,
) -> None:
    """Add this stage's diagonal empirical Fisher (mean over examples of (∇ log π(answer|prompt))², one example per
    backward pass) to the running sum, and set the anchor θ* to the current weights. ``encode``: the model kind's."""
    params = {n: p for n, p in _named(model).items() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    used = list(pairs)[:samples]
    for prompt, answer in used:
        batch = collate([encode(tokenizer, prompt, answer)], tokenizer.pad_token_id)
        model.zero_grad(set_to_none=True)
        logits = model(**model_inputs(batch, device)).logits
        targets = batch.labels[:, 1:].to(device)
        mask = targets != IGNORE
        nll = sft_loss(logits[:, :-1], mask, targets=targets, num_items=1)  # summed log-likelihood of the answer
        nll.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().pow(2) / max(1, len(used))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if state.fisher is None:
        state.fisher = fisher
    else:
        state.fisher = {n: state.fisher.get(n, torch.zeros_like(f)) + f for n, f in fisher.items()}
    state.anchor = {n: p.detach().clone() for n, p in params.items()}


# a regulariser config's class -> the part it builds (``.build(cfg, ctx)``); sft_mix is a second objective instead
REGULARIZERS: dict[type, Any] = {KLRefReg: KLToReference, DistillReg: Distillation, L2SPReg: L2SP, EWCReg: EWC}
