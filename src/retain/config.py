"""Experiment configuration (YAML), validated before anything runs or is written.

```yaml
name: quick
model: base                 # 'base' (embedded), a HF model directory, or a hub name; 'vlm' (the embedded
                            # vision-language model), a local VLM directory saved with its processor or a hub VLM:
                            # visual stage tasks and columns (retain.kind, retain.vision.kind)
model_kind: auto            # auto (from the model's config.json: local, or in the HF cache; never downloaded) |
                            # text | vlm: say it for a hub model not yet downloaded (auto takes it as text)
seed: 0
mode: batch                 # batch: stage after stage | streaming: one pass, boundaries hidden from the method
method: {name: sft, train: {lr: 3.0e-4}}   # default for every stage (a preset name, or a dict)
stages:
  - {task: gpoints, steps: 100}            # steps overrides method.train.steps; method: overrides per stage
  - {task: kg}
eval:
  tasks: [auto]             # 'auto' = every stage task, its OOD split where it has one, and the prior skills;
                            # or names: 'kg', 'kg@ood', 'prior', 'sequence'
  n: 128                    # prompts per task
shift: {prompts: 64, samples: 1}
engine: kv_cache            # rollout engine: kv_cache (default; old name cached) | hf | vllm (GPU, retain[vllm];
                            # a VLM's pictures too)
dtype: fp32                 # weights as loaded: fp32 | bf16 | fp16 | auto (the checkpoint's own dtype)
mixed_precision: "no"       # no | bf16 | fp16: autocast forward over fp32 weights (accelerate's mixed precision)
gradient_checkpointing: false   # recompute activations in the backward (large models, long sequences)
device: auto                # auto (this process's GPU if any, else CPU) | cpu | cuda
```
Every error is a ``RetainError`` naming the field path (``stages[1].task``), raised before a run directory exists.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from retain import tasks as task_registry
from retain.errors import RetainError
from retain.methods.config import MethodConfig, method_config, user_path
from retain.rollout import ENGINE_ALIASES
from retain.yaml_input import field_error, read_yaml


logger = logging.getLogger("retain")
LM_EVAL_PREFIX = "lm_eval:"  # evaluation columns scored by lm-evaluation-harness (eval.lm_eval)
MAX_SAMPLES = 4096  # samples per prompt: beyond this a typo, not an experiment (each one is generated and kept)
MAX_SEED = 2**32 - 1  # seeds derived from it (seed·1000 + stage, then ·1_000_003 + step) stay within int64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    """A task defined by a dataset (``datasets: {NAME: ...}``), named NAME in ``stages`` and ``eval.tasks``: the
    file's prompts and answers, the verifier that scores accuracy, and optionally the reward GRPO trains on — a
    function in TRL's signature (:mod:`retain.tasks.rewards`), imported because this field names it."""

    path: str = Field(description=".jsonl, .parquet or a saved HF dataset directory")
    reward: str | None = Field(None, description="package.module:function, called as TRL's GRPOTrainer calls it")
    verifier: Literal["exact", "numeric", "regex"] = "exact"
    pattern: str | None = None
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    split_column: str = "split"
    conversational: bool = Field(False, description="hand the reward chat messages, as TRL does for a chat dataset")


DATASET_NAME = re.compile(r"^[A-Za-z_][\w.-]{0,63}$")


def define_dataset(name: str, spec: DatasetSpec) -> None:
    """Register ``name`` as a task for this process, built (file read, reward imported) now so a bad dataset or
    reward is an error of the config, naming ``datasets.NAME``."""
    from retain.tasks.dataset import DatasetTask
    from retain.tasks.rewards import import_reward, qualified_name

    where = f"datasets.{name}"
    if not DATASET_NAME.match(name):
        raise RetainError(f"{where}: a task name is letters, digits, '_', '-' or '.' (at most 64), got {name!r}")
    fn = import_reward(spec.reward, f"{where}.reward") if spec.reward is not None else None
    try:
        task = DatasetTask.from_path(
            spec.path, spec.verifier, spec.prompt_column, spec.answer_column, spec.pattern, name, spec.split_column,
            fn, qualified_name(fn, spec.reward) if fn else None, spec.conversational,
        )
    except RetainError as err:
        raise RetainError(f"{where}: {err}") from None
    try:
        task_registry.define(name, spec.model_dump(), lambda: task)
    except RetainError as err:
        raise RetainError(f"{where}: {err}") from None


class StageConfig(_Strict):
    task: str
    steps: int | None = Field(None, ge=0, description="optimizer steps (overrides method.train.steps)")
    method: dict[str, Any] | str | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        try:
            task_registry.get(v)
        except RetainError as err:
            raise ValueError(str(err)) from None
        return v


class LMEvalConfig(_Strict):
    """lm-evaluation-harness tasks as columns of the accuracy matrix (``eval.lm_eval``), scored on the in-memory
    model before the first stage and after each (:mod:`retain.metrics.lmeval`). A column is ``lm_eval:<task>``; its
    accuracy is ``metric`` of the task's scores (default: the first of ``acc``, ``exact_match``, ``acc_norm``)."""

    tasks: list[str | dict[str, Any]] = Field(min_length=1, description="lm_eval task names or task configs")
    limit: int | None = Field(None, ge=1, description="documents per task (null: all)")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool = False
    metric: str | None = None

    @field_validator("tasks")
    @classmethod
    def _named(cls, v: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        for i, task in enumerate(v):
            name = task.get("task") if isinstance(task, dict) else task
            if not isinstance(name, str) or not name:
                raise ValueError(f"tasks[{i}]: a task config needs a 'task' name")
        return v

    def columns(self) -> list[str]:
        return [f"{LM_EVAL_PREFIX}{t['task'] if isinstance(t, dict) else t}" for t in self.tasks]


class EvalConfig(_Strict):
    """What is evaluated before the first stage, inside each stage and after it (SPEC §3.2)."""

    tasks: list[str] = Field(default_factory=lambda: ["auto"])
    n: int | None = Field(128, ge=1, description="prompts per evaluation task (null: the whole split)")
    n_per_task: dict[str, int | None] = Field(
        default_factory=dict, description="prompts for named columns or tasks, overriding n (reverse: 300, say)"
    )
    samples: int = Field(0, ge=0, le=MAX_SAMPLES, description="K for pass@K (0: greedy accuracy only)")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="orders the prompts (and so the selection/test halves); null: the run's "
        "seed. Fix it so every run and seed is evaluated on the same prompts",
    )
    checkpoints: int = Field(1, ge=1, le=1000, description="evaluations per stage, evenly spaced; the last at its end")
    checkpoint_tasks: list[str] | None = Field(
        None, description="columns evaluated at the in-stage checkpoints (null: every column)"
    )
    nll: list[str] = Field(
        default_factory=list, description="tasks or groups ('prior') whose teacher-forced answer NLL is read with "
        "their accuracy",
    )
    lm_eval: LMEvalConfig | None = Field(None, description="lm-evaluation-harness tasks as further columns")

    @field_validator("n_per_task")
    @classmethod
    def _positive_counts(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        for key, count in v.items():
            if count is not None and count < 1:
                raise ValueError(f"n_per_task[{key!r}]: expected at least 1 prompt, got {count}")
        return v

    def count(self, column: str) -> int | None:
        """Prompts of one column: its own entry, its task's, else ``n``."""
        for key in (column, column.partition("@")[0]):
            if key in self.n_per_task:
                return self.n_per_task[key]
        return self.n

    def checkpoint_steps(self, steps: int) -> list[int]:
        """Steps after which a stage is evaluated: ``checkpoints`` evenly spaced, the stage's last step included."""
        if steps == 0:
            return [0]
        return sorted({max(1, round(steps * i / self.checkpoints)) for i in range(1, self.checkpoints + 1)})


class ShiftConfig(_Strict):
    prompts: int = Field(64, ge=0, description="held-out prompts of each stage's task (0: skip KL measurement)")
    samples: int = Field(1, ge=1, le=MAX_SAMPLES, description="samples per prompt")


class StreamingConfig(_Strict):
    eval_every: int = Field(50, ge=1, description="evaluate every N optimizer steps")


class ExperimentConfig(_Strict):
    name: str = "experiment"
    model: str = "base"
    model_kind: Literal["auto", "text", "vlm"] = Field(
        "auto", description="auto: a VLM when the model's config.json (a local directory's, or a hub model's in the "
        "local Hugging Face cache) has a vision tower, else text; say text or vlm for a hub model not yet downloaded",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    mode: Literal["batch", "streaming"] = "batch"
    method: dict[str, Any] | str = "sft"
    # before stages: the names it defines are what stages and eval.tasks then validate against
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict, description="tasks defined by a dataset")
    stages: list[StageConfig] = Field(min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    shift: ShiftConfig = Field(default_factory=ShiftConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    engine: Literal["kv_cache", "hf", "vllm"] = "kv_cache"
    trust_remote_code: bool = False
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="dtype of the weights as loaded (bf16 halves memory; small updates round away)"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast the forward over fp32 weights (accelerate); the usual way to train in bf16"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: this process's GPU if any, else CPU")
    # where the run is watched, not what it is: left out of the resolved config, so a run resumes under other trackers
    report_to: list[Literal["tensorboard", "mlflow", "trackio", "wandb"]] = Field(
        default_factory=list, exclude=True, description="trackers (retain.tracking)")
    _methods: list[MethodConfig] = PrivateAttr(default_factory=list)  # each stage's, resolved once
    _kind: Any = PrivateAttr(None)  # the model's kind (retain.kind), chosen once

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_alias(cls, v: Any) -> Any:
        return ENGINE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("datasets")
    @classmethod
    def _define_datasets(cls, v: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        for name, spec in v.items():
            define_dataset(name, spec)
        return v

    @model_validator(mode="after")
    def _methods_and_eval_tasks_resolve(self) -> "ExperimentConfig":
        self._methods = [self._resolve_method(i) for i in range(len(self.stages))]  # raises naming stages[i].method
        self.eval_tasks()
        self.checkpoint_columns()
        self.nll_columns()
        self._check_model_kind()
        if self.report_to and self.mode == "streaming":
            raise RetainError("report_to: trackers follow batch runs (stage after stage); streaming mode logs to "
                              "steps.jsonl only")
        return self

    def _resolve_method(self, i: int) -> MethodConfig:
        stage = self.stages[i]
        where = f"stages[{i}].method" if stage.method is not None else "method"
        cfg = method_config(stage.method if stage.method is not None else self.method, where)
        if stage.steps is not None:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": stage.steps})})
        return cfg

    def kind(self):
        """What kind of model ``model`` is (``retain.kind``), as ``model_kind`` says: declared, or under auto a
        vision-language model when its config.json (``vlm``, a local directory, or a hub model's in the local Hugging
        Face cache) has a vision tower, else a text causal LM. A hub name not in the cache is taken as text and says
        so in one line: validation never downloads, and the visual tasks then refuse it naming model_kind."""
        if self._kind is None:
            from retain.kind import model_kind, undetected

            self._kind = model_kind(self.model, self.model_kind)
            if self.model_kind == "auto" and undetected(self.model):
                logger.warning("model %r is a hub name not in the local Hugging Face cache: taken as a text model "
                               "(model_kind: vlm if it is a vision-language model)", self.model)
        return self._kind

    def _check_model_kind(self) -> None:
        """What the model's kind cannot run, refused before anything runs: pictures for a text model; for a VLM,
        the methods that cannot take pictures, streaming and lm-eval columns (text-model paths)."""
        kind = self.kind()
        if kind.name == "text":
            shown = [(f"stages[{i}].task", s.task) for i, s in enumerate(self.stages)] + [
                ("eval.tasks", c.partition("@")[0]) for c in self.eval_tasks() if not c.startswith(LM_EVAL_PREFIX)]
            for where, task in shown:
                if getattr(task_registry.get(task), "modality", "text") == "image":
                    how = ("model_kind: vlm for a hub VLM not yet downloaded" if self.model_kind == "auto" else
                           "model_kind: auto or vlm")
                    raise RetainError(f"{where}: task {task!r} shows pictures, and model {self.model!r} is a text "
                                      f"model (use model: vlm, a VLM directory saved with its processor, or {how})")
            return
        for i in range(len(self.stages)):
            said = kind.refusal(self._methods[i], f"stages[{i}].method" if self.stages[i].method else "method")
            if said:
                raise RetainError(said)
        for where, wrong, why in (
            ("mode", self.mode == "streaming", "streaming mode trains text models only"),
            ("eval.lm_eval", self.eval.lm_eval is not None, "lm-evaluation-harness columns score text models only"),
            ("trust_remote_code", self.trust_remote_code, "retain loads VLMs with transformers' own classes only"),
        ):
            if wrong:
                raise RetainError(f"{where}: model {self.model!r} is a vision-language model; {why}")

    def rollout_engine(self):
        """The engine choice the method parts, shift and checks sample with: ``engine`` for a text model, the VLM's
        own for a vision-language model (through vLLM with ``engine: vllm``, else its processor and ``generate``)."""
        return self.kind().engine(self.engine)

    def stage_method(self, i: int) -> MethodConfig:
        """Stage ``i``'s method, typed: the preset or dict of ``stages[i].method`` (else ``method``) resolved once,
        with the stage's ``steps``."""
        return self._methods[i]

    def stage_methods(self) -> list[MethodConfig]:
        return list(self._methods)

    def stage_seed(self, i: int) -> int:
        """The seed of stage ``i`` (0-based): its data, sampling and shift measurement; the same in every mode."""
        return self.seed * 1000 + i

    def shift_seed(self, stage: int) -> int:
        """The seed of the KL-shift samples after stage ``stage`` (1-based)."""
        return self.seed * 1000 + stage

    def load_model(self, spec: str | Path | None = None):
        """``(model, tokenizer)`` of ``spec`` (default: ``model``) as this config asks: dtype, gradient
        checkpointing, trust_remote_code, on this process's device."""
        from retain.distributed import train_device

        return self.kind().load(
            self.model if spec is None else spec, trust_remote_code=self.trust_remote_code, dtype=self.dtype,
            gradient_checkpointing=self.gradient_checkpointing, device=train_device(self.device),
        )

    def stage_tasks(self) -> list[str]:
        return [s.task for s in self.stages]

    def eval_tasks(self) -> list[str]:
        """Evaluation columns, ``task`` (its test split) or ``task@split``; stage tasks first, in stage order."""
        out: list[str] = []

        def add(item: str) -> None:
            if item not in out:
                out.append(item)

        for i, item in enumerate(self.eval.tasks):
            if item == "auto":
                for t in self.stage_tasks():
                    add(t)
                for t in self.stage_tasks():
                    if "ood" in task_registry.get(t).splits:
                        add(f"{t}@ood")
                for t in task_registry.GROUPS["prior"]:
                    add(t)
                continue
            for column in _columns_of(item, f"eval.tasks[{i}]"):
                add(column)
        for t in self.stage_tasks():  # the accuracy matrix needs every stage task on its test split
            if t not in out:
                out.insert(0, t)
        for column in self.eval.lm_eval.columns() if self.eval.lm_eval else []:
            add(column)
        return out

    def checkpoint_columns(self) -> list[str]:
        """The columns evaluated inside a stage: ``eval.checkpoint_tasks`` resolved like ``eval.tasks`` (every
        stage task always among them), in ``eval_tasks`` order."""
        if self.eval.checkpoint_tasks is None:
            return self.eval_tasks()
        wanted = set(self._resolve_columns(self.eval.checkpoint_tasks, "eval.checkpoint_tasks")) | set(self.stage_tasks())
        return [c for c in self.eval_tasks() if c in wanted]

    def nll_columns(self) -> list[str]:
        """Columns whose answer NLL is read: the tasks ``eval.nll`` names, among the evaluated columns."""
        names = set(self._resolve_columns(self.eval.nll, "eval.nll"))
        return [c for c in self.eval_tasks() if c in names]

    def _resolve_columns(self, items: list[str], where: str) -> list[str]:
        out = [column for i, item in enumerate(items) for column in _columns_of(item, f"{where}[{i}]")]
        missing = [c for c in out if c not in self.eval_tasks()]
        if missing:
            raise RetainError(f"{where}: {', '.join(missing)} not among the evaluated columns (eval.tasks)")
        return out


def _columns_of(item: str, where: str) -> list[str]:
    """The evaluation columns one named item stands for: ``task``, ``group`` or ``task@split`` (``@test`` is the
    plain task name); an unknown task or a split the task lacks is a ``RetainError`` naming ``where``."""
    name, _, split = item.partition("@")
    try:
        names = task_registry.resolve(name)
    except RetainError as err:
        raise RetainError(f"{where}: {err}") from None
    for t in names:
        if split and split not in task_registry.get(t).splits:
            raise RetainError(f"{where}: task {t!r} has no split {split!r}")
    return [f"{t}@{split}" if split and split != "test" else t for t in names]


MAX_CONFIG_NODES = 100_000  # values in a config, aliases expanded: a YAML "billion laughs" is refused, not expanded


def _check_size(data: Any, source: str) -> None:
    """Count the config's values as validation would visit them (YAML aliases once per use); refuse past the limit."""
    budget, stack = MAX_CONFIG_NODES, [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise RetainError(f"{source}: more than {MAX_CONFIG_NODES:,} values (YAML aliases expanded): not a config")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def parse_experiment(data: Any, source: str = "config") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise RetainError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    _check_size(data, source)
    try:
        return ExperimentConfig.model_validate(data)  # not **data: a YAML key may be a number or null
    except ValidationError as err:
        raise field_error(err, source, user_path, indices=True) from None
    except RetainError as err:
        raise RetainError(f"{source}: {err}") from None


def load_experiment(path: str | Path) -> ExperimentConfig:
    return parse_experiment(read_yaml(path, "config"), str(path))
