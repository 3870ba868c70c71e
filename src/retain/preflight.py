"""No silent no-signal GRPO stages.

GRPO learns from the spread of rewards within a group: when every completion of a prompt scores the same, its
advantages are 0 and the prompt teaches nothing. A stage whose starting model never solves its training prompts
trains for all its steps at reward 0 and changes nothing but the clock. Two checks say so while there is time to
act:

- **before the stage** (:func:`grpo_signal`): the starting model samples ``group_size`` completions for up to
  ``PROMPTS`` training prompts, exactly as the first rollout would (temperature, length, the task's reward); when
  pass@k (k = group_size, a completion counts when its reward reaches ``CORRECT``) is 0, or more than
  ``FLAT_LIMIT`` of the groups are flat, the runner warns;
- **during its first steps** (:class:`FlatGroupWatch`): when the mean ``flat_groups`` of the first ``WATCH_STEPS``
  logged steps exceeds ``FLAT_LIMIT``, once per stage.

The warnings name the task and the measurement and give the usual fix: an SFT stage on the task first.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch

from retain import tasks as task_registry
from retain.config import ExperimentConfig
from retain.evaluate import DEFAULT_MAX_NEW_TOKENS, pass_at_k
from retain.methods.config import MethodConfig, OnPolicyData
from retain.rollout import EngineChoice, make_engine
from retain.tasks import CORRECT, Task
from retain.train import rng_preserved

PROMPTS = 32  # training prompts sampled before a GRPO stage
FLAT_LIMIT = 0.9  # more than this share of flat groups: (almost) no signal
WATCH_STEPS = 3  # logged steps the in-stage check averages

FIX = "the usual fix: an SFT stage on this task first (stages: [{task: T, method: sft}, {task: T, method: grpo}])"


def _score(reward: Any) -> float:
    try:
        value = float(reward)
    except (TypeError, ValueError):  # None: unscorable, as GRPO treats it
        return math.nan
    return value if math.isfinite(value) else math.nan


@torch.no_grad()
def grpo_signal(model, tokenizer, task: Task, method: MethodConfig, engine: EngineChoice, seed: int) -> dict[str, Any] | None:
    """pass@k and the share of flat groups of the starting model on the stage's training prompts; ``None`` when
    the method is not on-policy. Uses its own seeded generator, so the stage that follows is unchanged."""
    data = method.data
    if not isinstance(data, OnPolicyData):
        return None
    prompts = [e.prompt for e in task.examples("train", None, seed=0)]
    chosen = random.Random(seed).sample(prompts, min(PROMPTS, len(prompts)))
    max_new = method.max_new_tokens or getattr(task, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    was_training = model.training
    model.eval()
    try:
        roll = make_engine(engine, model, tokenizer).generate(
            chosen, n=data.group_size, temperature=data.temperature, max_new_tokens=max_new, seed=seed)
    finally:
        model.train(was_training)
    groups: list[list[float]] = [[] for _ in chosen]
    for i, p, t in zip(roll.group, roll.prompts, roll.texts):
        reward = _score(task.reward(p, t))
        groups[i].append(reward if data.reward == "task" or math.isnan(reward) else float(reward >= CORRECT))
    scorable = [[r for r in g if not math.isnan(r)] for g in groups]
    solved = [sum(r >= CORRECT for r in g) for g in scorable]
    flat = [len(set(g)) <= 1 for g in scorable]
    rewards = [r for g in scorable for r in g]
    return {"k": data.group_size, "prompts": len(groups),
            "pass_at_k": sum(pass_at_k(data.group_size, c, data.group_size) for c in solved) / len(groups),
            "flat_groups": sum(flat) / len(groups), "mean_reward": sum(rewards) / max(1, len(rewards))}


def signal_warning(task_name: str, stage: int, measured: dict[str, Any]) -> str | None:
    """The warning for a pre-stage measurement, or ``None`` when the stage has signal."""
    if measured["pass_at_k"] > 0 and measured["flat_groups"] <= FLAT_LIMIT:
        return None
    return (f"GRPO stage {stage} on {task_name!r} may have no learning signal: the starting model's "
            f"pass@{measured['k']} on {measured['prompts']} training prompts is {measured['pass_at_k']:.3f} and "
            f"{measured['flat_groups']:.0%} of its groups have equal rewards (advantage 0); {FIX}")


class FlatGroupWatch:
    """Wraps a stage's step log: after ``WATCH_STEPS`` logged GRPO steps, calls ``warn(message, mean_flat)`` once when
    their mean ``flat_groups`` exceeds ``FLAT_LIMIT``."""

    def __init__(self, task_name: str, stage: int, warn: Callable[[str, float], None]) -> None:
        self.task_name, self.stage, self.warn = task_name, stage, warn
        self.seen: list[float] = []

    def __call__(self, record: dict[str, Any]) -> None:
        flat = record.get("flat_groups")
        if not isinstance(flat, (int, float)) or len(self.seen) >= WATCH_STEPS:
            return
        self.seen.append(float(flat))
        if len(self.seen) == WATCH_STEPS:
            mean = sum(self.seen) / WATCH_STEPS
            if mean > FLAT_LIMIT:
                self.warn(f"GRPO stage {self.stage} on {self.task_name!r}: {mean:.0%} of the groups had equal rewards "
                          f"over the first {WATCH_STEPS} logged steps (no learning signal); {FIX}", mean)


def stage_signal(model, tokenizer, cfg: ExperimentConfig, k: int) -> list[tuple[str, dict[str, Any]]]:
    """The runner's check before stage ``k`` (0-based): ``[(message, data)]`` for ``warn``, empty when the stage
    is not GRPO or has signal."""
    method, task_name = cfg.stage_method(k), cfg.stages[k].task
    measured = grpo_signal(model, tokenizer, task_registry.get(task_name), method, cfg.rollout_engine(),
                           cfg.seed * 1000 + k)
    message = None if measured is None else signal_warning(task_name, k + 1, measured)
    if message is None:
        return []
    return [(message, {"kind": "no_signal", "stage": k + 1, "task": task_name, **measured})]


def signal_watch(model, tokenizer, cfg: ExperimentConfig, k: int, warn: Callable[..., None]) -> FlatGroupWatch:
    """The runner's no-signal checks of stage ``k`` (0-based): the measurement before it, run with the training RNG
    state saved and restored (the stage is unchanged) and each of its warnings given to ``warn(message, **data)``
    now, and the returned watch of the stage's first steps, which warns the same way."""
    with rng_preserved():
        for message, data in stage_signal(model, tokenizer, cfg, k):
            warn(message, **data)
    task_name = cfg.stages[k].task
    return FlatGroupWatch(task_name, k + 1, lambda message, flat: warn(
        message, kind="no_signal", stage=k + 1, task=task_name, flat_groups=flat))
