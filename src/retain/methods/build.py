"""Training one stage with one method: the only place that turns a ``MethodConfig`` into running parts.

``train_stage`` freezes a copy of the model as the stage's reference, attaches an adapter if asked, builds the
objective from the config's parts (on-policy → GRPO; otherwise the SFT family with its data source, token
weighting and regularisers), runs the one training loop, then does the method's end-of-stage work: EWC's Fisher,
the replay buffer, merging a per-stage adapter. The runner calls it without knowing which method it is.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase

from retain import tasks as task_registry
from retain.data import encode_answer, encode_prompt
from retain.distributed import make_accelerator, train_device
from retain.methods import adapters
from retain.methods.config import (
    ConflictMaskedLoss, DistillReg, EAFTLoss, EWCReg, KLRefReg, L2SPReg, MethodConfig, OnPolicyData, method_config,
)
from retain.methods.grpo import GRPOObjective
from retain.methods.regularizers import EWC, L2SP, Distillation, KLToReference, update_fisher
from retain.methods.sft import SFTObjective, conflict_masking, eaft_weighting, nll_weighting
from retain.methods.sources import PairSource, build_source, reference_pairs
from retain.methods.stage import MethodState, StageContext
from retain.train import Trainer


def _train_device(device: str = "auto") -> torch.device:
    return train_device(device)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(adapters.merged_copy(model))
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


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


def build_objective(cfg: MethodConfig, ctx: StageContext):
    if isinstance(cfg.data, OnPolicyData):
        return GRPOObjective(cfg, ctx)
    loss = cfg.loss
    if isinstance(loss, EAFTLoss):
        weighting = eaft_weighting(loss.k, loss.alpha)
    elif isinstance(loss, ConflictMaskedLoss):
        weighting = conflict_masking(loss.entropy_max, loss.prob_max)
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
    return SFTObjective(
        _token_sampler(source, ctx.tokenizer), ctx.tokenizer.pad_token_id, cfg.batch_size, cfg.micro_batch_size,
        seed=ctx.seed, weighting=weighting, regularizers=regs, micro_batch_tokens=cfg.micro_batch_tokens,
    )


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
    model.to(_train_device(device))  # before the frozen copy, so the reference sits where the policy computes
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
