"""Faults on purpose: `retain run` killed (SIGKILL) at random and chosen moments, a full disk, a second process on
the same directory, damaged checkpoints; and the pieces that make a resume lose nothing (manifests, checkpoint
recovery, the torn-line-safe log, temp leftovers).

The end-to-end trials live in ``scripts/crash_trials.py``; the suite runs ``RETAIN_CRASH_TRIALS`` of them (default
3: a kill at a point with damage, a full disk, a second process; two at a time on the script's small sizes) — run
``python scripts/crash_trials.py --trials 24 --mode both --jobs 2`` for every kind at full size.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from retain import files as rio
from retain.config import parse_experiment
from retain.errors import RetainError
from retain.files import append_jsonl, read_jsonl, verify_manifest, write_manifest
from retain.rundir import remove_temp_leftovers, run_lock
from retain.runner import run_experiment
from retain.train import TrainConfig, Trainer, recover_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _crash_trials():
    spec = importlib.util.spec_from_file_location("crash_trials", ROOT / "scripts" / "crash_trials.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_trials"] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_killed_runs_resume_to_the_same_results(tmp_path, mode):
    """Each trial: fault → the directory holds no half-written file → resume → results.json and the training log
    equal the uninterrupted run's, bit for bit, and every manifest intact."""
    ct = _crash_trials()
    n = int(os.environ.get("RETAIN_CRASH_TRIALS", "3"))
    n = n if mode == "batch" else max(1, n // 3)
    # corrupt first: a kill at a named point and the resume past it, plus damage to what the resume builds on (the
    # "point" kind's kill without the damage comes next, from 4 trials on), then a full disk and a second process
    kinds = ("corrupt", "enospc", "concurrent", "point", "random", "double")
    trials = ct.run_trials(n, seed=0, work=tmp_path, modes=[mode], kinds=kinds, jobs=2, small=True)
    summary = ct.summary(trials)
    assert summary["trials"] == n
    assert summary["results_lost"] == 0, "\n".join(ct.row(t) for t in trials)
    # a damaged file the resume would use was reported (a warning naming it), or it lay past the resume point and
    # was rewritten: run_trial counts any other outcome as a problem, so results_lost covers it


# ---------------------------------------------------------------------------------------------- manifests


def test_manifest_detects_flipped_truncated_and_missing_files(tmp_path):
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(bytes(range(256)) * 10)
    (d / "sub" / "b.json").write_text('{"x": 1}')
    write_manifest(d)
    assert verify_manifest(d) is None
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == {"a.bin", "sub/b.json"}

    data = bytearray((d / "a.bin").read_bytes())
    data[100] ^= 1
    (d / "a.bin").write_bytes(bytes(data))
    assert "a.bin: sha256 differs" in verify_manifest(d)
    (d / "a.bin").write_bytes(bytes(data[:50]))
    assert "a.bin: 50 bytes, the manifest says 2560" in verify_manifest(d)
    (d / "a.bin").unlink()
    assert "a.bin: missing" in verify_manifest(d)

    (d / "manifest.json").write_text("{not json")
    assert "manifest.json: unreadable" in verify_manifest(d)
    (d / "manifest.json").write_text(json.dumps({"files": {"../../etc/passwd": {"bytes": 1, "sha256": "0"}}}))
    assert "bad entry" in verify_manifest(d)  # a manifest never sends the check outside its directory
    (d / "manifest.json").unlink()
    assert verify_manifest(d) is None  # written before manifests existed: accepted
    assert "manifest.json: missing" in verify_manifest(d, required=True)
    assert "missing" in verify_manifest(tmp_path / "nope")


def test_append_jsonl_ends_a_torn_line_first(tmp_path):
    log = tmp_path / "steps.jsonl"
    append_jsonl(log, {"step": 1})
    with open(log, "a") as f:
        f.write('{"step": 2, "lo')  # what a kill mid-write leaves
    append_jsonl(log, {"step": 3})
    assert read_jsonl(log) == [{"step": 1}, {"step": 3}]  # the torn record is lost, the next one is not


def test_temp_leftovers_are_removed(tmp_path):
    (tmp_path / "stages" / "1" / "model.tmp").mkdir(parents=True)
    (tmp_path / "stages" / "1" / "model.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".results.json.abc123.tmp").write_text("{")
    (tmp_path / "keep.json").write_text("{}")
    remove_temp_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["1", "keep.json", "stages"]


def test_fault_point_is_inert_without_the_variable_and_can_fill_the_disk(monkeypatch, tmp_path):
    monkeypatch.delenv("RETAIN_FAULT", raising=False)
    rio.atomic_write_text(tmp_path / "a.txt", "fine")
    rio.reset_fault_counts()
    monkeypatch.setenv("RETAIN_FAULT", "atomic_write:2:enospc")
    rio.atomic_write_text(tmp_path / "b.txt", "first")
    with pytest.raises(OSError) as err:
        rio.atomic_write_text(tmp_path / "b.txt", "second")
    assert err.value.errno == errno.ENOSPC
    assert (tmp_path / "b.txt").read_text() == "first"  # the old content survives the failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # and no temp file is left
    rio.reset_fault_counts()


def test_damaged_config_yaml_is_a_clear_error(micro_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_bytes(b"name: [\xff")
    with pytest.raises(RetainError, match="config.yaml is damaged"):
        run_experiment(parse_experiment(_experiment(micro_dir)), out)


def test_run_directory_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RetainError, match="a file is in the way"):
        with run_lock(tmp_path / "file"):
            pass


# ---------------------------------------------------------------------------------------------- trainer checkpoints


def _sft_objective(tokenizer):
    from retain.methods.sft import SFTObjective

    pairs = [(tokenizer.encode(f"{a}+{b}="), tokenizer.encode(str(a + b)) + [tokenizer.eos_token_id])
             for a in range(5) for b in range(5)]
    return SFTObjective(lambda rng, k, step: [rng.choice(pairs) for _ in range(k)], tokenizer.pad_token_id, 4)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"])
def test_damaged_trainer_checkpoint_is_reported_and_not_used(micro_model, tokenizer, tmp_path, caplog, victim):
    ckpt = tmp_path / "ckpt"
    cfg = TrainConfig(steps=2, lr=1e-3, checkpoint_every=2)
    Trainer(copy.deepcopy(micro_model), _sft_objective(tokenizer), cfg, checkpoint_dir=ckpt).run()
    assert verify_manifest(ckpt, required=True) is None
    data = bytearray((ckpt / victim).read_bytes())
    data[len(data) // 2] ^= 0x55
    (ckpt / victim).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="retain"):
        trainer = Trainer(copy.deepcopy(micro_model), _sft_objective(tokenizer), cfg, checkpoint_dir=ckpt)
    assert trainer.step == 0  # started over rather than from a damaged state
    assert any(victim in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert not ckpt.exists()


def test_kill_between_the_checkpoint_renames_keeps_the_older_checkpoint(micro_model, tokenizer, tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = TrainConfig(steps=4, lr=1e-3, checkpoint_every=2)
    straight = Trainer(copy.deepcopy(micro_model), _sft_objective(tokenizer), cfg).run()
    Trainer(copy.deepcopy(micro_model), _sft_objective(tokenizer), cfg.model_copy(update={"steps": 2}),
            checkpoint_dir=ckpt).run()
    # the state a kill at fault point "checkpoint_swap" leaves: PATH moved to PATH.old, PATH.tmp not yet renamed
    os.replace(ckpt, tmp_path / "ckpt.old")
    (tmp_path / "ckpt.tmp").mkdir()
    (tmp_path / "ckpt.tmp" / "model.safetensors").write_bytes(b"half")
    assert recover_checkpoint(ckpt) == (2, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    resumed = Trainer(copy.deepcopy(micro_model), _sft_objective(tokenizer), cfg, checkpoint_dir=ckpt)
    assert resumed.step == 2
    assert torch.equal(_params(resumed.run()), _params(straight))


# ---------------------------------------------------------------------------------------------- the runner


def _experiment(model_dir: Path, checkpoint_every=None) -> dict:
    train = {"lr": 1e-2, "log_every": 1, **({"checkpoint_every": checkpoint_every} if checkpoint_every else {})}
    return {
        "name": "t", "model": str(model_dir), "method": {"name": "replay", "batch_size": 4, "train": train},
        "stages": [{"task": "arith", "steps": 2}, {"task": "facts", "steps": 2}, {"task": "arith", "steps": 2}],
        "eval": {"tasks": ["arith", "facts"], "n": 4}, "shift": {"prompts": 0},  # the KL shift: in the CLI trials
    }


def _same(a: dict, b: dict) -> bool:
    keys = ("matrix", "metrics", "shift", "eval_n")
    return {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.parametrize("victim", ["model/model.safetensors", "state/replay.json", "stage.json"])
def test_damaged_stage_is_reported_and_redone(micro_dir, tmp_path, victim):
    cfg = parse_experiment(_experiment(micro_dir))
    out = tmp_path / "run"
    reference = run_experiment(cfg, out)
    reference_log = read_jsonl(out / "steps.jsonl")
    # as if killed while stage 3 trained, then stage 2's file damaged on disk
    (out / "results.json").unlink()
    (out / "stages" / "3" / "stage.json").unlink()
    damaged = out / "stages" / "2" / victim
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    events = []
    resumed = run_experiment(cfg, out, lambda event, data: events.append((event, data)))
    assert _same(resumed, reference)
    assert read_jsonl(out / "steps.jsonl") == reference_log  # the redone stage's steps once, not twice
    [warning] = read_jsonl(out / "events.jsonl")
    assert warning["kind"] == "corrupt_stage" and warning["stage"] == 2 and victim.split("/")[-1] in warning["problem"]
    assert [d["stage"] for e, d in events if e == "stage_start"] == [2, 3]  # stage 2 redone from stage 1
    assert any(e == "warning" for e, _ in events)


def test_mid_stage_checkpoint_resumes_exactly(micro_dir, tmp_path):
    """checkpoint_every in a batch run: a run killed mid-stage resumes from the stage's checkpoint."""
    cfg = parse_experiment(_experiment(micro_dir, checkpoint_every=1))
    trace = tmp_path / "trace"  # the points the run reaches, counted (the crash harness's RETAIN_FAULT_TRACE)
    rio.reset_fault_counts()
    os.environ["RETAIN_FAULT_TRACE"] = str(trace)
    try:
        reference = run_experiment(cfg, tmp_path / "a")
    finally:
        del os.environ["RETAIN_FAULT_TRACE"]
    reference_log = read_jsonl(tmp_path / "a" / "steps.jsonl")
    assert not list((tmp_path / "a").rglob("checkpoint*"))  # removed once each stage is done

    # the run dies (a full disk, the project's fault point) writing stage 2's second checkpoint: its first is in place
    per_stage = trace.read_text().split().count("checkpoint") // len(cfg.stages)
    assert per_stage >= 2
    out = tmp_path / "b"
    rio.reset_fault_counts()
    os.environ["RETAIN_FAULT"] = f"checkpoint:{per_stage + 2}:enospc"
    try:
        with pytest.raises(OSError, match="injected at checkpoint"):
            run_experiment(cfg, out)
    finally:
        del os.environ["RETAIN_FAULT"]
        rio.reset_fault_counts()
    remove_temp_leftovers(out)  # what the resume does first: the half-written checkpoint.tmp goes
    assert json.loads((out / "stages" / "2" / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    with open(out / "steps.jsonl", "a") as f:
        f.write('{"stage": 2, "step": 2, "lo')  # and a torn line
    events = []
    resumed = run_experiment(cfg, out, lambda e, d: events.append((e, d)))
    assert _same(resumed, reference)
    assert read_jsonl(out / "steps.jsonl") == reference_log
    assert not list(out.rglob("checkpoint*"))
