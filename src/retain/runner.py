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

Every file is written atomically (temp + rename; directories built beside and renamed), so a crash at any moment
leaves either the previous state or the next one; model and state directories carry a ``manifest.json`` of their
files' sha256. Resuming (under the directory's lock): temp leftovers of a killed process are removed; the last
finished stage's model and state are verified against their manifests, and a stage that fails is reported (a
warning, ``events.jsonl``) and redone from the stage before it; the training log keeps only the records of what is
kept (finished stages, and the steps up to a mid-stage checkpoint); a stage with a checkpoint resumes from it. The
same config, seed, machine and thread count give bit-identical results, resumed or not. The runner does not know
which method it runs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

import retain
from retain import distributed
from retain import metrics as M
from retain import tasks as task_registry
from retain.config import LM_EVAL_PREFIX, ExperimentConfig
from retain.errors import RetainError
from retain.eval_cache import cached_row
from retain.evaluate import DEFAULT_MAX_NEW_TOKENS, answer_nll, evaluate_task, flips
from retain.io import (
    append_jsonl, atomic_write_json, atomic_write_text, fault_point, publish_dir, read_json, read_jsonl, remove_dir,
    verify_manifest, write_manifest,
)
from retain.methods import adapters
from retain.methods.build import frozen_copy, train_stage
from retain.methods.stage import MethodState
from retain.metrics.lmeval import lm_eval_cells
from retain.metrics.shift import kl_shift, weight_l2
from retain.modelcard import model_card
from retain.preflight import FlatGroupWatch, stage_signal
from retain.tracking import Tracking
from retain.rollout import make_engine
from retain.train import rng_preserved, seed_everything

Progress = Callable[[str, dict[str, Any]], None]  # (event, data): "stage_start", "step", "eval", "stage_done", "warning"

logger = logging.getLogger("retain")


def warn(out: Path, say: Progress, message: str, **data: Any) -> None:
    """Report a fault the run recovered from: a logged warning, a record in ``DIR/events.jsonl``, a progress event."""
    logger.warning(message)
    append_jsonl(out / "events.jsonl", {"event": "warning", "message": message, "time": round(time.time(), 3), **data})
    say("warning", {"message": message, **data})


def stage_warnings(out: Path, stage: int) -> list[dict[str, Any]]:
    """The no-signal warnings ``events.jsonl`` holds for ``stage`` (once each), kept in its stage.json."""
    found = [e for e in read_jsonl(out / "events.jsonl") if e.get("stage") == stage and e.get("kind") == "no_signal"]
    return list({e["message"]: {k: v for k, v in e.items() if k not in ("event", "time")} for e in found}.values())


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """One process per run directory: a second gets a clear refusal instead of corrupting the first's files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RetainError(f"run directory {out}: a file is in the way (give a directory)") from None
    except PermissionError:
        raise RetainError(f"run directory {out}: permission denied") from None
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RetainError(f"run directory {out} is in use by another retain process") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def versions() -> dict[str, str]:
    import transformers

    return {
        "retain": retain.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }


def eval_seed(cfg: ExperimentConfig) -> int:
    """The seed that orders the evaluation prompts: ``eval.seed`` when fixed, else the run's seed."""
    return cfg.seed if cfg.eval.seed is None else cfg.eval.seed


def evaluate_row(model, tokenizer, cfg: ExperimentConfig, columns: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """One evaluation row: greedy accuracy (per item, and on the selection and test halves) of every column, pass@K
    when asked, and the answer NLL of the ``eval.nll`` columns. ``columns``: a subset (the in-stage checkpoints')."""
    engine = make_engine(cfg.engine, model, tokenizer)
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
        row[column] = evaluate_task(engine, name, n=n, samples=cfg.eval.samples, split=split or "test", seed=seed)
        if column in nll:
            row[column].update(answer_nll(model, tokenizer, name, n=n, split=split or "test", seed=seed))
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


class StagePoints:
    """The in-stage checkpoint evaluations of one stage (``eval.checkpoints`` > 1), each kept as
    ``stages/k/points/<step>.json`` when written so a stage resumed from a mid-stage checkpoint keeps the points it
    had; ``on_step`` is the Trainer's hook. The evaluation runs with the training RNG state saved and restored, so
    checkpoints change nothing about training."""

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
    out: dict[str, Any] = {"weight_l2": weight_l2(base, model), "weight_l2_from_previous": weight_l2(previous, model)}
    if cfg.shift.prompts == 0:
        return out
    task = task_registry.get(task_name)
    prompts = [e.prompt for e in task.examples("test", cfg.shift.prompts, seed=cfg.seed)]
    max_new = getattr(task, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    seed = cfg.seed * 1000 + stage
    out["from_base"] = kl_shift(base, model, tokenizer, prompts, cfg.shift.samples, max_new, seed, cfg.engine)
    if stage == 1:  # the first stage's previous model is the base: the same measurement, not made twice
        out["from_previous"] = out["from_base"]
    else:
        out["from_previous"] = kl_shift(previous, model, tokenizer, prompts, cfg.shift.samples, max_new, seed, cfg.engine)
    return out


def _save_model_dir(model, tokenizer, path: Path, card: str | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapters.merged_copy(model).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if card is not None:  # the Hugging Face model card: the directory is ready for upload_folder
        atomic_write_text(tmp / "README.md", card)
    write_manifest(tmp)
    fault_point("model_dir")
    publish_dir(tmp, path)


def _save_state(state: MethodState, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = state.to_tensors()
    if tensors:
        save_file(tensors, str(tmp / "tensors.safetensors"))
    atomic_write_json(tmp / "replay.json", state.replay)
    write_manifest(tmp)
    fault_point("state_dir")
    publish_dir(tmp, path)


def _load_state(path: Path) -> MethodState:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "tensors.safetensors")) if (path / "tensors.safetensors").exists() else {}
    return MethodState.from_tensors(tensors, read_json(path / "replay.json"))


def remove_temp_leftovers(out: Path) -> None:
    """Delete what a killed process was writing (``*.tmp`` files and directories); call it holding the lock."""
    for path in sorted(out.rglob("*.tmp"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def verified_stages(out: Path, done: int, say: Progress) -> int:
    """The number of finished stages whose results can be built on: stage ``done``'s stage.json must parse and its
    model and state directories must match their manifests (the next stage starts from them). A stage that fails
    is reported and un-finished (its stage.json removed), and the one before it is checked in turn."""
    while done > 0:
        stage_dir = out / "stages" / str(done)
        problem = None
        if not isinstance(_json_or_none(stage_dir / "stage.json"), dict):
            problem = f"{stage_dir / 'stage.json'}: unreadable"
        else:
            problem = verify_manifest(stage_dir / "model") or verify_manifest(stage_dir / "state")
        if problem is None:
            return done
        (stage_dir / "stage.json").unlink(missing_ok=True)
        warn(out, say, f"stage {done} is damaged ({problem}); redoing it from stage {done - 1}",
             kind="corrupt_stage", stage=done, problem=problem)
        done -= 1
    return 0


def keep_log(out: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``DIR/steps.jsonl`` with the records ``keep`` accepts (torn lines dropped): a resumed run redoes the
    rest, so the log holds each step once."""
    path = out / "steps.jsonl"
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))


def prepare_run_dir(cfg: ExperimentConfig, out: Path) -> int:
    """Write or check DIR/config.yaml; return the number of finished stages (0 for a new run)."""
    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True)
    config_file = out / "config.yaml"
    if config_file.exists():
        try:
            held = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            raise RetainError(f"{config_file} is damaged (not YAML): restore it, or choose another --out") from None
        if held != yaml.safe_load(resolved):
            raise RetainError(f"{out} holds a run of a different config; choose another --out or delete it")
    else:
        atomic_write_text(config_file, resolved)
    done = 0
    while (out / "stages" / str(done + 1) / "stage.json").exists():
        done += 1
    return done


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
    say = progress or (lambda event, data: None)
    if cfg.mode == "streaming":
        from retain.streaming import run_streaming

        if distributed.world_size() > 1:
            raise RetainError("streaming mode runs in one process (launch it without accelerate launch / torchrun)")
        return run_streaming(cfg, out, say)
    if distributed.world_size() > 1:
        distributed.init(cfg.device)
        if not distributed.is_main():
            return follow_experiment(cfg, out)
    tracking = Tracking(cfg, out, tracking_store) if cfg.report_to else None  # a missing tracker fails here
    if tracking is not None:
        say = tracking.listen(say)
    model, tokenizer = load_configured(cfg, cfg.model)
    with run_lock(out):
        done = prepare_run_dir(cfg, out)  # refuses a directory holding another config, finished or not
        if isinstance(_json_or_none(out / "results.json"), dict):
            return read_json(out / "results.json")
        remove_temp_leftovers(out)
        done = verified_stages(out, done, say)
        stages_dir = out / "stages"
        for leftover in stages_dir.glob("*/checkpoint*"):  # only the next stage's checkpoint can be built on
            if leftover.parent.name != str(done + 1):
                remove_dir(leftover)
        checkpoint_dir = stages_dir / str(done + 1) / "checkpoint"
        if done < len(cfg.stages) and cfg.stage_method(done).train.checkpoint_every:
            from retain.train import recover_checkpoint

            resume_step, problems = recover_checkpoint(checkpoint_dir)
            resume_step = resume_step or 0
            for problem in problems:
                warn(out, say, f"stage {done + 1}'s checkpoint is damaged ({problem}); not used",
                     kind="corrupt_checkpoint", stage=done + 1, problem=problem)
        else:
            remove_dir(checkpoint_dir)
            resume_step = 0
        keep_log(out, lambda r: r.get("stage", 0) <= done or (r.get("stage") == done + 1 and 0 < resume_step
                                                              and r.get("step", resume_step + 1) <= resume_step))
        base = frozen_copy(model)
        need_eval0 = not isinstance(_json_or_none(stages_dir / "0" / "eval.json"), dict)
        distributed.broadcast_object((done, need_eval0))  # the other ranks (follow_experiment) start here too
        if need_eval0:
            say("eval", {"stage": 0})
            row0, _ = cached_row(eval_cache, model, eval_settings(cfg), lambda: evaluate_row(model, tokenizer, cfg))
            atomic_write_json(stages_dir / "0" / "eval.json", row0)
        state = MethodState()
        if done:
            model, _ = load_configured(cfg, stages_dir / str(done) / "model")
            state = _load_state(stages_dir / str(done) / "state")
        for k in range(done, len(cfg.stages)):
            task_name = cfg.stages[k].task
            method = cfg.stage_method(k)
            say("stage_start", {"stage": k + 1, "task": task_name, "method": method.name, "steps": method.train.steps})
            started = time.perf_counter()
            previous = frozen_copy(model)
            stage_dir = stages_dir / str(k + 1)

            resumed = k == done and resume_step > 0
            if not resumed:  # a GRPO stage its starting model cannot learn from is said, not run silently
                with rng_preserved():
                    for message, data in stage_signal(model, tokenizer, cfg, k):
                        warn(out, say, message, **data)
            watch = None if resumed else FlatGroupWatch(task_name, k + 1, lambda message, flat, k=k: warn(
                out, say, message, kind="no_signal", stage=k + 1, task=cfg.stages[k].task, flat_groups=flat))

            def log(record: dict[str, Any], k: int = k, watch: FlatGroupWatch | None = watch) -> None:
                append_jsonl(out / "steps.jsonl", {"stage": k + 1, "task": cfg.stages[k].task, **record})
                say("step", {"stage": k + 1, **record})
                if watch is not None:
                    watch(record)

            points = StagePoints(cfg, tokenizer, stage_dir, method.train.steps, say)
            points.keep_until(resume_step if k == done else 0)
            if k == done and resume_step:
                points.resume_at(resume_step, model, stage_dir / "checkpoint")
            seed_everything(cfg.seed * 1000 + k)
            model = train_stage(
                model, tokenizer, task_name, method, stage_index=k, seen_tasks=cfg.stage_tasks()[:k], state=state,
                seed=cfg.seed * 1000 + k, engine=cfg.engine, log=log, device=cfg.device,
                mixed_precision=cfg.mixed_precision,
                checkpoint_dir=stage_dir / "checkpoint" if method.train.checkpoint_every else None,
                on_step=points.on_step,
            )
            train_seconds = time.perf_counter() - started
            say("eval", {"stage": k + 1})
            row = evaluate_row(model, tokenizer, cfg)
            shift = measure_shift(base, previous, model, tokenizer, task_name, cfg, k + 1)
            _save_model_dir(model, tokenizer, stage_dir / "model", model_card(cfg, k + 1, row, shift))
            _save_state(state, stage_dir / "state")
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
        results = collect_results(cfg, out)
        fault_point("results")
        atomic_write_json(out / "results.json", results)
        if tracking is not None:
            tracking.finish(results)
        distributed.barrier()  # the other ranks read the finished stage files after this
        return results


def load_configured(cfg: ExperimentConfig, spec: str | Path):
    """(model, tokenizer) of ``spec`` as the config asks: dtype, gradient checkpointing, on this process's device."""
    from retain.models.loading import load_model

    return load_model(
        spec, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing,
        device=distributed.train_device(cfg.device),
    )


def follow_experiment(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """A rank > 0 of a multi-process run (``accelerate launch ... retain run``): it does what the main process does
    — the same stages, seeds and evaluations, so the two stay in step and wait little in each other's collectives —
    and writes nothing; the main process owns the run directory. It starts at the stage the main process found
    (after the main process's checks of the directory) and returns the results the main process wrote."""
    if isinstance(_json_or_none(out / "results.json"), dict):  # a finished run: the main process returns too
        return read_json(out / "results.json")
    model, tokenizer = load_configured(cfg, cfg.model)
    base = frozen_copy(model)
    done, need_eval0 = distributed.broadcast_object(None)
    if need_eval0:
        evaluate_row(model, tokenizer, cfg)
    stages_dir = out / "stages"
    state = MethodState()
    if done:
        model, _ = load_configured(cfg, stages_dir / str(done) / "model")
        state = _load_state(stages_dir / str(done) / "state")
    for k in range(done, len(cfg.stages)):
        method = cfg.stage_method(k)
        previous = frozen_copy(model)
        seed_everything(cfg.seed * 1000 + k)
        points = StagePoints(cfg, tokenizer, None, method.train.steps, lambda event, data: None)  # evaluates, writes nothing
        model = train_stage(
            model, tokenizer, cfg.stages[k].task, method, stage_index=k, seen_tasks=cfg.stage_tasks()[:k],
            state=state, seed=cfg.seed * 1000 + k, engine=cfg.engine, device=cfg.device,
            mixed_precision=cfg.mixed_precision,
            checkpoint_dir=stages_dir / str(k + 1) / "checkpoint" if method.train.checkpoint_every else None,
            on_step=points.on_step,
        )
        evaluate_row(model, tokenizer, cfg)
        measure_shift(base, previous, model, tokenizer, cfg.stages[k].task, cfg, k + 1)
    distributed.barrier()  # the main process has written every stage and results.json
    return collect_results(cfg, out)


def collect_results(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Assemble results.json from the per-stage files (pure reading: the same files give the same results)."""
    stages_dir = out / "stages"
    stage_files = [read_json(stages_dir / str(k + 1) / "stage.json") for k in range(len(cfg.stages))]
    rows = [read_json(stages_dir / "0" / "eval.json")] + [s["row"] for s in stage_files]
    return results_from_rows(cfg, rows, stage_files, [s["train_seconds"] for s in stage_files])


def results_from_rows(
    cfg: ExperimentConfig, rows: list[dict[str, Any]], stage_files: list[dict[str, Any]], train_seconds: list[float]
) -> dict[str, Any]:
    """results.json from the evaluation rows (before any stage, then after each) and each stage's shift."""
    eval_tasks = cfg.eval_tasks()
    matrix = [[row[c]["accuracy"] for c in eval_tasks] for row in rows]
    trajectories = [
        [{"step": 0, "row": rows[k]}, *s.get("trajectory", []), {"step": s.get("steps"), "row": rows[k + 1]}]
        for k, s in enumerate(stage_files)
    ]
    return {
        "config": cfg.model_dump(mode="json"),
        "seeds": {"run": cfg.seed, "stages": [cfg.seed * 1000 + k for k in range(len(cfg.stages))], "eval": cfg.seed},
        "versions": versions(),
        "tasks": cfg.stage_tasks(),
        "eval_tasks": eval_tasks,
        "matrix": matrix,
        "eval_n": [[row[c]["n"] for c in eval_tasks] for row in rows],
        "metrics": compute_metrics(cfg, eval_tasks, matrix),
        "shift": shift_table(stage_files),
        "train_seconds": train_seconds,
        "flips": row_flips(rows[0], rows[-1]),
        "trajectories": trajectories,
        "warnings": [w for s in stage_files for w in s.get("warnings", [])],
        "rewards": {t: task_registry.get(t).reward_name for t in dict.fromkeys(cfg.stage_tasks())
                    if task_registry.get(t).reward_name},
    }


def row_flips(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per column, the items forgotten (correct → wrong) and learned (wrong → correct) between two rows of a run."""
    out = {}
    for column, cell in after.items():
        old = before.get(column, {}).get("correct")
        new = cell.get("correct")
        if isinstance(old, str) and isinstance(new, str) and len(old) == len(new):
            out[column] = flips(old, new)
    return out


def compute_metrics(cfg: ExperimentConfig, eval_tasks: list[str], matrix: list[list[float]]) -> dict[str, Any]:
    stage_tasks = cfg.stage_tasks()
    R = [[row[eval_tasks.index(t)] for t in stage_tasks] for row in matrix]
    T = len(stage_tasks)
    stage_related = set(stage_tasks) | {c for c in eval_tasks if c.partition("@")[0] in stage_tasks}
    prior_cols = [i for i, c in enumerate(eval_tasks) if c not in stage_related]
    ood_cols = {c: i for i, c in enumerate(eval_tasks) if "@" in c and c.partition("@")[0] in stage_tasks}
    gains = [M.target_gain(R, j) for j in range(1, T + 1)]
    return {
        "average_accuracy": M.average_accuracy(R),
        "forgetting_measure": M.forgetting_measure(R),
        "backward_transfer": M.backward_transfer(R),
        "forward_transfer": M.forward_transfer(R),
        "avalanche_forgetting": M.avalanche_forgetting(R)["mean"],
        "target_gain": sum(gains) / T,
        "target_gain_per_stage": gains,
        "prior_drop": M.prior_drop(matrix[0], matrix[-1], prior_cols) if prior_cols else None,
        "prior_columns": [eval_tasks[i] for i in prior_cols],
        "ood_change": {c: matrix[-1][i] - matrix[0][i] for c, i in ood_cols.items()},
    }


def shift_table(stage_files: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """One value per stage for each shift measure (``None`` where KL measurement was switched off)."""

    def pick(s: dict[str, Any], *path: str) -> float | None:
        node: Any = s["shift"]
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    return {
        "forward_kl": [pick(s, "from_base", "forward", "per_sequence") for s in stage_files],
        "forward_kl_exact": [pick(s, "from_base", "forward", "exact_per_sequence") for s in stage_files],
        "forward_kl_per_token": [pick(s, "from_base", "forward", "per_token") for s in stage_files],
        "reverse_kl": [pick(s, "from_base", "reverse", "per_sequence") for s in stage_files],
        "reverse_kl_exact": [pick(s, "from_base", "reverse", "exact_per_sequence") for s in stage_files],
        "reverse_kl_per_token": [pick(s, "from_base", "reverse", "per_token") for s in stage_files],
        "forward_kl_from_previous": [pick(s, "from_previous", "forward", "per_sequence") for s in stage_files],
        "reverse_kl_from_previous": [pick(s, "from_previous", "reverse", "per_sequence") for s in stage_files],
        "weight_l2": [pick(s, "weight_l2") for s in stage_files],
        "weight_l2_from_previous": [pick(s, "weight_l2_from_previous") for s in stage_files],
    }
