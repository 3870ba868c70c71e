"""The continual runner: stages in order, a full evaluation before the first and after each, the KL shift, and a
run directory that describes itself and resumes after the last finished stage (its files and its resume:
:mod:`retain.rundir`). Every file is written atomically, so a crash at any moment leaves either the previous state
or the next one; model and state directories carry a ``manifest.json`` of their files' sha256. The same config,
seed, machine and thread count give bit-identical results, resumed or not.

Under a multi-process launcher every rank runs the same stage loop (:func:`run_stages`) — the same stages, seeds
and evaluations, so the ranks stay in step in the Trainer's collectives — and only the main rank writes. The runner
does not know which method it runs, nor which kind of model (``cfg.kind()``, ``retain.kind``: a text model or
a vision-language model, whose loading, encoding with pictures, engine and column evaluation it hands over).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from retain import distributed
from retain.config import ExperimentConfig
from retain.errors import RetainError
from retain.methods.build import train_stage
from retain.methods.stage import MethodState
from retain.modelcard import model_card
from retain.models.adapters import frozen_copy
from retain.preflight import signal_watch
from retain.results import collect_results, publish_results
from retain.rundir import (
    Progress,
    StageLog,
    finish_stage,
    finished_results,
    prepare_run_dir,
    quiet,
    resume_point,
    run_lock,
    starting_point,
    warn,
)
from retain.stage_eval import StagePoints, StartingRow, evaluate_row, measure_shift
from retain.tracking import Tracking
from retain.train import seed_everything


def run_experiment(
    cfg: ExperimentConfig, out: str | Path, progress: Progress | None = None, eval_cache: str | Path | None = None,
    tracking_store: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``cfg`` into ``out``; returns the results dict also written to ``out/results.json``.

    ``tracking_store``: where file-based trackers (MLflow) keep their store when ``cfg.report_to`` names one
    (default ``out``; a sweep passes its directory, so its runs are runs of one experiment).

    ``eval_cache``: a directory of evaluation rows shared with other runs (:mod:`retain.eval_cache`): the starting
    model's row is computed once for every run that starts from the same weights with the same evaluation."""
    out = Path(out)
    say = progress or quiet
    if cfg.mode == "streaming":
        from retain.streaming import run_streaming

        if distributed.world_size() > 1:
            raise RetainError("streaming mode runs in one process (launch it without accelerate launch / torchrun)")
        return run_streaming(cfg, out, say)
    if distributed.world_size() > 1:
        distributed.init(cfg.device)
        if not distributed.is_main():
            return follow_experiment(cfg, out, eval_cache)
    tracking = Tracking(cfg, out, tracking_store) if cfg.report_to else None  # a missing tracker fails here
    if tracking is not None:
        say = tracking.listen(say)
    try:
        return _main_rank_run(cfg, out, eval_cache, say, tracking)
    except BaseException:
        if tracking is not None:  # a run that raised is closed in its trackers as failed, not left running
            tracking.close(failed=True)
        raise


def _main_rank_run(cfg: ExperimentConfig, out: Path, eval_cache: str | Path | None, say: Progress,
                   tracking: Tracking | None) -> dict[str, Any]:
    """The main rank's run: lock, check or write the directory, the starting row, every stage, the results."""
    model, tokenizer = cfg.load_model()
    with run_lock(out):
        done = prepare_run_dir(cfg, out)  # refuses a directory holding another config, finished or not
        if (finished := finished_results(out)) is not None:
            return finished
        done, resume_step = resume_point(cfg, out, done, say)
        base = frozen_copy(model)
        row0 = StartingRow(cfg, out, eval_cache)
        # the other ranks start here too, and evaluate the starting model exactly when this rank computes its row
        distributed.broadcast_object((done, row0.evaluates(model)))
        row0.write(model, tokenizer, say)
        model, state = starting_point(cfg, out, done, model)
        run_stages(cfg, out, model, tokenizer, base, state, done, resume_step, say, writes=True)
        results = publish_results(cfg, out)
        if tracking is not None:
            tracking.finish(results)
        distributed.barrier()  # the other ranks read the finished stage files after this
        return results


def follow_experiment(cfg: ExperimentConfig, out: Path, eval_cache: str | Path | None = None) -> dict[str, Any]:
    """A rank > 0 of a multi-process run (``accelerate launch ... retain run``): the main rank's stage loop, writing
    nothing (the main process owns the run directory). It starts at the stage the main process found (after the main
    process's checks of the directory) and returns the results the main process wrote."""
    if (finished := finished_results(out)) is not None:  # a finished run: the main process returns too
        return finished
    model, tokenizer = cfg.load_model()
    base = frozen_copy(model)
    done, compute_eval0 = distributed.broadcast_object(None)
    if compute_eval0:
        evaluate_row(model, tokenizer, cfg)
    model, state = starting_point(cfg, out, done, model)
    run_stages(cfg, out, model, tokenizer, base, state, done, 0, quiet, writes=False)
    distributed.barrier()  # the main process has written every stage and results.json
    return collect_results(cfg, out)


def run_stages(
    cfg: ExperimentConfig, out: Path, model, tokenizer, base, state: MethodState, done: int, resume_step: int,
    say: Progress, writes: bool,
) -> None:
    """Stages ``done + 1`` … T: train, evaluate, measure the shift; with ``writes``, each stage's files (model,
    state, stage.json last) and its training log. ``resume_step``: stage ``done + 1`` resumes from its checkpoint."""
    for k in range(done, len(cfg.stages)):
        task_name = cfg.stages[k].task
        method = cfg.stage_method(k)
        say("stage_start", {"stage": k + 1, "task": task_name, "method": method.name, "steps": method.train.steps})
        started = time.perf_counter()
        previous = base if k == 0 else frozen_copy(model)  # before the first stage the model holds the base's weights
        stage_dir = out / "stages" / str(k + 1)
        watch = None
        if writes and not (k == done and resume_step):  # a GRPO stage its start cannot learn from is said, not run
            watch = signal_watch(model, tokenizer, cfg, k, functools.partial(warn, out, say))
        points = StagePoints(cfg, tokenizer, stage_dir if writes else None, method.train.steps, say)
        points.keep_until(resume_step if k == done else 0)
        if k == done and resume_step:
            points.resume_at(resume_step, model, stage_dir / "checkpoint")
        seed_everything(cfg.stage_seed(k))
        model = train_stage(
            model, tokenizer, task_name, method, stage_index=k, seen_tasks=cfg.stage_tasks()[:k], state=state,
            seed=cfg.stage_seed(k), engine=cfg.rollout_engine(), kind=cfg.kind(),
            log=StageLog(out, say, k + 1, task_name, watch) if writes else None,
            device=cfg.device, mixed_precision=cfg.mixed_precision,
            checkpoint_dir=stage_dir / "checkpoint" if method.train.checkpoint_every else None,
            on_step=points.on_step,
        )
        train_seconds = time.perf_counter() - started
        say("eval", {"stage": k + 1})
        row = evaluate_row(model, tokenizer, cfg)
        shift = measure_shift(base, previous, model, tokenizer, task_name, cfg, k + 1)
        if not writes:
            continue
        finish_stage(out, k + 1, model, cfg.kind().saved_with(tokenizer), state, model_card(cfg, k + 1, row, shift),
                     {"stage": k + 1, "task": task_name, "method": method.model_dump(mode="json"), "row": row,
                      "steps": method.train.steps, "trajectory": points.collected(), "shift": shift,
                      "train_seconds": round(train_seconds, 2)}, started)
        say("stage_done", {"stage": k + 1, "task": task_name, "row": row})
