"""Distillation on the student's own samples: on-policy distillation (a fixed or moving teacher on the same prompt)
and SDFT (the model itself, shown the demonstration, teaching itself on the bare prompt).

The objective reuses GRPO's rollouts — ``group_size`` samples of each of ``prompts_per_step`` train prompts from the
current policy, every ``updates_per_batch`` steps — and replaces the policy gradient with the exact per-token KL
between student and teacher over the vocabulary (:func:`retain.losses.distill_kl`), both at the sampling
temperature, summed over completion tokens and divided by the rollout batch's completion-token count. Rewards are
computed and logged (accuracy, reward) but do not enter the loss. Student and teacher each run packed as GRPO's
log-probs do (each prompt once for its group, no padding to the longest completion), and only the logits that
predict completion tokens enter the KL: every row of a distillation batch trains (GRPO drops its zero-advantage
rows), so its forwards cost the whole batch.

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
from retain.methods.grpo import GRPOObjective, RolloutBatch, packable, packed_logits
from retain.methods.stage import StageContext
from retain.models.fused import fuse


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
        if cfg.train.fused and self.teacher is not None:
            # the Trainer fuses the student (retain.models.fused); the teacher takes the same path: in float32 its
            # outputs are bit-identical to HF's, without HF's copies of the grouped keys and values under a mask.
            # In place, also on the stage's reference (``start``): it changes module classes, no weight, no output
            fuse(self.teacher)
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

    def teacher_prompt_ids(self, batch: RolloutBatch) -> list[list[int]]:
        """What the teacher reads before each row's completion: the row's own prompt, or (context demonstration) its
        prompt filled into the template with the prompt's reference answer."""
        if not self.teacher_prompts:
            return batch.prompt_ids
        shown = [self.teacher_prompts.get(tuple(p)) for p in batch.prompt_ids]
        if any(s is None for s in shown):
            raise RetainError(f"{self.ctx.task_name!r}: a sampled prompt has no demonstration in the train split")
        return shown

    def loss(self, model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        logits = completion_logits(model, batch.prompt_ids, batch.completion_ids, device)
        with torch.no_grad():
            teacher = self.teacher if self.teacher is not None else model
            t_logits = completion_logits(teacher, self.teacher_prompt_ids(batch), batch.completion_ids, device)
        kl = distill_kl(logits, t_logits, None, self.kl.direction, self.data.temperature)
        loss = aggregate(kl, None, "dapo", num_items=batch.total_tokens)
        token_mean = float(kl.detach().mean()) if len(kl) else 0.0
        return loss, {**batch.metrics, "teacher_kl": token_mean}


def completion_logits(model: torch.nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                      device) -> torch.Tensor:
    """``[N, V]``: the logits of ``model`` that predict each completion token after its row's prompt, row by row
    (N = Σ len(c_i)), so the student's and the teacher's line up token for token whatever prompt each read. Only
    these positions are kept: the KL is summed over completion tokens alone. Packed (each prompt once for its group,
    :func:`retain.methods.grpo.packed_logits`) where the model takes a 4-D mask; else one right-padded row each."""
    if packable(model):
        return packed_logits(model, prompt_ids, completion_ids, device)[0]
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    ids = torch.zeros((len(prompt_ids), width), dtype=torch.long)  # the padding is masked out and never read
    att = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        att[i, : len(p) + len(c)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
    rows = [i for i, c in enumerate(completion_ids) for _ in c]
    cols = [t for p, c in zip(prompt_ids, completion_ids) for t in range(len(p) - 1, len(p) - 1 + len(c))]
    as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return logits[as_index(rows), as_index(cols)]
