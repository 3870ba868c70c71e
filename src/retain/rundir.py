"""The run directory's lifecycle, shared by the batch runner, streaming mode and pretraining: one process per
directory (a lock), the resolved config written first and checked on resume, a killed process's temp files removed,
faults reported, the training log cut back to what is kept, finished stages verified, and model and state
directories published atomically with a manifest of their files' sha256.

A batch run's directory (streaming mode's: :mod:`retain.streaming`)::

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
leaves either the previous state or the next one. Resuming (:func:`resume_point`, under the directory's lock): temp
leftovers of a killed process are removed; the last finished stage's model and state are verified against their
manifests, and a stage that fails is reported (a warning, ``events.jsonl``) and redone from the stage before it;
the training log keeps only the records of what is kept (finished stages, and the steps up to a mid-stage
checkpoint); a stage with a checkpoint resumes from it.
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

from retain.config import ExperimentConfig
from retain.errors import RetainError
from retain.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    fault_point,
    publish_dir,
    read_json,
    read_jsonl,
    remove_dir,
    verify_manifest,
    write_manifest,
)
from retain.methods.stage import MethodState
from retain.methods.replay_record import replay_from_record, replay_record
from retain.models.adapters import merged_copy
from retain.rollout import ENGINE_ALIASES
from retain.stored_config import config_difference
from retain.train import recover_checkpoint
from retain.version import __version__

Progress = Callable[[str, dict[str, Any]], None]  # (event, data): "stage_start", "step", "eval", "stage_done", "warning"

logger = logging.getLogger("retain")


def quiet(event: str, data: dict[str, Any]) -> None:
    """The progress callback of a caller that wants none."""


def warn(out: Path, say: Progress, message: str, **data: Any) -> None:
    """Report a fault the run recovered from: a logged warning, a record in ``DIR/events.jsonl``, a progress event."""
    logger.warning(message)
    append_jsonl(out / "events.jsonl", {"event": "warning", "message": message, "time": round(time.time(), 3), **data})
    say("warning", {"message": message, **data})


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
        "retain": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }


def json_or_none(path: Path) -> Any:
    """The parsed JSON file, or ``None`` when it is absent or unreadable (a torn or damaged write)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def finished_results(out: Path) -> dict[str, Any] | None:
    """The results.json of a finished run in ``out``, or ``None`` while it is not finished (absent or torn)."""
    results = json_or_none(out / "results.json")
    return results if isinstance(results, dict) else None


def prepare_run_dir(cfg: ExperimentConfig, out: Path) -> int:
    """Write or check DIR/config.yaml; return the number of finished stages (0 for a new run)."""
    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True)
    config_file = out / "config.yaml"
    if config_file.exists():
        try:
            held = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            raise RetainError(f"{config_file} is damaged (not YAML): restore it, or choose another --out") from None
        if isinstance(held, dict) and held.get("engine") in ENGINE_ALIASES:  # written before the engine's rename
            held = {**held, "engine": ENGINE_ALIASES[held["engine"]]}
        difference = config_difference(cfg, held)  # fields added since it was written read as their defaults
        if difference:
            raise RetainError(f"{out} holds a run of a different config ({difference}); choose another --out or "
                              "delete it")
    else:
        atomic_write_text(config_file, resolved)
    done = 0
    while (out / "stages" / str(done + 1) / "stage.json").exists():
        done += 1
    return done


def remove_temp_leftovers(out: Path) -> None:
    """Delete what a killed process was writing (``*.tmp`` files and directories); call it holding the lock."""
    for path in sorted(out.rglob("*.tmp"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def verified_stages(out: Path, done: int, say: Progress) -> int:
    """The number of finished stages whose results can be built on: stage ``done``'s stage.json must parse and its
    model and state directories must match their manifests (the next stage starts from them). A stage that fails
    is reported and un-finished (its stage.json removed), and the one before it is checked in turn."""
    while done > 0:
        stage_dir = out / "stages" / str(done)
        problem = None
        if not isinstance(json_or_none(stage_dir / "stage.json"), dict):
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


def stage_warnings(out: Path, stage: int) -> list[dict[str, Any]]:
    """The no-signal warnings ``events.jsonl`` holds for ``stage`` (once each), kept in its stage.json."""
    found = [e for e in read_jsonl(out / "events.jsonl") if e.get("stage") == stage and e.get("kind") == "no_signal"]
    return list({e["message"]: {k: v for k, v in e.items() if k not in ("event", "time")} for e in found}.values())


def resume_point(cfg: ExperimentConfig, out: Path, done: int, say: Progress) -> tuple[int, int]:
    """Where a batch run holding the lock resumes, ``(finished stages, step of the next stage's checkpoint or 0)``,
    from the ``done`` stages :func:`prepare_run_dir` found: temp leftovers removed, the finished stages verified,
    the next stage's checkpoint recovered, and the training log cut back to what is kept."""
    remove_temp_leftovers(out)
    done = verified_stages(out, done, say)
    step = recover_stage_checkpoint(cfg, out, done, say)
    keep_log(out, lambda r: r.get("stage", 0) <= done or (r.get("stage") == done + 1 and 0 < step
                                                          and r.get("step", step + 1) <= step))
    return done, step


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


class StageLog:
    """Stage ``stage``'s training log: each record appended to ``DIR/steps.jsonl`` under its stage and task, said
    as a ``step`` event, and shown to ``watch`` (the no-signal check of its first steps) when there is one."""

    def __init__(self, out: Path, say: Progress, stage: int, task: str,
                 watch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.out, self.say, self.stage, self.task, self.watch = out, say, stage, task, watch

    def __call__(self, record: dict[str, Any]) -> None:
        append_jsonl(self.out / "steps.jsonl", {"stage": self.stage, "task": self.task, **record})
        self.say("step", {"stage": self.stage, **record})
        if self.watch is not None:
            self.watch(record)


def finish_stage(out: Path, stage: int, model, tokenizer, state: MethodState, card: str, record: dict[str, Any],
                 started: float) -> None:
    """Publish stage ``stage``'s files: its model (with ``card``) and carried state, then its stage.json — ``record``
    with the stage's no-signal warnings and its wall time since ``started`` — whose presence marks the stage done;
    then remove what only an unfinished stage needs (its mid-stage checkpoint and in-stage points)."""
    stage_dir = out / "stages" / str(stage)
    save_model_dir(model, tokenizer, stage_dir / "model", card=card)
    save_state(state, stage_dir / "state")
    fault_point("stage_done")
    atomic_write_json(stage_dir / "stage.json", {
        **record, "warnings": stage_warnings(out, stage), "total_seconds": round(time.perf_counter() - started, 2),
    })
    for leftover in (stage_dir / "checkpoint", stage_dir / "checkpoint.old", stage_dir / "points"):
        remove_dir(leftover)


def keep_log(out: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``DIR/steps.jsonl`` with the records ``keep`` accepts (torn lines dropped): a resumed run redoes the
    rest, so the log holds each step once."""
    path = out / "steps.jsonl"
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))


def save_model_dir(
    model, tokenizer, path: Path, extra: dict[str, Any] | None = None, card: str | None = None
) -> None:
    """Publish ``model`` (plain weights: an adapter is merged into a copy) and its tokenizer as a Hugging Face
    directory at ``path``, with ``extra`` JSON files beside them (name → content), the model card ``card`` as its
    README.md (the directory is then ready for ``huggingface_hub.upload_folder``) and its manifest, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged_copy(model).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, content in (extra or {}).items():
        atomic_write_json(tmp / name, content)
    if card is not None:
        atomic_write_text(tmp / "README.md", card)
    write_manifest(tmp)
    fault_point("model_dir")
    publish_dir(tmp, path)


def save_state(state: MethodState, path: Path) -> None:
    """Publish the method's carried state (EWC Fisher, replay buffers) at ``path``, with its manifest, atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = state.to_tensors()
    if tensors:
        save_file(tensors, str(tmp / "tensors.safetensors"))
    atomic_write_json(tmp / "replay.json", replay_record(state.replay))  # a picture by its example and digest
    write_manifest(tmp)
    fault_point("state_dir")
    publish_dir(tmp, path)


def load_state(path: Path) -> MethodState:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "tensors.safetensors")) if (path / "tensors.safetensors").exists() else {}
    replay = replay_from_record(read_json(path / "replay.json"), str(path / "replay.json"))
    return MethodState.from_tensors(tensors, replay)
