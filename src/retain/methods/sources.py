"""Data sources of the SFT family: each yields (prompt, answer) text pairs for a step.

- offline: the task's reference answers; with several correct answers, ``target`` chooses (SPEC §2.4).
- self: samples of the stage's initial model (or of ``source_model``), kept if correct — built once at stage start.
- iterative: the same from the *current* model, rebuilt every ``epoch_steps`` steps.
- multitask: reference answers of every task seen so far, drawn task-uniformly.
- replay (a wrapper): a share of every batch from earlier stages' buffers.

Sampling within a step is seeded by (seed, step), so a step's batch does not depend on what ran before it.
"""

from __future__ import annotations

import random
from typing import Callable, Protocol, Sequence

import torch

from retain import tasks as task_registry
from retain.errors import RetainError
from retain.evaluate import DEFAULT_MAX_NEW_TOKENS
from retain.methods.config import IterativeData, MethodConfig, MultiTaskData, OfflineData, SampledData
from retain.methods.stage import StageContext
from retain.rollout import make_engine
from retain.scoring import sequence_logprobs

Pair = tuple[str, str]


class PairSource(Protocol):
    def sample(self, rng: random.Random, k: int, step: int) -> list[Pair]: ...


class FixedPairs:
    """Uniform draws from a fixed list of pairs."""

    def __init__(self, pairs: Sequence[Pair], what: str) -> None:
        if not pairs:
            raise RetainError(f"{what}: no training examples")
        self.pairs = list(pairs)

    def sample(self, rng: random.Random, k: int, step: int) -> list[Pair]:
        return [rng.choice(self.pairs) for _ in range(k)]


def reference_pairs(ctx: StageContext, task_name: str, target: str, seed: int) -> list[Pair]:
    """The train split's (prompt, answer) pairs with the SFT target chosen per ``target``."""
    examples = task_registry.get(task_name).examples("train", None, seed=0)
    if target == "canonical":
        return [(e.prompt, e.answer) for e in examples]
    if target == "random":
        rng = random.Random(seed)
        return [(e.prompt, rng.choice(e.answers)) for e in examples]
    # likely / unlikely under the stage's initial model: score every candidate answer once
    flat = [(e.prompt, a) for e in examples for a in e.answers]
    scores = iter(sequence_logprobs(ctx.reference, ctx.tokenizer, flat))
    pick = max if target == "likely" else min
    chosen = []
    for e in examples:
        scored = [(next(scores), a) for a in e.answers]
        chosen.append((e.prompt, pick(scored)[1]))
    return chosen


def varied_prompts(task, pairs: list[Pair], what: str) -> list[Pair]:
    """Every pair once per prompt template of the task (``task.prompt_variants``), so each example keeps its weight
    and each template is drawn equally often (Debunk, arXiv 2510.00237)."""
    variants = getattr(task, "prompt_variants", None)
    if variants is None:
        raise RetainError(f"{what}: data.prompts 'varied' needs a task with prompt templates (gpoints has them)")
    return [(v, a) for p, a in pairs for v in variants(p)]


def sample_correct(
    model: torch.nn.Module, ctx: StageContext, samples_per_prompt: int, temperature: float, seed: int,
    max_new_tokens: int | None = None,
) -> list[Pair]:
    """Sample every train prompt ``samples_per_prompt`` times from ``model``; keep distinct correct completions."""
    examples = ctx.task.examples("train", None, seed=0)
    prompts = [e.prompt for e in examples]
    engine = make_engine(ctx.engine, model, ctx.tokenizer)
    max_new = max_new_tokens or getattr(ctx.task, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    rollout = engine.generate(prompts, n=samples_per_prompt, temperature=temperature, max_new_tokens=max_new, seed=seed)
    kept: dict[Pair, None] = {}
    for prompt, text, truncated in zip(rollout.prompts, rollout.texts, rollout.truncated):
        if not truncated and ctx.task.is_correct(prompt, text):
            kept[(prompt, text)] = None
    return list(kept)


class IterativePairs:
    """Rebuilt from the current model at steps 0, E, 2E, …"""

    def __init__(self, cfg: IterativeData, ctx: StageContext, max_new_tokens: int | None) -> None:
        self.cfg, self.ctx, self.max_new = cfg, ctx, max_new_tokens
        self.pairs: list[Pair] = []
        self.epoch = -1
        self.kept_history: list[int] = []

    def sample(self, rng: random.Random, k: int, step: int) -> list[Pair]:
        epoch = step // self.cfg.epoch_steps
        if epoch != self.epoch:
            self.epoch = epoch
            fresh = sample_correct(
                self.ctx.model, self.ctx, self.cfg.samples_per_prompt, self.cfg.temperature,
                seed=self.ctx.seed * 7919 + epoch, max_new_tokens=self.max_new,
            )
            self.kept_history.append(len(fresh))
            if fresh:
                self.pairs = fresh
            if not self.pairs:
                raise RetainError(
                    f"iterative SFT on {self.ctx.task_name!r}: the model solved none of the train prompts in "
                    f"{self.cfg.samples_per_prompt} samples each; nothing to train on"
                )
        return [rng.choice(self.pairs) for _ in range(k)]


class MultiTaskPairs:
    def __init__(self, per_task: dict[str, list[Pair]]) -> None:
        self.per_task = {t: p for t, p in per_task.items() if p}
        self.names = sorted(self.per_task)

    def sample(self, rng: random.Random, k: int, step: int) -> list[Pair]:
        return [rng.choice(self.per_task[rng.choice(self.names)]) for _ in range(k)]


class WithReplay:
    """``ratio`` of each batch drawn from the replay buffers of earlier stages and ``prior_ratio`` from the prior
    skills' training data (each task-uniform); the rest from the stage's own source."""

    def __init__(self, inner: PairSource, buffers: dict[str, list[Pair]], ratio: float,
                 prior: dict[str, list[Pair]] | None = None, prior_ratio: float = 0.0) -> None:
        self.inner, self.ratio, self.prior_ratio = inner, ratio, prior_ratio
        self.buffers = {t: p for t, p in buffers.items() if p}
        self.names = sorted(self.buffers)
        self.prior = {t: p for t, p in (prior or {}).items() if p}
        self.prior_names = sorted(self.prior)

    def sample(self, rng: random.Random, k: int, step: int) -> list[Pair]:
        n_replay = round(self.ratio * k) if self.names else 0
        n_prior = round(self.prior_ratio * k) if self.prior_names else 0
        n_prior = min(n_prior, k - n_replay - 1)  # at least one example of the stage's own task per batch
        replayed = [rng.choice(self.buffers[rng.choice(self.names)]) for _ in range(n_replay)]
        replayed += [rng.choice(self.prior[rng.choice(self.prior_names)]) for _ in range(max(0, n_prior))]
        return self.inner.sample(rng, k - len(replayed), step) + replayed


def prior_pairs(names: list[str]) -> dict[str, list[Pair]]:
    """The train split's reference pairs of each named task or group (the prior skills' pretraining data)."""
    return {t: [(e.prompt, e.answer) for e in task_registry.get(t).examples("train", None, seed=0)]
            for t in task_registry.resolve(names)}


def build_source(cfg: MethodConfig, ctx: StageContext, load_model: Callable[[str], torch.nn.Module]) -> PairSource:
    data = cfg.data
    what = f"{cfg.name} on {ctx.task_name!r}"
    if isinstance(data, OfflineData):
        pairs = reference_pairs(ctx, ctx.task_name, data.target, ctx.seed)
        if data.prompts == "varied":
            pairs = varied_prompts(ctx.task, pairs, what)
        source: PairSource = FixedPairs(pairs, what)
    elif isinstance(data, SampledData):
        model = ctx.reference if data.source_model is None else load_model(data.source_model)
        pairs = sample_correct(model, ctx, data.samples_per_prompt, data.temperature, ctx.seed, cfg.max_new_tokens)
        if not pairs:
            who = "the stage's initial model" if data.source_model is None else repr(data.source_model)
            raise RetainError(f"{what}: {who} solved none of the train prompts in {data.samples_per_prompt} samples each")
        source = FixedPairs(pairs, what)
    elif isinstance(data, IterativeData):
        source = IterativePairs(data, ctx, cfg.max_new_tokens)
    elif isinstance(data, MultiTaskData):
        names = [*ctx.seen_tasks, ctx.task_name]
        source = MultiTaskPairs({t: reference_pairs(ctx, t, data.target, ctx.seed) for t in names})
    else:  # pragma: no cover - validated by MethodConfig
        raise RetainError(f"data kind {data.kind!r} is not an SFT-family source")
    if cfg.replay is not None:
        prior = prior_pairs(cfg.replay.prior_tasks) if cfg.replay.prior_ratio > 0 else {}
        source = WithReplay(source, ctx.state.replay, cfg.replay.ratio, prior, cfg.replay.prior_ratio)
    return source
