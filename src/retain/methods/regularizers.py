"""What pulls the weights back toward earlier skills, as penalties added to a method's loss.

- ``KLToReference`` (KL-regularised SFT): β·Σ_t KL(π_ref(·|x,y<t) ‖ π(·|x,y<t)) / N over answer tokens, exact over
  the vocabulary; π_ref = the stage's starting model.
- ``Distillation`` (LwF): λ·T²·Σ_t KL(π_prev^T ‖ π^T) / P over every attended position (prompt and answer),
  temperature T; π_prev = the previous stage's model (= the stage's starting model).
- ``L2SP``: λ·Σ(θ − θ_ref)² over the parameters present in the reference, once per step.
- ``EWC``: λ/2·Σ F·(θ − θ*)², F the diagonal empirical Fisher accumulated over earlier stages, θ* the weights
  at the end of the last stage; ``update_fisher`` runs at the end of each stage.
N and P are the step's answer-token and position counts, so micro-batches add up to the full batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from retain.data import IGNORE, TokenBatch, collate, encode_answer, encode_prompt, model_inputs
from retain.losses import distill_kl, sft_loss
from retain.methods.stage import MethodState


def _ref_logits(reference: torch.nn.Module, batch: TokenBatch, device) -> torch.Tensor:
    with torch.no_grad():
        return reference(**model_inputs(batch, device)).logits[:, :-1]


class KLToReference:
    def __init__(self, reference: torch.nn.Module, weight: float) -> None:
        self.reference, self.weight = reference, weight

    def penalty(self, model, batch: TokenBatch, logits, first):
        mask = batch.labels[:, 1:].to(logits.device) != IGNORE
        kl = distill_kl(logits, _ref_logits(self.reference, batch, logits.device), mask, direction="forward")
        value = torch.where(mask, kl, torch.zeros_like(kl)).sum() / max(1, batch.step_tokens or int(mask.sum()))
        return self.weight * value, {"kl_ref": float(value.detach())}


class Distillation:
    def __init__(self, previous: torch.nn.Module, weight: float, temperature: float) -> None:
        self.previous, self.weight, self.temperature = previous, weight, temperature

    def penalty(self, model, batch: TokenBatch, logits, first):
        mask = batch.attention_mask[:, 1:].to(logits.device).bool()
        kl = distill_kl(logits, _ref_logits(self.previous, batch, logits.device), mask, "forward", self.temperature)
        value = torch.where(mask, kl, torch.zeros_like(kl)).sum() / max(1, batch.step_positions or int(mask.sum()))
        return self.weight * self.temperature**2 * value, {"distill_kl": float(value.detach())}


def _named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name.replace("base_model.model.", "").replace(".base_layer", ""): p for name, p in model.named_parameters()}


class L2SP:
    def __init__(self, reference: torch.nn.Module, weight: float) -> None:
        self.weight = weight
        self.anchor = {n: p.detach().clone() for n, p in _named(reference).items()}

    def penalty(self, model, batch, logits, first):
        if not first:
            return logits.new_zeros(()), {}
        total = logits.new_zeros(())
        for name, p in _named(model).items():
            if p.requires_grad and name in self.anchor:
                total = total + (p - self.anchor[name].to(p.device)).pow(2).sum()
        return self.weight * total, {"l2sp": float(total.detach())}


class EWC:
    def __init__(self, state: MethodState, weight: float) -> None:
        self.state, self.weight = state, weight

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
    state: MethodState, model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], samples: int
) -> None:
    """Add this stage's diagonal empirical Fisher (mean over examples of (∇ log π(answer|prompt))², one example per
    backward pass) to the running sum, and set the anchor θ* to the current weights."""
    params = {n: p for n, p in _named(model).items() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    used = list(pairs)[:samples]
    for prompt, answer in used:
        batch = collate([(encode_prompt(tokenizer, prompt), encode_answer(tokenizer, answer))], tokenizer.pad_token_id)
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
