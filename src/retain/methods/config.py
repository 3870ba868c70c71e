"""Method configuration: a method is a data source × a token loss × regularisers (+ replay, + an adapter).

Every named method in SPEC §2 is a preset of these parts (``PRESETS``); a user config names a preset and overrides
any field, e.g. ``{"name": "eaft", "loss": {"k": 10}, "train": {"lr": 1e-4}}``. Validation is strict: an unknown
field, an unknown kind, or a part that does not fit the others (a GRPO loss on offline data, say) is rejected with
a message naming it.
"""

from __future__ import annotations

import copy
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retain.errors import RetainError
from retain.losses import CONFLICT_ENTROPY_MAX, CONFLICT_PROB_MAX
from retain.train import TrainConfig
from retain.yaml_input import field_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Upper bounds on sizes that allocate (a typo such as group_size: 80000000 is refused up front, not an OOM later)
MAX_SAMPLES = 4096  # samples per prompt, group size
MAX_BATCH = 1 << 20  # sequences per step, prompts per step, buffer and Fisher sizes
MAX_TOKENS = 1 << 17  # sampling length


# --- where the training tokens come from -------------------------------------------------------------------------
class OfflineData(_Strict):
    """The task's reference targets. ``target`` picks among several correct answers (SPEC §2.4): the canonical one,
    a seeded random one, the most / least likely under the stage's initial model, or ``every`` one of them (each draw
    picks a prompt, then one of its answers: a prompt keeps its weight however many answers it has, and the model sees
    every correct answer rather than one fixed mapping — answer diversity). ``prompts: varied`` trains on
    every prompt template the task offers (``Task.prompt_variants``; GeneralPoints has five) instead of its one
    frozen template (Debunk, arXiv 2510.00237); evaluation keeps the task's own template."""

    kind: Literal["offline"] = "offline"
    target: Literal["canonical", "random", "likely", "unlikely", "every"] = "canonical"
    prompts: Literal["task", "varied"] = "task"


class SampledData(_Strict):
    """Self-SFT (Retaining): samples of the stage's **initial** model, kept if correct — or, with ``source_model``,
    samples of another model (a finished RL run's policy: SFT on RL samples, Razor's distillation check)."""

    kind: Literal["self"] = "self"
    samples_per_prompt: int = Field(8, ge=1, le=MAX_SAMPLES)
    temperature: float = Field(1.0, gt=0)
    source_model: str | None = None


class IterativeData(_Strict):
    """Iterative SFT: every ``epoch_steps`` optimizer steps, resample the train prompts from the **current** model
    and keep the correct samples."""

    kind: Literal["iterative"] = "iterative"
    samples_per_prompt: int = Field(8, ge=1, le=MAX_SAMPLES)
    temperature: float = Field(1.0, gt=0)
    epoch_steps: int = Field(25, ge=1)


class OnPolicyData(_Strict):
    """GRPO rollouts: ``group_size`` samples per prompt from the current policy every ``updates_per_batch`` steps.

    ``reward``: ``task`` scores with the task's own reward (shaped where the task shapes it: GeneralPoints and
    Countdown give 0.2 / 0.1 to legal but wrong expressions); ``binary`` scores 1 for a correct completion and 0
    otherwise, as Razor, Retaining and Huan do. Under group normalisation a shaped reward gives positive advantage
    to wrong answers in groups with no correct sample (SPEC §2.4); the report names the reward a run used."""

    kind: Literal["on_policy"] = "on_policy"
    reward: Literal["task", "binary"] = "task"
    group_size: int = Field(8, ge=2, le=MAX_SAMPLES)
    prompts_per_step: int = Field(16, ge=1, le=MAX_BATCH)
    temperature: float = Field(1.0, gt=0)
    updates_per_batch: int = Field(1, ge=1, description="μ: optimizer steps per rollout batch")


class MultiTaskData(_Strict):
    """Joint training on the reference targets of every task seen so far (stages 1..k), the non-continual ceiling."""

    kind: Literal["multitask"] = "multitask"
    target: Literal["canonical", "random"] = "canonical"


DataConfig = Annotated[
    Union[OfflineData, SampledData, IterativeData, OnPolicyData, MultiTaskData], Field(discriminator="kind")
]


# --- how each token is weighted ----------------------------------------------------------------------------------
class NLLLoss(_Strict):
    kind: Literal["nll"] = "nll"


class EAFTLoss(_Strict):
    """w_t = (H_topK / ln K)^α, detached (SPEC §2.2)."""

    kind: Literal["eaft"] = "eaft"
    k: int = Field(20, ge=2)
    alpha: float = Field(1.0, gt=0)


class ConflictMaskedLoss(_Strict):
    """Drop target tokens that are confident conflicts under the current model (SPEC §2.3)."""

    kind: Literal["conflict_masked"] = "conflict_masked"
    entropy_max: float = Field(CONFLICT_ENTROPY_MAX, gt=0)
    prob_max: float = Field(CONFLICT_PROB_MAX, gt=0, le=1)


class DFTLoss(_Strict):
    """DFT (arXiv 2508.05629): w_t = p(y_t), detached; divided by the token count as TRL's ``loss_type="dft"``."""

    kind: Literal["dft"] = "dft"


class PSFTLoss(_Strict):
    """Proximal SFT (arXiv 2508.17784): −min(ρ_t, clip(ρ_t, 1−ε, 1+ε)) per target token, ρ_t = π(y_t)/π_old(y_t),
    π_old the policy before this batch's ``updates_per_batch`` optimizer steps (PPO's clip with advantage 1). With one
    update per batch ρ = 1 and it is SFT; the clip only acts from the second update on the same batch."""

    kind: Literal["psft"] = "psft"
    eps: float = Field(0.2, gt=0, description="upper clip 1 + eps (with A = 1 the lower clip never binds)")
    updates_per_batch: int = Field(4, ge=1, description="optimizer steps on one batch against one π_old")


TEACHER_KINDS = ("start", "live", "ema")  # any other teacher names a model to load


class TeacherKLLoss(_Strict):
    """Distillation on the student's own samples (on_policy data): Σ_v KL per completion token between the student
    and a teacher, exact over the vocabulary, token mean over the rollout batch.

    ``teacher``: ``start`` (the stage's starting model, frozen; TRL SDFT's ``base``), ``live`` (the model being
    trained, no gradient), ``ema`` (θ_T ← (1 − ema_rate)·θ_T + ema_rate·θ every ``refresh_every`` steps, from the
    stage's start), or a model to load (``base`` = the embedded base model, or a model directory).
    ``context``: ``none`` — the teacher reads the same prompt (on-policy distillation); ``demonstration`` — the
    teacher reads ``template`` filled with the prompt and the task's reference answer, the student the bare prompt
    (SDFT, arXiv 2601.19897). ``direction``: ``reverse`` KL(student ‖ teacher) (on-policy distillation; TRL's
    ``distillation_alpha=1``) or ``forward`` KL(teacher ‖ student) (what the SDFT authors report using; alpha 0)."""

    kind: Literal["teacher_kl"] = "teacher_kl"
    teacher: str = "start"
    context: Literal["none", "demonstration"] = "none"
    template: str = "{prompt} e.g. {demonstration};"
    direction: Literal["reverse", "forward"] = "reverse"
    ema_rate: float = Field(0.05, gt=0, le=1)
    refresh_every: int = Field(1, ge=1, description="optimizer steps between EMA teacher updates")

    @model_validator(mode="after")
    def _teacher_fits(self) -> "TeacherKLLoss":
        if self.teacher == "live" and self.context == "none":
            raise ValueError("teacher 'live' with context 'none' is the student itself: its KL is 0 (use context "
                             "'demonstration', or teacher start / ema / a model)")
        if self.context == "demonstration" and not {"{prompt}", "{demonstration}"} <= set(
                re.findall(r"\{[a-z]+\}", self.template)):
            raise ValueError(f"template {self.template!r} must hold both {{prompt}} and {{demonstration}}")
        if self.teacher not in TEACHER_KINDS:
            from retain.models.loading import resolve_model_path

            try:
                resolve_model_path(self.teacher)
            except RetainError as err:
                raise ValueError(f"teacher {self.teacher!r}: {err}") from None
        return self


class GRPOLoss(_Strict):
    """``positive_only``: advantages clamped at ≥ 0 — only the better-than-average samples are pushed up, nothing is
    pushed down (online rejection-sampling fine-tuning; Huan's "negative gradients matter")."""

    kind: Literal["grpo"] = "grpo"
    eps_low: float = Field(0.2, ge=0)
    eps_high: float = Field(0.2, ge=0)
    beta: float = Field(0.0, ge=0, description="KL to the stage's starting model")
    kl: Literal["k1", "k2", "k3"] = "k3"
    aggregation: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    scale: Literal["group", "batch", "none"] = "group"
    adv_eps: float = Field(1e-4, gt=0)
    positive_only: bool = False


LossConfig = Annotated[
    Union[NLLLoss, EAFTLoss, ConflictMaskedLoss, DFTLoss, PSFTLoss, GRPOLoss, TeacherKLLoss], Field(discriminator="kind")
]
ON_POLICY_LOSSES = ("grpo", "teacher_kl")


# --- what pulls the weights back ---------------------------------------------------------------------------------
class KLRefReg(_Strict):
    """β·KL(π_ref ‖ π), exact over the vocabulary, on the training (answer) tokens; π_ref = the stage's start."""

    kind: Literal["kl_ref"] = "kl_ref"
    weight: float = Field(0.1, gt=0)


class DistillReg(_Strict):
    """LwF: λ·T²·KL(π_prev ‖ π) at temperature T over every position of the input (prompt and answer)."""

    kind: Literal["distill"] = "distill"
    weight: float = Field(1.0, gt=0)
    temperature: float = Field(2.0, gt=0)


class L2SPReg(_Strict):
    """λ·Σ(θ − θ_ref)², θ_ref = the stage's starting weights."""

    kind: Literal["l2sp"] = "l2sp"
    weight: float = Field(1e-2, gt=0)


class EWCReg(_Strict):
    """λ/2·Σ F·(θ − θ*)², F the diagonal Fisher accumulated over earlier stages at their end weights θ*."""

    kind: Literal["ewc"] = "ewc"
    weight: float = Field(100.0, gt=0)
    fisher_samples: int = Field(128, ge=1, le=MAX_BATCH)


class SFTMixReg(_Strict):
    """CHORD-style (arXiv 2508.11408): the step's loss is (1 − μ_t)·GRPO + μ_t·SFT on ``batch_size`` of the task's
    reference answers; μ_t goes linearly from ``weight`` at the first step to ``weight_end`` at the last (fixed when
    ``weight_end`` is unset). For on_policy data with the grpo loss only."""

    kind: Literal["sft_mix"] = "sft_mix"
    weight: float = Field(0.5, ge=0, le=1)
    weight_end: float | None = Field(None, ge=0, le=1)
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)


RegularizerConfig = Annotated[Union[KLRefReg, DistillReg, L2SPReg, EWCReg, SFTMixReg], Field(discriminator="kind")]


class ReplayConfig(_Strict):
    """Mix replayed data into every batch: ``ratio`` of each batch from a buffer of earlier stages' reference data
    (``size`` examples per earlier stage, a seeded reservoir of its train split), and ``prior_ratio`` of it from
    the prior skills' own training data (the pretraining mixture: the "general data mix" or ptx of LLaMA-Factory
    and InstructGPT), which holds the prior skills from the first stage on."""

    ratio: float = Field(0.25, ge=0, lt=1)
    prior_ratio: float = Field(0.0, ge=0, lt=1)
    prior_tasks: list[str] = Field(default_factory=lambda: ["prior"], description="tasks or groups replayed by prior_ratio")
    size: int = Field(512, ge=1, le=MAX_BATCH)

    @field_validator("prior_tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        from retain import tasks as task_registry

        try:
            task_registry.resolve(v)
        except RetainError as err:
            raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _shares(self) -> "ReplayConfig":
        if self.ratio + self.prior_ratio <= 0 or self.ratio + self.prior_ratio >= 1:
            raise ValueError(f"ratio + prior_ratio must be in (0, 1), got {self.ratio} + {self.prior_ratio}")
        return self


class AdapterConfig(_Strict):
    """LoRA through peft. ``per_stage``: a fresh adapter every stage, merged into the weights at its end; otherwise
    one adapter trained across all stages (merged for evaluation only)."""

    kind: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1 << 16)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
        description="module names (each matched as a name's last part), or one regex a module's full name must match "
        "(peft's two forms): a VLM's language model alone is a regex, since its vision tower has gate/up/down_proj too",
    )
    per_stage: bool = True

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a regular expression ({err}): {v!r}") from None
        elif not v:
            raise ValueError("name at least one module")
        return v


class MethodConfig(_Strict):
    name: str = "custom"
    data: DataConfig = Field(default_factory=OfflineData)
    loss: LossConfig = Field(default_factory=NLLLoss)
    regularizers: list[RegularizerConfig] = Field(default_factory=list)
    replay: ReplayConfig | None = None
    adapter: AdapterConfig | None = None
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=100, lr=3e-4))
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="sequences per optimizer step (SFT family)")
    micro_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    micro_batch_tokens: int | None = Field(
        None, ge=1, le=MAX_BATCH, description="SFT family: length bucketing — sort each step's sequences by length and "
        "cut micro-batches of at most this many padded tokens (same examples and loss per step, less padding)",
    )
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="sampling length (default: the task's)")

    @model_validator(mode="after")
    def _parts_fit(self) -> "MethodConfig":
        on_policy = isinstance(self.data, OnPolicyData)
        if on_policy != (self.loss.kind in ON_POLICY_LOSSES):
            raise ValueError(
                f"loss.kind {self.loss.kind!r} does not fit data.kind {self.data.kind!r}: the grpo and teacher_kl "
                "losses need on_policy data and on_policy data needs one of them"
            )
        if on_policy and self.replay is not None:
            raise ValueError("replay is for the SFT family (offline/self/iterative data), not on_policy data")
        if on_policy and self.micro_batch_tokens is not None:
            raise ValueError("micro_batch_tokens (length bucketing) is for the SFT family; GRPO's micro-batches are "
                             "micro_batch_size rollout rows")
        mixes = [r.kind for r in self.regularizers if isinstance(r, SFTMixReg)]
        if mixes and not isinstance(self.loss, GRPOLoss):
            raise ValueError("regularizer sft_mix adds SFT to a GRPO step: it needs on_policy data and the grpo loss")
        others = [r.kind for r in self.regularizers if not isinstance(r, SFTMixReg)]
        if on_policy and others:  # the GRPO objective has its own pull-back (loss.beta); never ignore one
            raise ValueError(
                f"regularizers {others} are for the SFT family; GRPO's KL to the stage's "
                "start is loss.beta (regularizers with on_policy data would be silently ignored)"
            )
        if isinstance(self.loss, PSFTLoss) and self.data.kind == "iterative":
            raise ValueError("the psft loss reuses a batch for loss.updates_per_batch steps; iterative data resamples "
                             "under it (use offline or self data)")
        kinds = [r.kind for r in self.regularizers]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"regularizers repeat a kind: {kinds}")
        if self.adapter is not None and isinstance(self.loss, TeacherKLLoss) and self.loss.teacher == "ema":
            raise ValueError("an ema teacher follows the full weights, which an adapter keeps frozen")
        if self.adapter is not None and {"l2sp", "ewc"} & set(kinds):
            raise ValueError("regularizers l2sp/ewc anchor the full weights, which an adapter keeps frozen")
        every = self.train.checkpoint_every
        if on_policy and every and every % self.data.updates_per_batch:
            raise ValueError(
                f"train.checkpoint_every ({every}) must be a multiple of data.updates_per_batch "
                f"({self.data.updates_per_batch}): a checkpoint inside a rollout batch cannot resume exactly"
            )
        if isinstance(self.loss, PSFTLoss) and every and every % self.loss.updates_per_batch:
            raise ValueError(
                f"train.checkpoint_every ({every}) must be a multiple of loss.updates_per_batch "
                f"({self.loss.updates_per_batch}): a checkpoint inside a PSFT batch cannot resume exactly"
            )
        return self


_SFT_TRAIN = {"steps": 150, "lr": 3e-4}
_GRPO_TRAIN = {"steps": 60, "lr": 1e-4}

PRESETS: dict[str, dict[str, Any]] = {
    "sft": {"data": {"kind": "offline"}, "loss": {"kind": "nll"}, "train": _SFT_TRAIN},
    "grpo": {"data": {"kind": "on_policy"}, "loss": {"kind": "grpo"}, "train": _GRPO_TRAIN},
    "self_sft": {"data": {"kind": "self"}, "loss": {"kind": "nll"}, "train": _SFT_TRAIN},
    "iterative_sft": {"data": {"kind": "iterative"}, "loss": {"kind": "nll"}, "train": _SFT_TRAIN},
    "rl_sample_sft": {"data": {"kind": "self", "source_model": None}, "loss": {"kind": "nll"}, "train": _SFT_TRAIN},
    # Razor's clean test (SPEC §2.4): the same SFT on the answers the base model finds most / least likely
    "sft_likely": {"data": {"kind": "offline", "target": "likely"}, "loss": {"kind": "nll"}, "train": _SFT_TRAIN},
    "sft_unlikely": {"data": {"kind": "offline", "target": "unlikely"}, "loss": {"kind": "nll"}, "train": _SFT_TRAIN},
    "eaft": {"data": {"kind": "offline"}, "loss": {"kind": "eaft"}, "train": _SFT_TRAIN},
    "conflict_sft": {"data": {"kind": "offline"}, "loss": {"kind": "conflict_masked"}, "train": _SFT_TRAIN},
    "kl_sft": {"data": {"kind": "offline"}, "loss": {"kind": "nll"}, "regularizers": [{"kind": "kl_ref"}], "train": _SFT_TRAIN},
    "lwf": {"data": {"kind": "offline"}, "loss": {"kind": "nll"}, "regularizers": [{"kind": "distill"}], "train": _SFT_TRAIN},
    "replay": {"data": {"kind": "offline"}, "loss": {"kind": "nll"}, "replay": {}, "train": _SFT_TRAIN},
    "l2sp": {"data": {"kind": "offline"}, "loss": {"kind": "nll"}, "regularizers": [{"kind": "l2sp"}], "train": _SFT_TRAIN},
    "ewc": {"data": {"kind": "offline"}, "loss": {"kind": "nll"}, "regularizers": [{"kind": "ewc"}], "train": _SFT_TRAIN},
    "lora": {"data": {"kind": "offline"}, "loss": {"kind": "nll"}, "adapter": {}, "train": {"steps": 150, "lr": 2e-3}},
    "multitask": {"data": {"kind": "multitask"}, "loss": {"kind": "nll"}, "train": _SFT_TRAIN},
    # later work (SPEC §1, second table); retain.methods.catalog names each one's paper
    "dft": {"data": {"kind": "offline"}, "loss": {"kind": "dft"}, "train": _SFT_TRAIN},
    "sft_varied": {"data": {"kind": "offline", "prompts": "varied"}, "loss": {"kind": "nll"}, "train": _SFT_TRAIN},
    "psft": {"data": {"kind": "offline"}, "loss": {"kind": "psft"}, "train": _SFT_TRAIN},
    "grpo_positive": {"data": {"kind": "on_policy"}, "loss": {"kind": "grpo", "positive_only": True},
                      "train": _GRPO_TRAIN},
    "chord": {"data": {"kind": "on_policy"}, "loss": {"kind": "grpo"},
              "regularizers": [{"kind": "sft_mix", "weight": 0.5, "weight_end": 0.1}], "train": _GRPO_TRAIN},
    "opd": {"data": {"kind": "on_policy"}, "loss": {"kind": "teacher_kl", "teacher": "base"}, "train": _GRPO_TRAIN},
    "sdft": {"data": {"kind": "on_policy"}, "loss": {"kind": "teacher_kl", "teacher": "start",
                                                     "context": "demonstration", "direction": "forward"},
             "train": _GRPO_TRAIN},
    "sdft_live": {"data": {"kind": "on_policy"}, "loss": {"kind": "teacher_kl", "teacher": "live",
                                                          "context": "demonstration", "direction": "forward"},
                  "train": _GRPO_TRAIN},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` onto ``base``; a part whose ``kind`` changes is replaced whole, lists are replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        mergeable = isinstance(value, dict) and isinstance(out.get(key), dict)
        if mergeable and value.get("kind", out[key].get("kind")) == out[key].get("kind"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def method_config(spec: str | dict[str, Any] | MethodConfig, where: str = "method") -> MethodConfig:
    """A validated ``MethodConfig`` from a preset name, a dict naming a preset plus overrides, or a full dict.

    Errors are ``RetainError`` naming the field path (``where`` prefixes it, e.g. ``stages[1].method``).
    """
    if isinstance(spec, MethodConfig):
        return spec
    raw = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = raw.get("name", "custom")
    if not isinstance(name, str):
        raise RetainError(f"{where}.name: expected a method name, got {type(name).__name__}")
    if name != "custom" and name not in PRESETS:
        raise RetainError(f"{where}.name: unknown method {name!r} (methods: {', '.join(PRESETS)}, custom)")
    merged = _merge(PRESETS.get(name, {}), raw)
    try:
        return MethodConfig.model_validate(merged)  # not **merged: a YAML key may be a number or null
    except ValidationError as err:
        raise field_error(err, "", lambda loc: [where, *user_path(loc)]) from None


_TAGS = {"offline", "self", "iterative", "on_policy", "multitask", "nll", "eaft", "conflict_masked", "grpo",
         "kl_ref", "distill", "l2sp", "ewc", "dft", "psft", "teacher_kl", "sft_mix"}


def user_path(loc: tuple) -> list[str]:
    """pydantic's error location as the user wrote it: discriminated unions insert the tag (``data.on_policy.x``),
    which is not a key of the user's config, so it is dropped."""
    out: list[str] = []
    for i, part in enumerate(loc):
        prev = loc[i - 1] if i else None
        if isinstance(part, str) and part in _TAGS and (prev in ("data", "loss") or isinstance(prev, int)):
            continue
        out.append(str(part))
    return out
