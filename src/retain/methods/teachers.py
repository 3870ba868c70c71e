"""Distillation on the student's own samples: on-policy distillation (a fixed or moving teacher on the same prompt)
and SDFT (the model itself, shown the demonstration, teaching itself on the bare prompt).

The objective reuses GRPO's rollouts — ``group_size`` samples of each of ``prompts_per_step`` train prompts from the
current policy, every ``updates_per_batch`` steps — and replaces the policy gradient with the exact per-token KL
between student and teacher over the vocabulary (:func:`retain.losses.distill_kl`), both at the sampling
temperature, summed over completion tokens and divided by the rollout batch's completion-token count. Rewards are
computed and logged (accuracy, reward) but do not enter the loss.

Teachers (``TeacherKLLoss.teacher``): ``start`` the stage's frozen starting model (TRL SDFT's ``base``); ``live`` the
model being trained, under no gradient; ``ema`` a copy of the stage's starting model moved towards the live weights
every ``refresh_every`` steps (:func:`ema_update`, TRL's ``teacher_update_rate``); any other name is loaded with
:func:`retain.models.loading.load_model` (``base``: the embedded base model — a "recover" stage's teacher).
Resuming a run mid-stage restarts an EMA teacher from the stage's start (its weights are not checkpointed).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from retain.data import encode_prompt
from retain.errors import RetainError
from retain.losses import aggregate, distill_kl
from retain.methods.config import GRPOLoss, MethodConfig, TeacherKLLoss
from retain.methods.grpo import GRPOObjective, RolloutBatch
from retain.methods.stage import StageContext


def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """θ_T ← (1 − rate)·θ_T + rate·θ_S, in place, parameter by parameter matched by name (``rate`` 1 copies the
    student). Both must hold the same parameters: a mismatch is an error, never a silent partial update."""
    mine = dict(teacher.named_parameters())
    theirs = dict(student.named_parameters())
    if set(mine) != set(theirs):
        raise RetainError(f"ema teacher: parameters differ from the student's ({sorted(set(mine) ^ set(theirs))[:3]})")
    with torch.no_grad():
        for name, t in mine.items():
            t.mul_(1.0 - rate).add_(theirs[name].detach().to(t.device, t.dtype), alpha=rate)


def fill_template(template: str, prompt: str, demonstration: str) -> str:
    """The teacher's prompt: ``template`` with ``{prompt}`` and ``{demonstration}`` replaced (no other formatting, so
    braces inside a prompt or an answer are kept as they are)."""
    return template.replace("{prompt}", prompt).replace("{demonstration}", demonstration)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TeacherKLObjective(GRPOObjective):
    def __init__(self, cfg: MethodConfig, ctx: StageContext,
                 load_model: Callable[[str], torch.nn.Module]) -> None:
        assert isinstance(cfg.loss, TeacherKLLoss)
        super().__init__(cfg, ctx, grpo=GRPOLoss())  # rollouts only: no reference log-probs, advantages logged
        self.kl = cfg.loss
        device = next(ctx.model.parameters()).device
        if self.kl.teacher == "start":
            self.teacher: torch.nn.Module | None = ctx.reference
        elif self.kl.teacher == "ema":
            self.teacher = _frozen(copy.deepcopy(ctx.reference))
        elif self.kl.teacher == "live":
            self.teacher = None  # the model being trained
        else:
            self.teacher = _frozen(load_model(self.kl.teacher).to(device))
        self.synced_at = 0
        self.teacher_prompts: dict[tuple[int, ...], list[int]] = {}
        if self.kl.context == "demonstration":
            for e in ctx.task.examples("train", None, seed=0):
                self.teacher_prompts[tuple(encode_prompt(ctx.tokenizer, e.prompt))] = encode_prompt(
                    ctx.tokenizer, fill_template(self.kl.template, e.prompt, e.answer))

    def refresh_teacher(self, step: int) -> None:
        """An EMA teacher takes its step towards the live weights at steps refresh_every, 2·refresh_every, …"""
        if self.kl.teacher == "ema" and step > self.synced_at and step % self.kl.refresh_every == 0:
            ema_update(self.teacher, self.ctx.model, self.kl.ema_rate)
            self.synced_at = step

    def batches(self, step: int) -> list[RolloutBatch]:
        self.refresh_teacher(step)
        return super().batches(step)

    def _teacher_logits(self, teacher: torch.nn.Module, batch: RolloutBatch, device, shape) -> torch.Tensor:
        """Teacher logits aligned with the student's ``logits[:, :-1]``: entry (i, t) predicts the same completion
        token for both, whatever prompt the teacher read."""
        if not self.teacher_prompts:
            ids, att = batch.input_ids.to(device), batch.attention_mask.to(device)
            return teacher(input_ids=ids, attention_mask=att).logits[:, :-1]
        rows = []
        for p, c in zip(batch.prompt_ids, batch.completion_ids):
            shown = self.teacher_prompts.get(tuple(p))
            if shown is None:
                raise RetainError(f"{self.ctx.task_name!r}: a sampled prompt has no demonstration in the train split")
            rows.append((p, shown, c))
        width = max(len(s) + len(c) for _, s, c in rows)
        pad = self.ctx.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (_, s, c) in enumerate(rows):
            ids[i, : len(s) + len(c)] = torch.tensor(s + c)
            att[i, : len(s) + len(c)] = 1
        logits = teacher(input_ids=ids.to(device), attention_mask=att.to(device)).logits
        out = logits.new_zeros(shape)
        for i, (p, s, c) in enumerate(rows):
            out[i, len(p) - 1 : len(p) - 1 + len(c)] = logits[i, len(s) - 1 : len(s) - 1 + len(c)]
        return out

    def loss(self, model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        ids, att = batch.input_ids.to(device), batch.attention_mask.to(device)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        mask = batch.completion_mask.to(device)
        with torch.no_grad():
            teacher = self.teacher if self.teacher is not None else model
            t_logits = self._teacher_logits(teacher, batch, device, logits.shape)
        kl = distill_kl(logits, t_logits, mask, self.kl.direction, self.data.temperature)
        loss = aggregate(kl, mask, "dapo", num_items=batch.total_tokens)
        token_mean = float(kl.detach()[mask].mean()) if mask.any() else 0.0
        return loss, {**batch.metrics, "teacher_kl": token_mean}
