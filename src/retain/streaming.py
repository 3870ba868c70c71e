"""Streaming mode: one pass over a non-stationary stream whose task boundaries the method does not see.

The stages' tasks follow each other (stage k covers its ``steps`` optimizer steps) but it is ONE training run:
one ``Trainer``, one AdamW whose state is never reset, one learning-rate schedule over the whole stream
(``steps`` = the sum of the stages'), and one reference model — the stream's initial model — for GRPO's KL,
kl_sft, LwF and L2-SP. Each stage gets its own objective (``build_objective`` with that stage's task, method and
seed ``seed·1000 + k``, as in batch mode, so stage 1 sees the same data in both modes); a dispatching objective
maps the global step to (stage, local step) and tags each micro-batch with the stage that made it. The model is
evaluated at step 0, every ``streaming.eval_every`` steps and at every stage boundary; boundary rows form the
accuracy matrix, so every batch-mode metric applies, and all rows together form the learning curve.

What needs boundaries is refused before anything is written (``validate_streaming`` asks each method part: replay
buffers, EWC and per-stage adapters say so); all stages must name the same method with the same ``train`` settings (``steps`` apart — and
``seed``/``checkpoint_every``, which the runner sets). Shared LoRA adapters are refused too for now: the
Trainer's mid-run checkpoints cannot resume a peft model.

Run directory::

    DIR/config.yaml                 the resolved experiment
    DIR/steps.jsonl                 the training log (global ``step``, ``stage``, ``stage_step``)
    DIR/stream/step_NNNNNN.json     one evaluation point: its row, and the shift of each stage ending there
    DIR/stream/checkpoint/          the Trainer's checkpoint (every ``eval_every`` steps; removed at the end)
    DIR/stages/k/model/             the model at the end of stage k (the "previous" model of stage k+1's shift)
    DIR/results.json                batch mode's keys + ``mode: streaming`` + ``stream`` (the learning curve)

Resuming: the Trainer restores model, optimizer, schedule and RNG from its checkpoint; evaluation points after
it are recomputed (overwritten). Evaluations run with the RNG state saved and restored, so they never change
what training draws. The per-stage objectives are rebuilt on restart; a step's data is seeded by (seed, step)
for offline, multitask and self-sampled data and for GRPO rollouts, so a resumed run equals an uninterrupted one.
Not exactly resumable: iterative SFT (it resamples its pairs from the model at the first step of each of its
epochs, and a resumed run resamples from the checkpointed model instead) and GRPO with ``updates_per_batch`` > 1
when a checkpoint falls inside a rollout batch — unless ``eval_every`` and the stage offsets are multiples of
``epoch_steps`` / ``updates_per_batch``. ``self`` data samples the stream's initial model (there is no "stage
start" in a stream). ``train_seconds`` is wall time, approximate across a resume.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retain import tasks as task_registry
from retain.config import ExperimentConfig
from retain.distributed import make_accelerator
from retain.errors import RetainError
from retain.files import append_jsonl, atomic_write_json, read_json, remove_dir, verify_manifest
from retain.methods.build import build_objective, streaming_refusals
from retain.methods.config import MethodConfig
from retain.methods.stage import MethodState, StageContext
from retain.models.adapters import frozen_copy
from retain.results import results_from_rows
from retain.rundir import (
    Progress,
    finished_results,
    json_or_none,
    keep_log,
    prepare_run_dir,
    quiet,
    remove_temp_leftovers,
    run_lock,
    save_model_dir,
    warn,
)
from retain.stage_eval import evaluate_row, measure_shift
from retain.train import Trainer, recover_checkpoint, rng_preserved, seed_everything

# TrainConfig fields that may differ between stages: the runner sets them (steps is summed)
_PER_STAGE_TRAIN = {"steps", "seed", "checkpoint_every"}


def _where(cfg: ExperimentConfig, i: int) -> str:
    return f"stages[{i}].method" if cfg.stages[i].method is not None else "method"


def validate_streaming(cfg: ExperimentConfig) -> list[MethodConfig]:
    """Refuse what a boundary-free stream cannot run (``RetainError`` naming the field); returns the stage methods."""
    methods = cfg.stage_methods()
    for i, m in enumerate(methods):
        for refusal in streaming_refusals(m, _where(cfg, i)):  # the parts say what needs task boundaries
            raise RetainError(f"streaming mode: {refusal}")
    first, where0 = methods[0], _where(cfg, 0)
    for i, m in enumerate(methods[1:], 1):
        where = _where(cfg, i)
        if m.name != first.name:
            raise RetainError(
                f"streaming mode: {where}.name {m.name!r} differs from {where0}.name {first.name!r} "
                "(a stream runs one method)"
            )
        a, b = first.train.model_dump(exclude=_PER_STAGE_TRAIN), m.train.model_dump(exclude=_PER_STAGE_TRAIN)
        for key in a:
            if a[key] != b[key]:
                raise RetainError(
                    f"streaming mode: {where}.train.{key} ({b[key]!r}) differs from {where0}.train.{key} "
                    f"({a[key]!r}): one optimizer and one schedule run the whole stream"
                )
    return methods


def stage_ends(cfg: ExperimentConfig) -> list[int]:
    """Global step at which each stage ends (cumulative steps)."""
    ends, total = [], 0
    for i in range(len(cfg.stages)):
        total += cfg.stage_method(i).train.steps
        ends.append(total)
    return ends


def eval_points(cfg: ExperimentConfig) -> list[int]:
    """Step 0, every ``eval_every`` steps, and every stage boundary; sorted, unique."""
    ends = stage_ends(cfg)
    every = cfg.streaming.eval_every
    return sorted({0, *range(every, ends[-1] + 1, every), *ends})


def _point_file(out: Path, step: int) -> Path:
    return out / "stream" / f"step_{step:06d}.json"


@dataclass
class Tagged:
    """A micro-batch and the stage whose objective made it."""

    stage: int
    micro: Any


class StreamObjective:
    """Dispatches global step → (stage k, local step) for ``batches``; ``loss`` goes to the objective that made the
    micro-batch."""

    def __init__(self, objectives: list[Any], ends: list[int]) -> None:
        self.objectives, self.ends = objectives, ends

    def locate(self, step: int) -> tuple[int, int]:
        """(stage, local step) of the 0-based optimizer step ``step``; stages without steps are skipped."""
        k = bisect.bisect_right(self.ends, step)
        if k >= len(self.ends):
            raise IndexError(f"step {step} is past the stream's {self.ends[-1]} steps")
        return k, step - (self.ends[k - 1] if k else 0)

    def batches(self, step: int) -> list[Tagged]:
        k, local = self.locate(step)
        return [Tagged(k, m) for m in self.objectives[k].batches(local)]

    def loss(self, model: torch.nn.Module, tagged: Tagged) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objectives[tagged.stage].loss(model, tagged.micro)


class _Stream:
    """The state of one streaming run: the models it compares against, and what each evaluation point writes."""

    def __init__(self, cfg: ExperimentConfig, out: Path, say: Progress, model, tokenizer, base) -> None:
        self.cfg, self.out, self.say = cfg, out, say
        self.model, self.tokenizer, self.base = model, tokenizer, base
        self.ends = stage_ends(cfg)
        self.points = set(eval_points(cfg))
        self.previous: tuple[int, torch.nn.Module] | None = None  # (stages finished, model at that boundary)
        self.train_seconds = 0.0
        self.last_logged: dict[str, Any] = {}  # the last logged loss/reward, for progress displays
        self.clock = time.perf_counter()

    def stage_of(self, done_steps: int) -> int:
        """0-based stage containing the step that brings the count to ``done_steps`` (≥ 1)."""
        return min(bisect.bisect_left(self.ends, done_steps), len(self.ends) - 1)

    def previous_model(self, finished: int) -> torch.nn.Module:
        """The model at the end of stage ``finished`` (0: the initial model)."""
        if finished == 0:
            return self.base
        if self.previous is not None and self.previous[0] == finished:
            return self.previous[1]
        from retain.models.loading import load_model

        model = load_model(self.out / "stages" / str(finished) / "model", dtype=self.cfg.dtype)[0]
        model.to(next(self.model.parameters()).device)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def on_step(self, step: int, model: torch.nn.Module) -> None:
        self.train_seconds += time.perf_counter() - self.clock
        k = self.stage_of(step)
        local = step - (self.ends[k - 1] if k else 0)
        self.say("step", {"stage": k + 1, **self.last_logged, "step": local, "global_step": step})
        if step in self.points:
            self.evaluate_point(step, model)
            if step in self.ends and step < self.ends[-1]:
                self.start_stage(self.stage_of(step + 1))
        self.clock = time.perf_counter()

    def evaluate_point(self, step: int, model: torch.nn.Module) -> None:
        """Evaluate ``model`` (the model after ``step`` optimizer steps); at a boundary also the shift, and save it."""
        cfg = self.cfg
        finishing = [k for k, end in enumerate(self.ends) if end == step]
        # the 1-based stage whose task the model was last trained on (0: the initial model)
        stage = finishing[-1] + 1 if finishing else (self.stage_of(step) + 1 if step else 0)
        self.say("eval" if finishing or step == 0 else "stream_eval", {"stage": stage, "step": step})
        boundaries = []
        with rng_preserved():
            row = evaluate_row(model, self.tokenizer, cfg)
            for k in finishing:
                previous = self.previous_model(k)
                shift = measure_shift(self.base, previous, model, self.tokenizer, cfg.stages[k].task, cfg, k + 1)
                save_model_dir(model, self.tokenizer, self.out / "stages" / str(k + 1) / "model")
                self.previous = (k + 1, frozen_copy(model))
                boundaries.append({"stage": k + 1, "task": cfg.stages[k].task, "shift": shift})
        atomic_write_json(_point_file(self.out, step), {
            "step": step, "stage": stage, "row": row, "boundaries": boundaries,
            "train_seconds": round(self.train_seconds, 2),
        })
        for b in boundaries:
            self.say("stage_done", {"stage": b["stage"], "task": b["task"], "row": row})

    def start_stage(self, k: int) -> None:
        method = self.cfg.stage_method(k)
        self.say("stage_start", {"stage": k + 1, "task": self.cfg.stages[k].task, "method": method.name,
                                 "steps": method.train.steps})

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        k = self.stage_of(max(1, step))
        local = step - (self.ends[k - 1] if k else 0)
        rest = {key: v for key, v in record.items() if key != "step"}
        append_jsonl(self.out / "steps.jsonl", {"stage": k + 1, "task": self.cfg.stages[k].task, "step": step,
                                                "stage_step": local, **rest})
        self.last_logged = {key: rest[key] for key in ("loss", "reward") if key in rest}
        self.say("step", {"stage": k + 1, **rest, "step": local, "global_step": step})


def run_streaming(cfg: ExperimentConfig, out: str | Path, say: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) ``cfg`` as one stream into ``out``; returns the results also written to ``out/results.json``."""
    methods = validate_streaming(cfg)  # before anything exists on disk
    out = Path(out)
    say = say or quiet
    model, tokenizer = cfg.load_model()  # dtype, gradient checkpointing, device
    with run_lock(out):
        prepare_run_dir(cfg, out)
        if (finished := finished_results(out)) is not None:
            return finished
        remove_temp_leftovers(out)
        base = frozen_copy(model)  # the reference of every stage, and the shift's π0
        stream = _Stream(cfg, out, say, model, tokenizer, base)
        checkpoint = out / "stream" / "checkpoint"
        _check_resume_point(cfg, out, checkpoint, say)
        if not isinstance(json_or_none(_point_file(out, 0)), dict):
            stream.evaluate_point(0, model)

        seed = cfg.stage_seed(0)
        seed_everything(seed)
        state = MethodState()
        objectives = []
        for k, method in enumerate(methods):
            task_name = cfg.stages[k].task
            ctx = StageContext(
                model=model, reference=base, tokenizer=tokenizer, task_name=task_name,
                task=task_registry.get(task_name), stage_index=k, seen_tasks=cfg.stage_tasks()[:k],
                seed=cfg.stage_seed(k), state=state, engine=cfg.engine, log=stream.log,
            )
            objectives.append(build_objective(method, ctx))
        ends = stream.ends
        objective = StreamObjective(objectives, ends)
        train_cfg = methods[0].train.model_copy(
            update={"steps": ends[-1], "seed": seed, "checkpoint_every": cfg.streaming.eval_every}
        )
        trainer = Trainer(model, objective, train_cfg, checkpoint_dir=checkpoint, log=stream.log,
                          on_step=stream.on_step, accelerator=make_accelerator(cfg.device, cfg.mixed_precision))
        resumed = trainer.step  # steps after the checkpoint are redone (all of them at 0): their records go
        keep_log(out, lambda r: r.get("step", 0) <= resumed)
        if trainer.step > 0:  # resumed: the checkpoint's own point may not have been written before the kill
            done = [p for p in sorted(stream.points) if p <= trainer.step and _point_file(out, p).exists()]
            if done:
                stream.train_seconds = read_json(_point_file(out, done[-1])).get("train_seconds", 0.0)
            if trainer.step in stream.points and not _point_file(out, trainer.step).exists():
                stream.evaluate_point(trainer.step, trainer.unwrapped)
        if trainer.step < ends[-1]:
            stream.start_stage(objective.locate(trainer.step)[0])
        stream.clock = time.perf_counter()
        trainer.run()
        results = collect_stream_results(cfg, out)
        atomic_write_json(out / "results.json", results)
        remove_dir(checkpoint)
        return results


def _check_resume_point(cfg: ExperimentConfig, out: Path, checkpoint: Path, say: Progress) -> None:
    """Make the checkpoint a resume can trust, or none. A damaged checkpoint is dropped (the older one, if intact,
    is taken). What the resume builds on must be intact: every evaluation point before the checkpoint's step, and
    the model of every stage that ended there (a boundary's model is written before its point). If one is not, the
    checkpoint is dropped and the stream redone from its start; the checkpoint's own point, which the resume
    rewrites when it is missing, is removed when damaged. Each problem is reported."""
    step, problems = recover_checkpoint(checkpoint)
    for problem in problems:
        warn(out, say, f"the stream's checkpoint is damaged ({problem}); not used", kind="corrupt_checkpoint",
             problem=problem)
    if not step:
        return
    ends = stage_ends(cfg)
    for p in eval_points(cfg):
        if p > step or (p == step and not _point_file(out, p).exists()):
            continue
        problem = None if isinstance(json_or_none(_point_file(out, p)), dict) else f"{_point_file(out, p)}: unreadable"
        for k, end in enumerate(ends):
            if end == p and problem is None:
                problem = verify_manifest(out / "stages" / str(k + 1) / "model")
        if problem is None:
            continue
        if p == step:
            warn(out, say, f"{problem}; evaluation point {p} is redone", kind="corrupt_point", problem=problem)
            _point_file(out, p).unlink(missing_ok=True)
        else:
            warn(out, say, f"{problem}; the stream is redone from its start", kind="corrupt_stream", problem=problem)
            remove_dir(checkpoint)
            return


def collect_stream_results(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Assemble results.json from the evaluation points (pure reading)."""
    eval_tasks = cfg.eval_tasks()
    ends = stage_ends(cfg)
    steps = eval_points(cfg)
    points = {s: read_json(_point_file(out, s)) for s in steps}
    rows = [points[0]["row"]] + [points[e]["row"] for e in ends]
    by_stage = {b["stage"]: b for s in set(ends) for b in points[s]["boundaries"]}
    stage_files = [{"shift": by_stage[k + 1]["shift"]} for k in range(len(cfg.stages))]
    cumulative = [0.0] + [points[e]["train_seconds"] for e in ends]
    train_seconds = [round(b - a, 2) for a, b in zip(cumulative, cumulative[1:])]
    return {
        **results_from_rows(cfg, rows, stage_files, train_seconds),
        "mode": "streaming",
        "stream": {
            "eval_every": cfg.streaming.eval_every,
            "boundaries": ends,
            "steps": steps,
            "stage": [points[s]["stage"] for s in steps],
            "rows": [[points[s]["row"][c]["accuracy"] for c in eval_tasks] for s in steps],
        },
    }
