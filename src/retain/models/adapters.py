"""LoRA adapters through peft: a fresh adapter per stage (merged into the weights when the stage ends) or one
adapter shared by every stage (kept unmerged between stages; ``merged_copy`` gives plain weights for saving), and
``frozen_copy``, the plain-weight reference copy every part that compares against a fixed model uses.

The settings are any object with the fields of ``retain.methods.config.AdapterConfig`` (:class:`LoraSettings`):
models/ is below methods/ in the house, so it names no method type."""

from __future__ import annotations

import copy
from typing import Protocol

import torch


class LoraSettings(Protocol):
    r: int
    alpha: float
    dropout: float
    target_modules: list[str] | str  # names, or one regex of the full module name (peft)
    per_stage: bool


def is_adapted(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def attach(model: torch.nn.Module, cfg: LoraSettings) -> torch.nn.Module:
    """Wrap ``model`` with a LoRA adapter (only the adapter trains), unless a shared one is already attached."""
    from peft import LoraConfig, get_peft_model

    if is_adapted(model):
        return model
    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def finish_stage(model: torch.nn.Module, cfg: LoraSettings) -> torch.nn.Module:
    """Per-stage adapters are merged into the base weights; a shared adapter stays attached."""
    if cfg.per_stage and is_adapted(model):
        merged = model.merge_and_unload()
        for p in merged.parameters():  # peft froze the base weights; a later stage may train them all
            p.requires_grad_(True)
        return merged
    return model


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Plain weights (adapter merged) without touching ``model``: what stage checkpoints save."""
    if not is_adapted(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A detached copy with plain weights (any adapter merged), in eval mode and without gradients: a reference."""
    ref = copy.deepcopy(merged_copy(model))
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
