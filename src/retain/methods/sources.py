"""Data sources of the SFT family: each yields (prompt, answer) text pairs for a step.

- offline: the task's reference answers; with several correct answers, ``target`` chooses (SPEC §2.4), or keeps
  ``every`` one (a prompt drawn uniformly, then one of its answers).
- self: samples of the stage's initial model (or of ``source_model``), kept if correct — built once at stage start.
- iterative: the same from the *current* model, rebuilt every ``epoch_steps`` steps.
- multitask: reference answers of every task seen so far, drawn task-uniformly.
- replay (a wrapper): a share of every batch from earlier stages' buffers; at the stage's end it fills the stage's
  own buffer (a part with a life across the stage: ``retain.methods.parts``).

Each source builds itself from the method config and the stage context (``build``); ``build_source`` picks the
class by the config's data kind. Sampling within a step is seeded by (seed, step), so a step's batch does not depend on what ran before it.
"""

from __future__ import annotations

import random
from typing import Callable, Protocol, Sequence

import torch

from retain import tasks as task_registry
from retain.errors import RetainError
from retain.evaluate import DEFAULT_MAX_NEW_TOKENS
from retain.methods.config import IterativeData, MethodConfig, MultiTaskData, OfflineData, ReplayConfig, SampledData
from retain.methods.parts import StagePart
from retain.methods.stage import StageContext
from retain.rollout import make_engine
from retain.logprobs import sequence_logprobs

TextPair = tuple[str, str]  # (prompt, answer) as text; retain.data.TokenPair is the encoded form
ModelLoader = Callable[[str], torch.nn.Module]


class PairSource(Protocol):
    def sample(self, rng: random.Random, k: int, step: int) -> list[TextPair]: ...


class FixedPairs:
    """Uniform draws from a fixed list of pairs."""

    def __init__(self, pairs: Sequence[TextPair], what: str) -> None:
        if not pairs:
            raise RetainError(f"{what}: no training examples")
        self.pairs = list(pairs)

    def sample(self, rng: random.Random, k: int, step: int) -> list[TextPair]:
        return [rng.choice(self.pairs) for _ in range(k)]


class ReferencePairs(FixedPairs):
    """offline data: the task's reference answers (``target`` chooses among several), the prompts as written or in
    every template of the task (``prompts: varied``)."""

    @classmethod
    def build(cls, cfg: MethodConfig, ctx: StageContext, load_model: ModelLoader) -> ReferencePairs | EveryAnswer:
        data, what = cfg.data, f"{cfg.name} on {ctx.task_name!r}"
        if data.target == "every":
            groups = every_answer(ctx.task_name)
            if data.prompts == "varied":
                groups = [varied_prompts(ctx.task, group, what) for group in groups]
            return EveryAnswer(groups, what)
        pairs = reference_pairs(ctx, ctx.task_name, data.target, ctx.seed)
        if data.prompts == "varied":
            pairs = varied_prompts(ctx.task, pairs, what)
        return cls(pairs, what)


class EveryAnswer:
    """offline data with ``target: every``: one group of pairs per training prompt (each of its correct answers); a
    draw picks a group uniformly, then a pair of it uniformly, so a prompt with six answers weighs what a prompt with
    one does."""

    def __init__(self, groups: Sequence[Sequence[TextPair]], what: str) -> None:
        self.groups = [list(g) for g in groups if g]
        if not self.groups:
            raise RetainError(f"{what}: no training examples")

    def sample(self, rng: random.Random, k: int, step: int) -> list[TextPair]:
        return [rng.choice(rng.choice(self.groups)) for _ in range(k)]


def every_answer(task_name: str) -> list[list[TextPair]]:
    """The train split's prompts, each with every reference answer it has, in the split's fixed order."""
    return [[(e.prompt, a) for a in e.answers] for e in task_registry.get(task_name).examples("train", None, seed=0)]


class SelfSampledPairs(FixedPairs):
    """self data: correct samples of the stage's initial model (or of ``source_model``), drawn once at stage start."""

    @classmethod
    def build(cls, cfg: MethodConfig, ctx: StageContext, load_model: ModelLoader) -> SelfSampledPairs:
        data, what = cfg.data, f"{cfg.name} on {ctx.task_name!r}"
        model = ctx.reference if data.source_model is None else load_model(data.source_model)
        pairs = sample_correct(model, ctx, data.samples_per_prompt, data.temperature, ctx.seed, cfg.max_new_tokens)
        if not pairs:
            who = "the stage's initial model" if data.source_model is None else repr(data.source_model)
            raise RetainError(f"{what}: {who} solved none of the train prompts in {data.samples_per_prompt} samples each")
        return cls(pairs, what)


def reference_pairs(ctx: StageContext, task_name: str, target: str, seed: int) -> list[TextPair]:
    """The train split's (prompt, answer) pairs with the SFT target chosen per ``target``."""
    examples = task_registry.get(task_name).examples("train", None, seed=0)
    if target == "canonical":
        return [(e.prompt, e.answer) for e in examples]
    if target == "random":
        rng = random.Random(seed)
        return [(e.prompt, rng.choice(e.answers)) for e in examples]
    # likely / unlikely under the stage's initial model: score every candidate answer once
    flat = [(e.prompt, a) for e in examples for a in e.answers]
    scores = iter(sequence_logprobs(ctx.reference, ctx.tokenizer, flat, encode=ctx.kind.encode))
    pick = max if target == "likely" else min
    chosen = []
    for e in examples:
        scored = [(next(scores), a) for a in e.answers]
        chosen.append((e.prompt, pick(scored)[1]))
    return chosen


def varied_prompts(task, pairs: list[TextPair], what: str) -> list[TextPair]:
    """Every pair once per prompt template of the task (``task.prompt_variants``), so each example keeps its weight
    and each template is drawn equally often (Debunk, arXiv 2510.00237)."""
    variants = getattr(task, "prompt_variants", None)
    if variants is None:
        raise RetainError(f"{what}: data.prompts 'varied' needs a task with prompt templates (gpoints and sort "
                          "have them)")
    return [(v, a) for p, a in pairs for v in variants(p)]


def sample_correct(
    model: torch.nn.Module, ctx: StageContext, samples_per_prompt: int, temperature: float, seed: int,
    max_new_tokens: int | None = None,
) -> list[TextPair]:
    """Sample every train prompt ``samples_per_prompt`` times from ``model``; keep distinct correct completions."""
    examples = ctx.task.examples("train", None, seed=0)
    prompts = [e.prompt for e in examples]
    engine = make_engine(ctx.engine, model, ctx.tokenizer)
    max_new = max_new_tokens or getattr(ctx.task, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    rollout = engine.generate(prompts, n=samples_per_prompt, temperature=temperature, max_new_tokens=max_new, seed=seed)
    kept: dict[TextPair, None] = {}
    for prompt, text, truncated in zip(rollout.prompts, rollout.texts, rollout.truncated):
        if not truncated and ctx.task.is_correct(prompt, text):
            kept[(prompt, text)] = None
    return list(kept)


class IterativePairs:
    """Rebuilt from the current model at steps 0, E, 2E, …"""

    def __init__(self, cfg: IterativeData, ctx: StageContext, max_new_tokens: int | None) -> None:
        self.cfg, self.ctx, self.max_new = cfg, ctx, max_new_tokens
        self.pairs: list[TextPair] = []
        self.epoch = -1
        self.kept_history: list[int] = []

    @classmethod
    def build(cls, cfg: MethodConfig, ctx: StageContext, load_model: ModelLoader) -> IterativePairs:
        return cls(cfg.data, ctx, cfg.max_new_tokens)

    def sample(self, rng: random.Random, k: int, step: int) -> list[TextPair]:
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
    def __init__(self, per_task: dict[str, list[TextPair]]) -> None:
        self.per_task = {t: p for t, p in per_task.items() if p}
        self.names = sorted(self.per_task)

    @classmethod
    def build(cls, cfg: MethodConfig, ctx: StageContext, load_model: ModelLoader) -> MultiTaskPairs:
        names = [*ctx.seen_tasks, ctx.task_name]
        return cls({t: reference_pairs(ctx, t, cfg.data.target, ctx.seed) for t in names})

    def sample(self, rng: random.Random, k: int, step: int) -> list[TextPair]:
        return [rng.choice(self.per_task[rng.choice(self.names)]) for _ in range(k)]


class WithReplay(StagePart):
    """``ratio`` of each batch drawn from the replay buffers of earlier stages and ``prior_ratio`` from the prior
    skills' training data (each task-uniform); the rest from the stage's own source. At the stage's end it fills the
    stage's own buffer (``size`` of the task's reference pairs, a seeded draw) for the stages after it."""

    def __init__(self, inner: PairSource, buffers: dict[str, list[TextPair]], ratio: float,
                 prior: dict[str, list[TextPair]] | None = None, prior_ratio: float = 0.0, size: int = 512) -> None:
        self.inner, self.ratio, self.prior_ratio, self.size = inner, ratio, prior_ratio, size
        self.buffers = {t: p for t, p in buffers.items() if p}
        self.names = sorted(self.buffers)
        self.prior = {t: p for t, p in (prior or {}).items() if p}
        self.prior_names = sorted(self.prior)

    @classmethod
    def build(cls, cfg: ReplayConfig, ctx: StageContext, inner: PairSource) -> WithReplay:
        prior = prior_pairs(cfg.prior_tasks) if cfg.prior_ratio > 0 else {}
        return cls(inner, ctx.state.replay, cfg.ratio, prior, cfg.prior_ratio, cfg.size)

    @classmethod
    def streaming_refusal(cls, cfg: ReplayConfig, field: str) -> str | None:
        return f"{field} needs task boundaries"

    def sample(self, rng: random.Random, k: int, step: int) -> list[TextPair]:
        n_replay = round(self.ratio * k) if self.names else 0
        n_prior = round(self.prior_ratio * k) if self.prior_names else 0
        n_prior = min(n_prior, k - n_replay - 1)  # at least one example of the stage's own task per batch
        replayed = [rng.choice(self.buffers[rng.choice(self.names)]) for _ in range(n_replay)]
        replayed += [rng.choice(self.prior[rng.choice(self.prior_names)]) for _ in range(max(0, n_prior))]
        return self.inner.sample(rng, k - len(replayed), step) + replayed

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        pairs = reference_pairs(ctx, ctx.task_name, "canonical", ctx.seed)
        ctx.state.replay[ctx.task_name] = random.Random(ctx.seed).sample(pairs, min(self.size, len(pairs)))
        return model


def prior_pairs(names: list[str]) -> dict[str, list[TextPair]]:
    """The train split's reference pairs of each named task or group (the prior skills' pretraining data)."""
    return {t: [(e.prompt, e.answer) for e in task_registry.get(t).examples("train", None, seed=0)]
            for t in task_registry.resolve(names)}


SOURCES: dict[type, Callable[[MethodConfig, StageContext, ModelLoader], PairSource]] = {
    OfflineData: ReferencePairs.build,
    SampledData: SelfSampledPairs.build,
    IterativeData: IterativePairs.build,
    MultiTaskData: MultiTaskPairs.build,
}


def build_source(cfg: MethodConfig, ctx: StageContext, load_model: ModelLoader) -> PairSource:
    """The stage's data source for ``cfg.data`` (wrapped by replay when the method replays)."""
    build = SOURCES.get(type(cfg.data))
    if build is None:  # pragma: no cover - validated by MethodConfig
        raise RetainError(f"data kind {cfg.data.kind!r} is not an SFT-family source")
    source = build(cfg, ctx, load_model)
    return source if cfg.replay is None else WithReplay.build(cfg.replay, ctx, source)
