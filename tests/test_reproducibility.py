"""Reproducibility: the same config and seed give bit-identical ``matrix``, ``metrics`` and ``shift`` (and training
log) on the same machine and thread count — in one process, and in a fresh one through the CLI. Sampling (GRPO
rollouts, pass@K, the KL shift's samples) is seeded, so on-policy methods are covered too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from retain.config import parse_experiment
from retain.files import read_jsonl
from retain.runner import run_experiment

COMPARED = ("tasks", "eval_tasks", "matrix", "eval_n", "metrics", "shift")


def experiment(model_dir: Path, method: str, seed: int = 3) -> dict:
    spec = {"name": "sft", "batch_size": 4, "train": {"lr": 1e-2, "log_every": 1}} if method == "sft" else \
        {"name": "grpo", "data": {"prompts_per_step": 2, "group_size": 4}, "max_new_tokens": 6,
         "train": {"lr": 1e-2, "log_every": 1}}
    return {
        "name": "repro", "model": str(model_dir), "seed": seed, "method": spec,
        "stages": [{"task": "arith", "steps": 2}, {"task": "facts", "steps": 2}],
        "eval": {"tasks": ["arith", "facts"], "n": 4, "samples": 2}, "shift": {"prompts": 1, "samples": 2},
    }


def picked(results: dict) -> dict:
    return {k: results[k] for k in COMPARED}


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_same_config_and_seed_give_bit_identical_results(micro_dir, tmp_path, method):
    data = experiment(micro_dir, method)
    first = run_experiment(parse_experiment(data), tmp_path / "a")
    second = run_experiment(parse_experiment(data), tmp_path / "b")
    assert picked(first) == picked(second)  # == on floats: bit for bit
    assert read_jsonl(tmp_path / "a" / "steps.jsonl") == read_jsonl(tmp_path / "b" / "steps.jsonl")
    if method == "sft":
        return
    # a fresh process (the CLI), same thread count: the same numbers
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([sys.executable, "-m", "retain.cli", "run", str(config), "--out", str(tmp_path / "c"),
                             "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert picked(json.loads((tmp_path / "c" / "results.json").read_text())) == picked(first)


def test_the_seed_matters(micro_dir, tmp_path):
    """The check above is not vacuous: another seed draws other rollouts and evaluation samples."""
    logs = []
    for seed in (3, 4):
        data = {**experiment(micro_dir, "grpo", seed), "stages": [{"task": "arith", "steps": 1}]}
        run_experiment(parse_experiment(data), tmp_path / str(seed))
        logs.append(read_jsonl(tmp_path / str(seed) / "steps.jsonl"))
    assert logs[0] != logs[1]
