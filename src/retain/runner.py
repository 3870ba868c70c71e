"""The continual runner: stages in order, a full evaluation before the first and after each, the KL shift, and a
run directory that describes itself and resumes after the last finished stage.

Run directory::

    DIR/config.yaml           the resolved experiment (written first; a resumed run must match it)
    DIR/steps.jsonl           the training log, one record per logged step
    DIR/stages/0/eval.json    the base model's row (and the starting weights are the configured model)
    DIR/stages/k/model/       the model after stage k (HF directory, safetensors)
    DIR/stages/k/state/       the method's carried state (EWC Fisher, replay buffers)
    DIR/stages/k/stage.json   row k of the matrix, the shift, timings — written last: its presence = stage done
    DIR/stages/k/checkpoint/  the Trainer's mid-stage checkpoint, when the method sets ``train.checkpoint_every``
                              (removed once the stage is done)
    DIR/events.jsonl          what went wrong and what was done about it (a corrupted stage redone, say)
    DIR/results.json          everything, once the last stage is done

Every file is written atomically (:mod:`retain.rundir`), so a crash at any moment leaves either the previous state
or the next one; model and state directories carry a ``manifest.json`` of their files' sha256. Resuming (under the
directory's lock): temp leftovers of a killed process are removed; the last finished stage's model and state are
verified against their manifests, and a stage that fails is reported (a warning, ``events.jsonl``) and redone from
the stage before it; the training log keeps only the records of what is kept (finished stages, and the steps up to
a mid-stage checkpoint); a stage with a checkpoint resumes from it. The same config, seed, machine and thread count
give bit-identical results, resumed or not.

Under a multi-process launcher every rank runs the same stage loop (:func:`run_stages`) — the same stages, seeds
and evaluations, so the ranks stay in step in the Trainer's collectives — and only the main rank writes. The runner
does not know which method it runs, nor which kind of model (``cfg.model_kind()``, ``retain.kind``: a text model or
a vision-language model, whose loading, encoding with pictures, engine and column evaluation it hands over).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from retain import distributed
from retain.config import ExperimentConfig
from retain.errors import RetainError
from retain.eval_cache import cached_row, stored_row
from retain.files import append_jsonl, atomic_write_json, fault_point, read_json, remove_dir
from retain.methods.build import train_stage
from retain.methods.stage import MethodState
from retain.modelcard import model_card
from retain.models.adapters import frozen_copy
from retain.preflight import FlatGroupWatch, stage_signal
from retain.results import collect_results
from retain.rundir import (
    Progress,
    json_or_none,
    keep_log,
    load_state,
    prepare_run_dir,
    quiet,
    remove_temp_leftovers,
    run_lock,
    save_model_dir,
    save_state,
    stage_warnings,
    verified_stages,
    warn,
)
from retain.stage_eval import StagePoints, eval_settings, evaluate_row, measure_shift
from retain.tracking import Tracking
from retain.train import rng_preserved, seed_everything


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
        if isinstance(json_or_none(out / "results.json"), dict):
            return read_json(out / "results.json")
        remove_temp_leftovers(out)
        done = verified_stages(out, done, say)
        resume_step = recover_stage_checkpoint(cfg, out, done, say)
        keep_log(out, lambda r: r.get("stage", 0) <= done or (r.get("stage") == done + 1 and 0 < resume_step
                                                              and r.get("step", resume_step + 1) <= resume_step))
        base = frozen_copy(model)
        eval0 = out / "stages" / "0" / "eval.json"
        need_eval0 = not isinstance(json_or_none(eval0), dict)
        settings = eval_settings(cfg)
        # the other ranks start here too, and evaluate the starting model exactly when this rank computes its row
        distributed.broadcast_object((done, need_eval0 and stored_row(eval_cache, model, settings) is None))
        if need_eval0:
            say("eval", {"stage": 0})
            row0, _ = cached_row(eval_cache, model, settings, lambda: evaluate_row(model, tokenizer, cfg))
            atomic_write_json(eval0, row0)
        model, state = starting_point(cfg, out, done, model)
        run_stages(cfg, out, model, tokenizer, base, state, done, resume_step, say, writes=True)
        results = collect_results(cfg, out)
        fault_point("results")
        atomic_write_json(out / "results.json", results)
        if tracking is not None:
            tracking.finish(results)
        distributed.barrier()  # the other ranks read the finished stage files after this
        return results


def follow_experiment(cfg: ExperimentConfig, out: Path, eval_cache: str | Path | None = None) -> dict[str, Any]:
    """A rank > 0 of a multi-process run (``accelerate launch ... retain run``): the main rank's stage loop, writing
    nothing (the main process owns the run directory). It starts at the stage the main process found (after the main
    process's checks of the directory) and returns the results the main process wrote."""
    if isinstance(json_or_none(out / "results.json"), dict):  # a finished run: the main process returns too
        return read_json(out / "results.json")
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
    stages_dir = out / "stages"
    for k in range(done, len(cfg.stages)):
        task_name = cfg.stages[k].task
        method = cfg.stage_method(k)
        say("stage_start", {"stage": k + 1, "task": task_name, "method": method.name, "steps": method.train.steps})
        started = time.perf_counter()
        previous = frozen_copy(model)
        stage_dir = stages_dir / str(k + 1)

        watch = None
        if writes and not (k == done and resume_step):  # a GRPO stage its start cannot learn from is said, not run
            with rng_preserved():
                for message, data in stage_signal(model, tokenizer, cfg, k):
                    warn(out, say, message, **data)
            watch = FlatGroupWatch(task_name, k + 1, lambda message, flat, k=k: warn(
                out, say, message, kind="no_signal", stage=k + 1, task=cfg.stages[k].task, flat_groups=flat))

        def log(record: dict[str, Any], k: int = k, watch: FlatGroupWatch | None = watch) -> None:
            append_jsonl(out / "steps.jsonl", {"stage": k + 1, "task": cfg.stages[k].task, **record})
            say("step", {"stage": k + 1, **record})
            if watch is not None:
                watch(record)

        points = StagePoints(cfg, tokenizer, stage_dir if writes else None, method.train.steps, say)
        points.keep_until(resume_step if k == done else 0)
        if k == done and resume_step:
            points.resume_at(resume_step, model, stage_dir / "checkpoint")
        seed_everything(cfg.stage_seed(k))
        model = train_stage(
            model, tokenizer, task_name, method, stage_index=k, seen_tasks=cfg.stage_tasks()[:k], state=state,
            seed=cfg.stage_seed(k), engine=cfg.rollout_engine(), kind=cfg.model_kind(), log=log if writes else None,
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
        save_model_dir(model, cfg.model_kind().saved_with(tokenizer), stage_dir / "model",
                       card=model_card(cfg, k + 1, row, shift))
        save_state(state, stage_dir / "state")
        fault_point("stage_done")
        atomic_write_json(stage_dir / "stage.json", {
            "stage": k + 1, "task": task_name, "method": method.model_dump(mode="json"), "row": row,
            "steps": method.train.steps, "trajectory": points.collected(),
            "shift": shift, "train_seconds": round(train_seconds, 2), "warnings": stage_warnings(out, k + 1),
            "total_seconds": round(time.perf_counter() - started, 2),
        })
        for leftover in (stage_dir / "checkpoint", stage_dir / "checkpoint.old", stage_dir / "points"):
            remove_dir(leftover)
        say("stage_done", {"stage": k + 1, "task": task_name, "row": row})


def recover_stage_checkpoint(cfg: ExperimentConfig, out: Path, done: int, say: Progress) -> int:
    """The step stage ``done + 1`` resumes from (0: from its start). Only that stage's mid-stage checkpoint can be
    built on: any other is removed, and a damaged one is reported and not used."""
    stages_dir = out / "stages"
    for leftover in stages_dir.glob("*/checkpoint*"):
        if leftover.parent.name != str(done + 1):
            remove_dir(leftover)
    checkpoint_dir = stages_dir / str(done + 1) / "checkpoint"
    if done >= len(cfg.stages) or not cfg.stage_method(done).train.checkpoint_every:
        remove_dir(checkpoint_dir)
        return 0
    from retain.train import recover_checkpoint

    resume_step, problems = recover_checkpoint(checkpoint_dir)
    for problem in problems:
        warn(out, say, f"stage {done + 1}'s checkpoint is damaged ({problem}); not used",
             kind="corrupt_checkpoint", stage=done + 1, problem=problem)
    return resume_step or 0


def starting_point(cfg: ExperimentConfig, out: Path, done: int, model):
    """``(model, state)`` the next stage starts from: the configured model and a fresh state, or stage ``done``'s."""
    if not done:
        return model, MethodState()
    stage_dir = out / "stages" / str(done)
    return cfg.load_model(stage_dir / "model")[0], load_state(stage_dir / "state")
