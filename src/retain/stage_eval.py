"""What a run measures of a model: one evaluation row over the configured columns (greedy accuracy per item, the
selection and test halves, pass@K, the answer NLL of the ``eval.nll`` columns), the starting model's row (shared
with other runs through :mod:`retain.eval_cache`), the in-stage checkpoint points of a stage, and the KL / weight
shift at a stage's end. Shared by the batch runner and streaming mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from retain import distributed
from retain import tasks as task_registry
from retain.config import LM_EVAL_PREFIX, ExperimentConfig
from retain.eval_cache import cached_row, describe, stored_row
from retain.evaluate import DEFAULT_MAX_NEW_TOKENS, answer_nll
from retain.files import atomic_write_json, fault_point, read_json
from retain.metrics.lmeval import lm_eval_cells
from retain.metrics.shift import kl_shift, weight_l2
from retain.models.adapters import frozen_copy
from retain.rundir import Progress, json_or_none
from retain.train import rng_preserved


def eval_seed(cfg: ExperimentConfig) -> int:
    """The seed that orders the evaluation prompts: ``eval.seed`` when fixed, else the run's seed."""
    return cfg.seed if cfg.eval.seed is None else cfg.eval.seed


def evaluate_row(model, tokenizer, cfg: ExperimentConfig, columns: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """One evaluation row: greedy accuracy (per item, and on the selection and test halves) of every column, pass@K
    when asked, and the answer NLL of the ``eval.nll`` columns. ``columns``: a subset (the in-stage checkpoints')."""
    kind = cfg.kind()
    evaluate_column = kind.evaluator(model, tokenizer, cfg.engine)  # a VLM's: visual columns with their pictures
    seed, nll = eval_seed(cfg), set(cfg.nll_columns())
    row = {}
    wanted = columns or cfg.eval_tasks()
    general = [c for c in wanted if c.startswith(LM_EVAL_PREFIX)]  # one lm-evaluation-harness call scores these
    for column in wanted:
        if column in general:
            continue
        fault_point("eval")
        name, _, split = column.partition("@")
        n = cfg.eval.count(column)
        row[column] = evaluate_column(name, n=n, samples=cfg.eval.samples, split=split or "test", seed=seed)
        if column in nll:
            row[column].update(answer_nll(model, tokenizer, name, n=n, split=split or "test", seed=seed,
                                          encode=kind.encode))
    if general:
        row.update(lm_eval_cells(model, tokenizer, cfg.eval.lm_eval, general, seed))
    return row


def eval_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything besides the weights that an evaluation row depends on (the key of a shared row)."""
    return {"columns": cfg.eval_tasks(), "n": {c: cfg.eval.count(c) for c in cfg.eval_tasks()},
            "samples": cfg.eval.samples, "seed": eval_seed(cfg), "nll": cfg.nll_columns(),
            "engine": cfg.engine, "device": str(distributed.train_device(cfg.device)), "dtype": cfg.dtype,
            "mixed_precision": cfg.mixed_precision,
            **({"lm_eval": cfg.eval.lm_eval.model_dump(mode="json")} if cfg.eval.lm_eval else {})}


class StartingRow:
    """A batch run's ``DIR/stages/0/eval.json``, the row of the model before any stage: evaluated when it is missing,
    unless the shared evaluation cache ``eval_cache`` holds it (:mod:`retain.eval_cache`)."""

    def __init__(self, cfg: ExperimentConfig, out: Path, eval_cache: str | Path | None) -> None:
        self.cfg, self.cache, self.path = cfg, eval_cache, out / "stages" / "0" / "eval.json"
        self.settings = eval_settings(cfg)
        self.missing = not isinstance(json_or_none(self.path), dict)
        self.description: dict[str, Any] | None = None  # the cache key's inputs, its weight digest read once

    def evaluates(self, model) -> bool:
        """Whether :meth:`write` evaluates ``model`` (the other ranks of a multi-process run evaluate exactly then)."""
        return self.missing and stored_row(self.cache, model, self.settings, self._described(model)) is None

    def write(self, model, tokenizer, say: Progress) -> None:
        if not self.missing:
            return
        say("eval", {"stage": 0})
        row, _ = cached_row(self.cache, model, self.settings, lambda: evaluate_row(model, tokenizer, self.cfg),
                            self._described(model))
        atomic_write_json(self.path, row)

    def _described(self, model) -> dict[str, Any] | None:
        if self.cache is not None and self.description is None:
            self.description = describe(model, self.settings)
        return self.description


class StagePoints:
    """The in-stage checkpoint evaluations of one stage (``eval.checkpoints`` > 1), each kept as
    ``stages/k/points/<step>.json`` when written so a stage resumed from a mid-stage checkpoint keeps the points it
    had; ``on_step`` is the Trainer's hook. The evaluation runs with the training RNG state saved and restored, so
    checkpoints change nothing about training. Without a directory (a rank > 0) it evaluates and writes nothing."""

    def __init__(self, cfg: ExperimentConfig, tokenizer, stage_dir: Path | None, steps: int, say: Progress) -> None:
        self.cfg, self.tokenizer, self.dir, self.say = cfg, tokenizer, stage_dir, say
        self.steps = set(cfg.eval.checkpoint_steps(steps)) - {steps}  # the stage's end is its row
        self.columns = cfg.checkpoint_columns()

    def keep_until(self, step: int) -> None:
        """Drop the points after ``step`` (a resumed stage recomputes them)."""
        if self.dir is None or not (self.dir / "points").is_dir():
            return
        for path in (self.dir / "points").glob("*.json"):
            if not path.stem.isdigit() or int(path.stem) > step:
                path.unlink()

    def on_step(self, step: int, model: torch.nn.Module) -> None:
        if step not in self.steps:
            return
        with rng_preserved():
            model.eval()
            row = evaluate_row(model, self.tokenizer, self.cfg, self.columns)
        if self.dir is not None:
            atomic_write_json(self.dir / "points" / f"{step}.json", {"step": step, "row": row})
        self.say("checkpoint_eval", {"step": step})

    def resume_at(self, step: int, model: torch.nn.Module, checkpoint_dir: Path) -> None:
        """A stage resumed from its mid-stage checkpoint at ``step``: the Trainer saves a checkpoint before the hook
        runs, so a kill in between leaves that step's point unwritten; it is evaluated from the checkpoint's weights."""
        if step not in self.steps or self.dir is None or (self.dir / "points" / f"{step}.json").exists():
            return
        from safetensors.torch import load_model

        at_step = frozen_copy(model)
        load_model(at_step, str(checkpoint_dir / "model.safetensors"))
        self.on_step(step, at_step)

    def collected(self) -> list[dict[str, Any]]:
        if self.dir is None or not (self.dir / "points").is_dir():
            return []
        points = [read_json(p) for p in (self.dir / "points").glob("*.json") if p.stem.isdigit()]
        return sorted(points, key=lambda p: p["step"])


def measure_shift(base, previous, model, tokenizer, task_name: str, cfg: ExperimentConfig, stage: int) -> dict[str, Any]:
    """Stage ``stage``'s shift: weight distances from the base and the previous model and, unless ``shift.prompts``
    is 0, the sampled KL from each on the stage task's held-out prompts."""
    out: dict[str, Any] = {"weight_l2": weight_l2(base, model), "weight_l2_from_previous": weight_l2(previous, model)}
    if cfg.shift.prompts == 0:
        return out
    task = task_registry.get(task_name)
    prompts = [e.prompt for e in task.examples("test", cfg.shift.prompts, seed=cfg.seed)]
    max_new = getattr(task, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    seed = cfg.shift_seed(stage)
    engine, pictures = cfg.rollout_engine(), cfg.kind().pictures  # over the text tokens given the picture
    out["from_base"] = kl_shift(base, model, tokenizer, prompts, cfg.shift.samples, max_new, seed, engine, pictures)
    if stage == 1:  # the first stage's previous model is the base: the same measurement, not made twice
        out["from_previous"] = out["from_base"]
    else:
        out["from_previous"] = kl_shift(previous, model, tokenizer, prompts, cfg.shift.samples, max_new, seed, engine,
                                        pictures)
    return out
