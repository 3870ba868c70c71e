"""Training one stage with one method: the only place that turns a ``MethodConfig`` into running parts.

``train_stage`` freezes a copy of the model as the stage's reference, attaches an adapter if asked, builds the
objective from the config's parts (on-policy → GRPO, GRPO + SFT on demonstrations, or distillation to a teacher;
otherwise the SFT family with its data source, token weighting or proximal clip, and regularisers), runs the one
training loop, then does the method's end-of-stage work: EWC's Fisher, the replay buffer, merging a per-stage adapter. The runner calls it without knowing which method it is.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase

from retain import tasks as task_registry
from retain.data import encode_answer, encode_prompt
from retain.distributed import make_accelerator, train_device
from retain.losses import linear_weight
from retain.models import adapters
from retain.models.adapters import frozen_copy
from retain.methods.config import (
    ConflictMaskedLoss, DFTLoss, DistillReg, EAFTLoss, EWCReg, KLRefReg, L2SPReg, MethodConfig, OnPolicyData,
    PSFTLoss, SFTMixReg, TeacherKLLoss, method_config,
)
from retain.methods.grpo import GRPOObjective
from retain.methods.mix import WeightedSum
from retain.methods.psft import ProximalSFTObjective
from retain.methods.regularizers import EWC, L2SP, Distillation, KLToReference, update_fisher
from retain.methods.sft import SFTObjective, conflict_masking, dft_weighting, eaft_weighting, nll_weighting
from retain.methods.sources import FixedPairs, PairSource, build_source, reference_pairs
from retain.methods.teachers import TeacherKLObjective
from retain.methods.stage import MethodState, StageContext
from retain.train import Trainer


def _load_source_model(path: str) -> torch.nn.Module:
    from retain.models.loading import load_model

    return load_model(path)[0]


def _token_sampler(source: PairSource, tokenizer: PreTrainedTokenizerBase):
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def encode(pair: tuple[str, str]):
        if pair not in cache:
            cache[pair] = (encode_prompt(tokenizer, pair[0]), encode_answer(tokenizer, pair[1]))
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
    sft = SFTObjective(_token_sampler(demos, ctx.tokenizer), ctx.tokenizer.pad_token_id, mix.batch_size,
                       cfg.micro_batch_size, seed=ctx.seed)
    steps = cfg.train.steps
    mu = lambda step: linear_weight(step, steps, mix.weight, mix.weight_end)  # noqa: E731
    return WeightedSum([("", grpo, lambda step: 1.0 - mu(step)), ("sft", sft, mu)])


def build_objective(cfg: MethodConfig, ctx: StageContext):
    if isinstance(cfg.data, OnPolicyData):
        return on_policy_objective(cfg, ctx)
    loss = cfg.loss
    if isinstance(loss, EAFTLoss):
        weighting = eaft_weighting(loss.k, loss.alpha)
    elif isinstance(loss, ConflictMaskedLoss):
        weighting = conflict_masking(loss.entropy_max, loss.prob_max)
    elif isinstance(loss, DFTLoss):
        weighting = dft_weighting
    else:
        weighting = nll_weighting
    regs = []
    for reg in cfg.regularizers:
        if isinstance(reg, KLRefReg):
            regs.append(KLToReference(ctx.reference, reg.weight))
        elif isinstance(reg, DistillReg):
            regs.append(Distillation(ctx.reference, reg.weight, reg.temperature))
        elif isinstance(reg, L2SPReg):
            regs.append(L2SP(ctx.reference, reg.weight))
        elif isinstance(reg, EWCReg):
            regs.append(EWC(ctx.state, reg.weight))
    source = build_source(cfg, ctx, _load_source_model)
    sft = SFTObjective(
        _token_sampler(source, ctx.tokenizer), ctx.tokenizer.pad_token_id, cfg.batch_size, cfg.micro_batch_size,
        seed=ctx.seed, weighting=weighting, regularizers=regs, micro_batch_tokens=cfg.micro_batch_tokens,
    )
    if isinstance(loss, PSFTLoss):
        return ProximalSFTObjective(sft, ctx.model, loss.eps, loss.updates_per_batch)
    return sft


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
    engine: str = "cached",
    checkpoint_dir: str | Path | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    device: str = "auto",
    mixed_precision: str = "no",
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """Train ``model`` on ``task_name`` with ``method``; returns the trained model (adapter merged if per-stage).
    ``device`` (auto / cpu / cuda) and ``mixed_precision`` (no / bf16 / fp16) are the experiment config's;
    ``on_step(step, model)`` runs after every optimizer step (the runner's in-stage checkpoint evaluations)."""
    cfg = method_config(method)
    state = state if state is not None else MethodState()
    model.to(train_device(device))  # before the frozen copy, so the reference sits where the policy computes
    reference = frozen_copy(model)
    if cfg.adapter is not None:
        model = adapters.attach(model, cfg.adapter)
    ctx = StageContext(
        model=model, reference=reference, tokenizer=tokenizer, task_name=task_name, task=task_registry.get(task_name),
        stage_index=stage_index, seen_tasks=list(seen_tasks or []), seed=seed, state=state, engine=engine, log=log,
    )
    objective = build_objective(cfg, ctx)
    train_cfg = cfg.train.model_copy(update={"seed": seed})
    accelerator = make_accelerator(device, mixed_precision)
    model = Trainer(model, objective, train_cfg, checkpoint_dir=checkpoint_dir, log=log, accelerator=accelerator,
                    on_step=on_step).run()
    for reg in cfg.regularizers:
        if isinstance(reg, EWCReg):
            pairs = reference_pairs(ctx, task_name, "canonical", seed)
            random.Random(seed).shuffle(pairs)
            update_fisher(state, model, tokenizer, pairs, reg.fisher_samples)
    if cfg.replay is not None:
        pairs = reference_pairs(ctx, task_name, "canonical", seed)
        state.replay[task_name] = random.Random(seed).sample(pairs, min(cfg.replay.size, len(pairs)))
    if cfg.adapter is not None:
        model = adapters.finish_stage(model, cfg.adapter)
    model.eval()
    return model
