"""Every named method as its three parts and the work it comes from: what ``retain methods`` prints."""

from __future__ import annotations

from typing import Any

from retain.methods.config import PRESETS, MethodConfig, method_config

SOURCES: dict[str, str] = {
    "sft": "supervised fine-tuning (TRL SFTTrainer's loss)",
    "grpo": "GRPO, DeepSeekMath arXiv 2402.03300 (Lai arXiv 2507.05386; Retaining arXiv 2510.18874)",
    "self_sft": "Retaining by Doing, arXiv 2510.18874 (self-SFT)",
    "iterative_sft": "Retaining by Doing, arXiv 2510.18874; Huan arXiv 2507.00432 (on-policy SFT)",
    "rl_sample_sft": "RL's Razor, arXiv 2509.04259 (SFT on the RL policy's samples)",
    "sft_likely": "RL's Razor, arXiv 2509.04259 (SFT targets the base finds likely; SPEC §2.4)",
    "sft_unlikely": "RL's Razor, arXiv 2509.04259 (SFT targets the base finds unlikely; SPEC §2.4)",
    "eaft": "Entropy-Adaptive Fine-Tuning, arXiv 2601.02151",
    "conflict_sft": "Entropy-Adaptive Fine-Tuning, arXiv 2601.02151 (confident conflicts masked; SPEC §2.3)",
    "kl_sft": "KL-regularised SFT (SPEC §2)",
    "lwf": "Learning without Forgetting, arXiv 1606.09282",
    "replay": "experience replay; ptx of InstructGPT, arXiv 2203.02155",
    "l2sp": "L2-SP, arXiv 1802.01483",
    "ewc": "Elastic Weight Consolidation, arXiv 1612.00796",
    "lora": "LoRA, arXiv 2106.09685",
    "multitask": "multi-task joint training, the non-continual ceiling (Lai arXiv 2507.05386)",
    "dft": "Dynamic Fine-Tuning, arXiv 2508.05629 (TRL SFTConfig(loss_type='dft'))",
    "sft_varied": "Debunk the Myth of SFT Generalization, arXiv 2510.00237 (varied prompt templates)",
    "psft": "Proximal SFT, arXiv 2508.17784",
    "grpo_positive": "positive-only GRPO (online rejection-sampling fine-tuning; Huan arXiv 2507.00432)",
    "chord": "CHORD, arXiv 2508.11408 (GRPO + SFT in one step, μ scheduled)",
    "opd": "on-policy distillation (Thinking Machines, 2025; tinker-cookbook)",
    "sdft": "Self-Distillation Fine-Tuning, arXiv 2601.19897 (TRL trl.experimental.sdft)",
    "sdft_live": "SDFT with a live teacher, arXiv 2601.19897; Denser ≠ Better arXiv 2607.01763",
}


def _part(model: Any) -> str:
    """A part as ``kind(field=value, ...)`` with the fields that differ from that kind's defaults."""
    fields = model.model_dump()
    kind = fields.pop("kind", None)
    defaults = type(model)().model_dump() if kind else {}
    extra = ", ".join(f"{k}={v}" for k, v in fields.items() if defaults.get(k) != v)
    return f"{kind}({extra})" if extra else str(kind)


def describe(cfg: MethodConfig) -> dict[str, str]:
    """One method's data source, token loss and regularisers (replay and adapter among the last)."""
    regs = [_part(r) for r in cfg.regularizers]
    if cfg.replay is not None:
        regs.append("replay")
    if cfg.adapter is not None:
        regs.append(f"adapter {cfg.adapter.kind}")
    return {"data": _part(cfg.data), "loss": _part(cfg.loss), "regularizer": " + ".join(regs) or "none"}


def method_table() -> list[dict[str, str]]:
    """Every preset, validated from its config: name, its three parts, and its source."""
    return [{"name": name, **describe(method_config(name)), "source": SOURCES.get(name, "")} for name in PRESETS]
