"""``retain pretrain``: train the embedded base model from scratch on a mixture of prior skills, or continue a
model's pretraining on another mixture (``init``: a second phase).

The mixture is mostly prior skills (fact recall, string reversal, the single-digit table) plus a small share of
each sequence task's ``pretrain`` split — a part of the task space disjoint from the ``train`` and ``test``
splits — so the base model can partly solve the new tasks and on-policy RL has signal, yet has headroom.
Deterministic for a seed on a given machine and thread count. The embedded base is two phases (``make base``):
2000 steps from scratch on :data:`DEFAULT_MIXTURE`, then :data:`SORT_PHASE`, a short continuation (320 steps, cosine
from 1e-3) that adds a little of the sort task's ``pretrain`` split, so the base solves part of a task whose rule
every method can learn (see ``retain.tasks.sort``). The phase's length came from pilots: a constant-lr probe
(``scripts/calibrate_sort_phase.py``: sort 0% → 33% greedy over 250 steps), then 180 steps (sort 23% greedy but 7%
per sample: GRPO's groups had almost no correct sample and it did not learn) and 320 steps (60% greedy, 38% per
sample, pass@16 83%; shipped). Output: a HF model directory (safetensors,
tokenizer with chat template, config, published atomically with its manifest) with ``eval.json`` (per-task
accuracy) and ``pretrain.json`` (the config, wall time, peak memory).
"""

from __future__ import annotations

import json
import random
import resource
import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from retain import tasks as task_registry
from retain.data import TokenPair, encode_answer, encode_prompt
from retain.methods.sft import SFTObjective
from retain.models.loading import load_model, resolve_model_path
from retain.models.tiny import SHAPES, make_model
from retain.models.tokenizer import build_tokenizer
from retain.rundir import save_model_dir
from retain.train import TrainConfig, Trainer, seed_everything

DEFAULT_MIXTURE = {"facts": 0.32, "reverse": 0.17, "arith": 0.17, "gpoints": 0.16, "kg": 0.10, "countdown": 0.08}
# the second phase: the first phase's mixture, scaled down, plus the sort task's pretrain split
SORT_MIXTURE = {**{k: round(w * 0.85, 4) for k, w in DEFAULT_MIXTURE.items()}, "sort": 0.15}
# named pretraining phases (``retain pretrain --phase``): the fields each sets on PretrainConfig's defaults
SORT_PHASE: dict[str, Any] = {"steps": 320, "lr": 1e-3, "schedule": "cosine", "min_lr_ratio": 0.1, "warmup_steps": 20,
                              "mixture": SORT_MIXTURE}
PHASES: dict[str, dict[str, Any]] = {"scratch": {}, "sort": SORT_PHASE}


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = "tiny"
    init: str | None = Field(None, description="a model directory to continue pretraining (None: from scratch)")
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    seed: int = 0
    mixture: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MIXTURE))
    eval_n: int = Field(256, ge=1, description="prompts per task in the final evaluation")
    eval_samples: int = Field(16, ge=0, description="K for pass@K in the final evaluation (0: greedy only)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in SHAPES:
            raise ValueError(f"unknown preset {v!r} (presets: {', '.join(SHAPES)})")
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


def mixture_sampler(tokenizer, mixture: dict[str, float]) -> Callable[[random.Random, int, int], list[TokenPair]]:
    """Encode every task's pretraining pool once; each call draws tasks by weight, then an example uniformly, then
    one of the example's correct answers uniformly (several answers teach the space of solutions, not one string)."""
    names = [n for n, w in mixture.items() if w > 0]
    weights = [mixture[n] for n in names]
    pools: dict[str, list[list[TokenPair]]] = {}
    for name in names:
        examples = task_registry.get(name).examples(pretrain_split(name), None, seed=0)
        pools[name] = [
            [(encode_prompt(tokenizer, e.prompt), encode_answer(tokenizer, a)) for a in e.answers] for e in examples
        ]

    def sample(rng: random.Random, k: int, step: int = 0) -> list[TokenPair]:
        return [rng.choice(rng.choice(pools[name])) for name in rng.choices(names, weights, k=k)]

    return sample


def init_phases(init: str) -> list[dict[str, Any]]:
    """The pretraining record(s) of the model a continuation starts from (its ``pretrain.json``, phases flattened
    oldest first); none for a model retain did not pretrain."""
    path = Path(resolve_model_path(init)) / "pretrain.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    return [*record.pop("earlier_phases", []), record]


def pretrain(
    cfg: PretrainConfig,
    out: str | Path,
    log: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train a base model per ``cfg`` and write it to ``out`` (atomically: built in a temp dir, then renamed).
    ``on_step(step, model)`` runs after every optimizer step (a calibration's probe)."""
    from retain.evaluate import evaluate

    out = Path(out)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    earlier: list[dict[str, Any]] = []
    if cfg.init is None:
        tok = build_tokenizer()
        model = make_model(cfg.preset, tok)
    else:
        model, tok = load_model(cfg.init)
        earlier = init_phases(cfg.init)
    objective = SFTObjective(mixture_sampler(tok, cfg.mixture), tok.pad_token_id, cfg.batch_size, seed=cfg.seed)
    train_cfg = TrainConfig(
        steps=cfg.steps, lr=cfg.lr, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed, log_every=max(1, cfg.steps // 50), max_grad_norm=1.0,
    )
    model = Trainer(model, objective, train_cfg, log=log, on_step=on_step).run()
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
    if earlier:  # a continuation records the phases before it, so the shipped model's whole history is in one file
        summary["earlier_phases"] = earlier
    save_model_dir(model, tok, out, extra={"eval.json": scores, "pretrain.json": summary})
    return {"eval": scores, **summary}
