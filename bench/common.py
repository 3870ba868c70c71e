"""Shared pieces of the benchmarks: thread setup, step timing, building retain's trainer for one stage."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def setup_threads() -> None:
    torch.set_num_threads(THREADS)


class StepClock:
    """Wall-clock time at the end of every optimizer step; ``rate(warmup)`` = steps/s after the warm-up steps."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ends: list[float] = []

    def tick(self, *_: Any) -> None:
        self.ends.append(time.perf_counter())

    def rate(self, warmup: int) -> float:
        timed = self.ends[warmup:]
        first = self.ends[warmup - 1] if warmup > 0 else self.start
        return len(timed) / (timed[-1] - first)

    def seconds(self, warmup: int) -> float:
        first = self.ends[warmup - 1] if warmup > 0 else self.start
        return self.ends[-1] - first


def retain_trainer(model, tokenizer, task_name: str, method: dict[str, Any], seed: int = 0, on_step=None):
    """What ``retain.methods.build.train_stage`` builds before it calls ``Trainer.run`` (no adapter, no extras),
    with an ``on_step`` hook so the benchmark can time individual steps."""
    from retain import tasks as task_registry
    from retain.methods.build import build_objective
    from retain.models.adapters import frozen_copy
    from retain.methods.config import method_config
    from retain.methods.stage import MethodState, StageContext
    from retain.train import Trainer

    cfg = method_config(method)
    ctx = StageContext(
        model=model, reference=frozen_copy(model), tokenizer=tokenizer, task_name=task_name,
        task=task_registry.get(task_name), stage_index=0, seen_tasks=[], seed=seed, state=MethodState(),
    )
    objective = build_objective(cfg, ctx)
    train_cfg = cfg.train.model_copy(update={"seed": seed})
    return Trainer(model, objective, train_cfg, on_step=on_step), objective


def trl_clock_callback(clock: StepClock):
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return _Clock()


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def trl_cpu_args(lr: float, max_steps: int, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """The TRL TrainingArguments both TRL references share: CPU, fp32, constant lr, no logging/eval/saving.

    ``gradient_checkpointing``: TRL 1.16's SFTConfig and GRPOConfig turn it on by default (an extra forward per
    step); retain does not checkpoint, so the main references turn it off — the same work on both sides — and the
    ``*_vs_trl_defaults`` rows keep TRL's default, what a user running TRL out of the box gets."""
    return dict(
        gradient_checkpointing=gradient_checkpointing,
        learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=max_steps, use_cpu=True,
        bf16=False, fp16=False, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
