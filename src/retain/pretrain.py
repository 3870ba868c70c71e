"""``retain pretrain``: train the embedded base model from scratch on a mixture of prior skills.

The mixture is mostly prior skills (fact recall, string reversal, the single-digit table) plus a small share of
each sequence task's ``pretrain`` split — a part of the task space disjoint from the ``train`` and ``test``
splits — so the base model can partly solve the new tasks and on-policy RL has signal, yet has headroom.
Deterministic for a seed on a given machine and thread count. Output: a HF model directory (safetensors,
tokenizer with chat template, config, published atomically with its manifest) with ``eval.json`` (per-task
accuracy) and ``pretrain.json`` (the config, wall time, peak memory).
"""

from __future__ import annotations

import random
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from retain import tasks as task_registry
from retain.data import encode_answer, encode_prompt
from retain.methods.sft import Pair, SFTObjective
from retain.models.tiny import PRESETS, make_model
from retain.models.tokenizer import build_tokenizer
from retain.rundir import save_model_dir
from retain.train import TrainConfig, Trainer, seed_everything

DEFAULT_MIXTURE = {"facts": 0.32, "reverse": 0.17, "arith": 0.17, "gpoints": 0.16, "kg": 0.10, "countdown": 0.08}


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = "tiny"
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    seed: int = 0
    mixture: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MIXTURE))
    eval_n: int = Field(256, ge=1, description="prompts per task in the final evaluation")
    eval_samples: int = Field(16, ge=0, description="K for pass@K in the final evaluation (0: greedy only)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r} (presets: {', '.join(PRESETS)})")
        return v

    @field_validator("mixture")
    @classmethod
    def _known_tasks(cls, v: dict[str, float]) -> dict[str, float]:
        return check_mixture(v, pictures=False)


def check_mixture(mixture: dict[str, float], pictures: bool) -> dict[str, float]:
    """A pretraining mixture's task weights: known tasks, weights ≥ 0 and not all 0; visual tasks only when
    ``pictures`` (``retain pretrain --vision``). ``ValueError`` naming the task otherwise."""
    for name, w in mixture.items():
        if name not in task_registry.names():
            raise ValueError(f"unknown task {name!r} in mixture")
        if not pictures and getattr(task_registry.get(name), "modality", "text") != "text":
            raise ValueError(f"task {name!r} shows pictures: pretrain it with `retain pretrain --vision`")
        if w < 0:
            raise ValueError(f"negative weight {w} for {name!r}")
    if sum(mixture.values()) <= 0:
        raise ValueError("mixture weights sum to zero")
    return mixture


def pretrain_split(task_name: str) -> str:
    return "pretrain" if "pretrain" in task_registry.get(task_name).splits else "train"


def mixture_sampler(tokenizer, mixture: dict[str, float]) -> Callable[[random.Random, int, int], list[Pair]]:
    """Encode every task's pretraining pool once; each call draws tasks by weight, then an example uniformly, then
    one of the example's correct answers uniformly (several answers teach the space of solutions, not one string)."""
    names = [n for n, w in mixture.items() if w > 0]
    weights = [mixture[n] for n in names]
    pools: dict[str, list[list[Pair]]] = {}
    for name in names:
        examples = task_registry.get(name).examples(pretrain_split(name), None, seed=0)
        pools[name] = [
            [(encode_prompt(tokenizer, e.prompt), encode_answer(tokenizer, a)) for a in e.answers] for e in examples
        ]

    def sample(rng: random.Random, k: int, step: int = 0) -> list[Pair]:
        return [rng.choice(rng.choice(pools[name])) for name in rng.choices(names, weights, k=k)]

    return sample


def pretrain(
    cfg: PretrainConfig, out: str | Path, log: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train a base model per ``cfg`` and write it to ``out`` (atomically: built in a temp dir, then renamed)."""
    from retain.evaluate import evaluate

    out = Path(out)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    tok = build_tokenizer()
    model = make_model(cfg.preset, tok)
    objective = SFTObjective(mixture_sampler(tok, cfg.mixture), tok.pad_token_id, cfg.batch_size, seed=cfg.seed)
    train_cfg = TrainConfig(
        steps=cfg.steps, lr=cfg.lr, schedule="cosine", warmup_steps=cfg.warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed, log_every=max(1, cfg.steps // 50), max_grad_norm=1.0,
    )
    model = Trainer(model, objective, train_cfg, log=log).run()
    train_seconds = time.perf_counter() - started
    model.eval()
    scores = evaluate(model, tok, list(cfg.mixture), n=cfg.eval_n, samples=cfg.eval_samples, seed=cfg.seed)
    summary = {
        "config": cfg.model_dump(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    save_model_dir(model, tok, out, extra={"eval.json": scores, "pretrain.json": summary})
    return {"eval": scores, **summary}
