"""The continual runner end to end on a micro model: results layout, metrics, kill-and-resume, bad configs."""

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

from retain import metrics as M
from retain.config import load_experiment, parse_experiment
from retain.runner import run_experiment

RESULT_KEYS = {"config", "seeds", "versions", "tasks", "eval_tasks", "matrix", "metrics", "shift"}


def experiment(model_dir: Path, method="sft", steps=4) -> dict:
    return {
        "name": "t",
        "model": str(model_dir),
        "method": {"name": method, "batch_size": 8, "train": {"lr": 1e-2}} if method != "grpo" else
                  {"name": "grpo", "data": {"prompts_per_step": 4, "group_size": 4}, "train": {"lr": 1e-2}},
        "stages": [{"task": "arith", "steps": steps}, {"task": "reverse", "steps": steps}, {"task": "arith", "steps": steps}],
        "eval": {"tasks": ["auto", "facts"], "n": 12},
        "shift": {"prompts": 6, "samples": 2},
    }


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "retain.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_writes_self_describing_results(micro_dir, tmp_path):
    cfg = parse_experiment(experiment(micro_dir))
    out = tmp_path / "run"
    results = run_experiment(cfg, out)
    assert RESULT_KEYS <= set(results)
    assert results["tasks"] == ["arith", "reverse", "arith"]
    assert results["eval_tasks"][:2] == ["arith", "reverse"] and "facts" in results["eval_tasks"]
    assert len(results["matrix"]) == 4 and all(len(r) == len(results["eval_tasks"]) for r in results["matrix"])
    R = [[row[0], row[1], row[0]] for row in results["matrix"]]  # stage columns: arith, reverse, arith
    assert results["metrics"]["average_accuracy"] == pytest.approx(M.average_accuracy(R))
    assert results["metrics"]["backward_transfer"] == pytest.approx(M.backward_transfer(R))
    assert results["metrics"]["prior_columns"] == ["facts"]
    for key in ("forward_kl", "reverse_kl", "weight_l2", "forward_kl_exact"):
        assert len(results["shift"][key]) == 3
    assert all(w > 0 for w in results["shift"]["weight_l2"])  # lr 1e-2 moves the weights
    assert all(kl >= -1e-6 for kl in results["shift"]["forward_kl_exact"])  # exact KL is non-negative
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert {s["stage"] for s in steps} == {1, 2, 3}
    for k in (1, 2, 3):
        assert (out / "stages" / str(k) / "model" / "model.safetensors").exists()
    # a finished run is not redone
    assert run_experiment(cfg, out) == json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_kill_and_resume_gives_the_same_results(micro_dir, tmp_path, method):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**experiment(micro_dir, method, steps=2), "eval": {"tasks": ["auto", "facts"], "n": 6},
                                      "shift": {"prompts": 3, "samples": 2}}))
    out = tmp_path / "b"
    victim = cli("run", str(config), "--out", str(out), "--quiet")
    for _ in range(6000):  # up to ~5 minutes of polling
        if (out / "stages" / "1" / "stage.json").exists() or victim.poll() is not None:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "results.json").exists(), "killed too late to test resuming"
    resumed = cli("run", str(config), "--out", str(out), "--quiet")
    # the uninterrupted run in this process meanwhile, on one thread like the CLI processes (cli sets
    # OMP_NUM_THREADS=1): the same arithmetic, one interpreter start less
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(load_experiment(config), tmp_path / "a")
    finally:
        torch.set_num_threads(threads)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert a["matrix"] == b["matrix"]
    assert a["metrics"] == b["metrics"]
    assert a["shift"] == b["shift"]


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"method": "nope"}, "method.name: unknown method 'nope'"),
        ({"stages": [{"task": "nope"}]}, "stages[0].task: unknown task 'nope'"),
        ({"stages": [{"task": "arith", "steps": -1}]}, "stages[0].steps"),
        ({"eval": {"tasks": ["nope"]}}, "eval.tasks[0]: unknown task 'nope'"),
        ({"stages": []}, "stages: List should have at least 1 item"),
        ({"method": {"name": "sft", "train": {"lr": 0}}}, "method.train.lr"),
        ({"mode": "sideways"}, "mode"),
    ],
)
def test_invalid_config_one_line_exit_2_no_run_dir(micro_dir, tmp_path, change, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**experiment(micro_dir), **change}))
    proc = cli("run", str(config), "--out", str(tmp_path / "out"))
    assert proc.wait(timeout=120) == 2
    lines = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "bad.yaml" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("stages: [\n  - task: kg\n  oops")
    proc = cli("run", str(bad), "--out", str(tmp_path / "o"))
    assert proc.wait(timeout=120) == 2 and "broken.yaml: not valid YAML" in proc.stderr.read()
    proc = cli("run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o"))
    assert proc.wait(timeout=120) == 2 and "config file not found" in proc.stderr.read()
    assert not (tmp_path / "o").exists()


def test_second_process_on_the_same_directory_is_refused(micro_dir, tmp_path):
    from retain.errors import RetainError
    from retain.rundir import run_lock

    with run_lock(tmp_path / "run"):
        with pytest.raises(RetainError, match="in use by another retain process"):
            with run_lock(tmp_path / "run"):
                pass


def test_changed_config_on_existing_run_dir_is_refused(micro_dir, tmp_path):
    from retain.errors import RetainError

    out = tmp_path / "run"
    run_experiment(parse_experiment(experiment(micro_dir, steps=1)), out)
    with pytest.raises(RetainError, match="different config"):
        run_experiment(parse_experiment(experiment(micro_dir, steps=2)), out)


def test_compare_table_csv_and_parquet(micro_dir, tmp_path):
    import pyarrow.parquet as pq

    from retain.comparison import compare_rows, to_csv, to_markdown, to_parquet

    out = tmp_path / "run"
    run_experiment(parse_experiment(experiment(micro_dir, steps=1)), out)
    rows = compare_rows([out, out])
    table = to_markdown(rows)
    assert table.splitlines()[0].startswith("| name | method | seed |") and len(table.splitlines()) == 4
    assert "final:arith" in to_csv(rows).splitlines()[0]
    to_parquet(rows, tmp_path / "runs.parquet")
    back = pq.read_table(tmp_path / "runs.parquet").to_pylist()
    assert back[0]["average_accuracy"] == rows[0]["average_accuracy"] and len(back) == 2
