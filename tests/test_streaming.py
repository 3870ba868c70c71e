"""Streaming mode on a micro model: results layout, one optimizer across boundaries, refusals, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from retain import metrics as M
from retain.config import load_experiment, parse_experiment
from retain.errors import RetainError
from retain.runner import run_experiment
from retain.streaming import StreamObjective, eval_points

RESULT_KEYS = {"config", "seeds", "versions", "tasks", "eval_tasks", "matrix", "metrics", "shift", "stream", "mode"}


def experiment(model_dir: Path, steps=(5, 4), eval_every=2, shift_prompts=4, method=None) -> dict:
    return {
        "name": "s",
        "model": str(model_dir),
        "mode": "streaming",
        "method": method or {"name": "sft", "batch_size": 8, "train": {"lr": 1e-2, "log_every": 1}},
        "stages": [{"task": "arith", "steps": steps[0]}, {"task": "reverse", "steps": steps[1]}],
        "eval": {"tasks": ["arith", "reverse"], "n": 8},
        "shift": {"prompts": shift_prompts, "samples": 1},
        "streaming": {"eval_every": eval_every},
    }


def weights(run: Path, stage: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "stages" / str(stage) / "model" / "model.safetensors"))


def test_streaming_run_writes_matrix_and_learning_curve(micro_dir, tmp_path):
    cfg = parse_experiment(experiment(micro_dir))
    out = tmp_path / "run"
    results = run_experiment(cfg, out)
    assert RESULT_KEYS <= set(results) and results["mode"] == "streaming"
    assert results["tasks"] == ["arith", "reverse"] and results["eval_tasks"] == ["arith", "reverse"]
    steps = results["stream"]["steps"]
    assert steps == [0, 2, 4, 5, 6, 8, 9] == eval_points(cfg)  # every 2 steps + the boundaries at 5 and 9
    assert results["stream"]["boundaries"] == [5, 9]
    rows = results["stream"]["rows"]
    assert len(rows) == len(steps) and all(len(r) == 2 for r in rows)
    matrix = results["matrix"]
    assert len(matrix) == 1 + 2 and matrix == [rows[0], rows[steps.index(5)], rows[steps.index(9)]]
    assert results["metrics"]["average_accuracy"] == pytest.approx(M.average_accuracy(matrix))
    assert results["metrics"]["backward_transfer"] == pytest.approx(M.backward_transfer(matrix))
    assert all(len(v) == 2 for v in results["shift"].values())
    assert all(w > 0 for w in results["shift"]["weight_l2"])
    assert all(kl >= -1e-6 for kl in results["shift"]["forward_kl_exact"])
    for s in steps:
        assert (out / "stream" / f"step_{s:06d}.json").exists()
    assert not (out / "stream" / "checkpoint").exists()  # removed once results.json is written
    log = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {1, 2} and log[-1]["step"] == 9 and log[-1]["stage_step"] == 4
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert run_experiment(cfg, out) == json.loads((out / "results.json").read_text())  # finished: not redone


def test_one_optimizer_across_the_boundary(micro_dir, tmp_path):
    data = experiment(micro_dir, steps=(3, 3), eval_every=2, shift_prompts=0)
    run_experiment(parse_experiment(data), tmp_path / "stream")
    log = [json.loads(line) for line in (tmp_path / "stream" / "steps.jsonl").read_text().splitlines()]
    # one Trainer: its step count runs on across the boundary (a Trainer per stage would count from 1 again)
    assert [(r["stage"], r["step"], r["stage_step"]) for r in log] == [
        (1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 4, 1), (2, 5, 2), (2, 6, 3)]
    run_experiment(parse_experiment({**data, "mode": "batch"}), tmp_path / "batch")
    s1, b1 = weights(tmp_path / "stream", 1), weights(tmp_path / "batch", 1)
    assert all(torch.equal(s1[n], b1[n]) for n in b1)  # same data, same steps, same fresh AdamW
    s2, b2 = weights(tmp_path / "stream", 2), weights(tmp_path / "batch", 2)
    assert any(not torch.allclose(s2[n], b2[n]) for n in b2)  # batch mode resets AdamW at the boundary


def test_dispatch_maps_global_steps_to_stages():
    class Echo:
        def __init__(self, k):
            self.k = k

        def batches(self, step):
            return [(self.k, step)]

        def loss(self, model, micro):
            return torch.tensor(float(self.k)), {"local": float(micro[1])}

    obj = StreamObjective([Echo(0), Echo(1), Echo(2)], [2, 2, 5])  # stage 1 has no steps
    assert [obj.locate(s) for s in range(5)] == [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2)]
    (tagged,) = obj.batches(3)
    assert tagged.stage == 2 and obj.loss(None, tagged)[1] == {"local": 1.0}
    with pytest.raises(IndexError):
        obj.locate(5)


@pytest.mark.parametrize(
    "method,stage_method,needle",
    [
        ({"name": "replay", "batch_size": 8}, None, "streaming mode: method.replay needs task boundaries"),
        ({"name": "sft"}, {"name": "replay"}, "streaming mode: stages[1].method.replay needs task boundaries"),
        ({"name": "ewc"}, None, "streaming mode: method.regularizers[0] (ewc) needs task boundaries"),
        ({"name": "sft", "train": {"lr": 1e-2}}, {"name": "sft", "train": {"lr": 1e-3}},
         "stages[1].method.train.lr (0.001) differs from method.train.lr (0.01)"),
        ({"name": "sft"}, {"name": "eaft"}, "stages[1].method.name 'eaft' differs from method.name 'sft'"),
        ({"name": "lora"}, None, "streaming mode: method.adapter.per_stage"),
    ],
)
def test_invalid_streaming_config_names_the_field_and_writes_nothing(micro_dir, tmp_path, method, stage_method, needle):
    data = experiment(micro_dir, method=method)
    if stage_method is not None:
        data["stages"][1]["method"] = stage_method
    with pytest.raises(RetainError) as err:
        run_experiment(parse_experiment(data), tmp_path / "out")
    assert needle in str(err.value)
    assert not (tmp_path / "out").exists()


def test_per_stage_steps_may_differ(micro_dir, tmp_path):
    from retain.streaming import validate_streaming

    data = experiment(micro_dir, method={"name": "sft", "train": {"lr": 1e-2, "steps": 7}})
    data["stages"][1]["method"] = {"name": "sft", "train": {"lr": 1e-2, "steps": 3, "seed": 5}}
    del data["stages"][1]["steps"]
    assert [m.train.steps for m in validate_streaming(parse_experiment(data))] == [5, 3]


def test_kill_and_resume_gives_the_same_results(micro_dir, tmp_path):
    data = experiment(micro_dir, steps=(8, 8), eval_every=2)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    victim = subprocess.Popen([sys.executable, "-m", "retain.cli", "run", str(config), "--out", str(out), "--quiet"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "stream" / "checkpoint" / "trainer_state.json"
    for _ in range(2400):  # up to ~2 minutes of polling
        if checkpoint.exists() or victim.poll() is not None:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert checkpoint.exists(), victim.stderr.read()
    assert not (out / "results.json").exists(), "killed too late to test resuming"
    assert json.loads(checkpoint.read_text())["step"] < 16

    cfg = load_experiment(config)  # as the CLI read it (config.yaml must match)
    resumed = run_experiment(cfg, out)
    straight = run_experiment(cfg, tmp_path / "straight")
    assert resumed["matrix"] == straight["matrix"]
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["stream"] == straight["stream"]
    assert resumed["shift"] == straight["shift"]
    logged = [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 17))  # cut back to the checkpoint on resume: no step twice


def test_crash_while_evaluating_a_checkpointed_step_resumes_it(micro_dir, tmp_path, monkeypatch):
    """The Trainer checkpoints step 4 before its evaluation runs: a crash in between must not lose the point. The
    crash is the project's fault point ``eval`` (a full disk raised at the first task of step 4's evaluation)."""
    from retain.files import reset_fault_counts

    data = experiment(micro_dir, steps=(4, 2), eval_every=2, shift_prompts=2)
    cfg = parse_experiment(data)
    straight = run_experiment(cfg, tmp_path / "straight")

    per_point = len(cfg.eval_tasks())  # one "eval" point per task of a row; rows at steps 0, 2, 4, ...
    out = tmp_path / "crashed"
    reset_fault_counts()
    monkeypatch.setenv("RETAIN_FAULT", f"eval:{2 * per_point + 1}:enospc")
    with pytest.raises(OSError, match="injected at eval"):
        run_experiment(parse_experiment(data), out)
    monkeypatch.delenv("RETAIN_FAULT")
    assert json.loads((out / "stream" / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert not (out / "stream" / "step_000004.json").exists() and (out / "stream" / "step_000002.json").exists()
    resumed = run_experiment(parse_experiment(data), out)
    assert resumed["matrix"] == straight["matrix"] and resumed["stream"] == straight["stream"]
    assert resumed["shift"] == straight["shift"] and resumed["metrics"] == straight["metrics"]
    steps = [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the log was cut back to the checkpoint, not duplicated
