"""Training one stage with one method: the only place that turns a ``MethodConfig`` into running parts.

``train_stage`` is build → train → each part's end of stage. It freezes a copy of the model as the stage's
reference, attaches the adapter part if the method has one, builds the objective from the config's parts
(on-policy → GRPO, GRPO + SFT on demonstrations, or distillation to a teacher; otherwise the SFT family with its
data source, token weighting or proximal clip, and regularisers), runs the one training loop, then hands the trained
model to each part's ``end_stage`` (``retain.methods.parts``: EWC adds its Fisher, replay fills its buffer, a
per-stage adapter is merged) — in the order regularisers, data source, adapter. The runner calls it without knowing
which method it is; streaming mode asks the same parts what it cannot run (``streaming_refusals``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase

from retain import tasks as task_registry
from retain.data import TokenPair
from retain.distributed import make_accelerator, train_device
from retain.kind import TEXT
from retain.losses import linear_weight
from retain.models.adapters import frozen_copy
from retain.methods.config import (
    ConflictMaskedLoss, DFTLoss, EAFTLoss, MethodConfig, OnPolicyData, PSFTLoss, SFTMixReg, TeacherKLLoss,
    method_config,
)
from retain.methods.grpo import GRPOObjective
from retain.methods.mix import WeightedSum
from retain.methods.parts import StageAdapter, StagePart
from retain.methods.psft import ProximalSFTObjective
from retain.methods.regularizers import REGULARIZERS
from retain.methods.sft import SFTObjective, conflict_masking, dft_weighting, eaft_weighting, nll_weighting
from retain.methods.sources import FixedPairs, PairSource, WithReplay, build_source, reference_pairs
from retain.methods.teachers import TeacherKLObjective
from retain.methods.stage import MethodState, StageContext
from retain.rollout import EngineChoice
from retain.train import Objective, Trainer


def _load_source_model(path: str) -> torch.nn.Module:
    from retain.models.loading import load_model

    return load_model(path)[0]


def _token_sampler(source: PairSource, ctx: StageContext):
    """Token items of the source's pairs, encoded by the model's kind (a picture prompt's item has its pixels)."""
    cache: dict[tuple[str, str], TokenPair] = {}

    def encode(pair: tuple[str, str]):
        if pair not in cache:
            cache[pair] = ctx.kind.encode(ctx.tokenizer, pair[0], pair[1])
        return cache[pair]

    def sample(rng: random.Random, k: int, step: int):
        return [encode(p) for p in source.sample(rng, k, step)]

    return sample


def on_policy_objective(cfg: MethodConfig, ctx: StageContext):
    """GRPO, distillation to a teacher on the student's samples, or GRPO plus SFT on demonstrations (CHORD)."""
    if isinstance(cfg.loss, TeacherKLLoss):
        return TeacherKLObjective(cfg, ctx, _load_source_model)
    grpo = GRPOObjective(cfg, ctx)
    mix = next((r for r in cfg.regularizers if isinstance(r, SFTMixReg)), None)
    if mix is None:
        return grpo
    demos = FixedPairs(reference_pairs(ctx, ctx.task_name, "canonical", ctx.seed), f"{cfg.name} on {ctx.task_name!r}")
    sft = SFTObjective(_token_sampler(demos, ctx), ctx.tokenizer.pad_token_id, mix.batch_size,
                       cfg.micro_batch_size, seed=ctx.seed)
    steps = cfg.train.steps
    mu = lambda step: linear_weight(step, steps, mix.weight, mix.weight_end)  # noqa: E731
    return WeightedSum([("", grpo, lambda step: 1.0 - mu(step)), ("sft", sft, mu)])


@dataclass
class BuiltStage:
    """A stage's objective and its parts, in the order their ``end_stage`` runs."""

    objective: Objective
    parts: list[StagePart] = field(default_factory=list)

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        for part in self.parts:
            model = part.end_stage(model, ctx)
        return model


def build_stage(cfg: MethodConfig, ctx: StageContext) -> BuiltStage:
    if isinstance(cfg.data, OnPolicyData):
        return BuiltStage(on_policy_objective(cfg, ctx))
    loss = cfg.loss
    if isinstance(loss, EAFTLoss):
        weighting = eaft_weighting(loss.k, loss.alpha)
    elif isinstance(loss, ConflictMaskedLoss):
        weighting = conflict_masking(loss.entropy_max, loss.prob_max)
    elif isinstance(loss, DFTLoss):
        weighting = dft_weighting
    else:
        weighting = nll_weighting
    regs = [REGULARIZERS[type(reg)].build(reg, ctx) for reg in cfg.regularizers]
    source = build_source(cfg, ctx, _load_source_model)
    sft = SFTObjective(
        _token_sampler(source, ctx), ctx.tokenizer.pad_token_id, cfg.batch_size, cfg.micro_batch_size,
        seed=ctx.seed, weighting=weighting, regularizers=regs, micro_batch_tokens=cfg.micro_batch_tokens,
    )
    objective = ProximalSFTObjective(sft, ctx.model, loss.eps, loss.updates_per_batch) if isinstance(loss, PSFTLoss) \
        else sft
    return BuiltStage(objective, [*regs, *([source] if isinstance(source, StagePart) else [])])


def build_objective(cfg: MethodConfig, ctx: StageContext) -> Objective:
    """The stage's objective alone (streaming mode, which refuses every part with an end of stage, and benchmarks)."""
    return build_stage(cfg, ctx).objective


def streaming_refusals(cfg: MethodConfig, where: str) -> list[str]:
    """What each part of ``cfg`` (at config path ``where``) says a boundary-free stream cannot run."""
    said = [WithReplay.streaming_refusal(cfg.replay, f"{where}.replay")] if cfg.replay is not None else []
    said += [REGULARIZERS[type(reg)].streaming_refusal(reg, f"{where}.regularizers[{j}]")
             for j, reg in enumerate(cfg.regularizers) if type(reg) in REGULARIZERS]
    if cfg.adapter is not None:
        said.append(StageAdapter.streaming_refusal(cfg.adapter, f"{where}.adapter"))
    return [s for s in said if s]


def train_stage(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task_name: str,
    method: MethodConfig | dict[str, Any] | str,
    *,
    stage_index: int = 0,
    seen_tasks: list[str] | None = None,
    state: MethodState | None = None,
    seed: int = 0,
    engine: EngineChoice = "kv_cache",
    checkpoint_dir: str | Path | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    device: str = "auto",
    mixed_precision: str = "no",
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    kind: Any = TEXT,
) -> torch.nn.Module:
    """Train ``model`` on ``task_name`` with ``method``; returns the trained model (adapter merged if per-stage).
    ``device`` (auto / cpu / cuda) and ``mixed_precision`` (no / bf16 / fp16) are the experiment config's;
    ``on_step(step, model)`` runs after every optimizer step (the runner's in-stage checkpoint evaluations);
    ``kind``: the model's kind (``retain.kind``; a VLM's takes the pictures), with ``engine`` its engine choice."""
    cfg = method_config(method)
    state = state if state is not None else MethodState()
    model.to(train_device(device))  # before the frozen copy, so the reference sits where the policy computes
    reference = frozen_copy(model)
    adapter = StageAdapter(cfg.adapter) if cfg.adapter is not None else None
    if adapter is not None:
        model = adapter.attach(model)
    ctx = StageContext(
        model=model, reference=reference, tokenizer=tokenizer, task_name=task_name, task=task_registry.get(task_name),
        stage_index=stage_index, seen_tasks=list(seen_tasks or []), seed=seed, state=state, engine=engine, log=log,
        kind=kind,
    )
    stage = build_stage(cfg, ctx)
    if adapter is not None:
        stage.parts.append(adapter)  # last: the other parts' end of stage sees the adapted model
    train_cfg = cfg.train.model_copy(update={"seed": seed})
    accelerator = make_accelerator(device, mixed_precision, getattr(kind, "unused_parameters", False))
    model = Trainer(model, stage.objective, train_cfg, checkpoint_dir=checkpoint_dir, log=log, accelerator=accelerator,
                    on_step=on_step).run()
    model = stage.end_stage(model, ctx)
    model.eval()
    return model
