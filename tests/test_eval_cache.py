"""retain.eval_cache: a starting row computed once per (weights, evaluation settings), reused bit for bit."""

from __future__ import annotations

import copy
import threading

import torch

from retain.config import parse_experiment
from retain.eval_cache import cached_row, parameter_digest
from retain.files import read_json
from retain.runner import run_experiment


def test_digest_follows_the_weights_not_the_object(micro_model):
    twin = copy.deepcopy(micro_model)
    assert parameter_digest(twin) == parameter_digest(micro_model)
    with torch.no_grad():
        next(twin.parameters()).view(-1)[0] += 1e-6  # one float changed
    assert parameter_digest(twin) != parameter_digest(micro_model)


def test_hit_miss_and_damage(micro_model, tmp_path):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return {"col": {"accuracy": value}}

        return run

    settings = {"columns": ["col"], "n": 4, "seed": 0}
    assert cached_row(tmp_path, micro_model, settings, compute(0.5)) == ({"col": {"accuracy": 0.5}}, False)
    assert cached_row(tmp_path, micro_model, settings, compute(0.9)) == ({"col": {"accuracy": 0.5}}, True)
    assert cached_row(tmp_path, micro_model, {**settings, "seed": 1}, compute(0.7))[1] is False  # other settings
    other = copy.deepcopy(micro_model)
    with torch.no_grad():
        next(other.parameters()).mul_(2)
    assert cached_row(tmp_path, other, settings, compute(0.1))[1] is False  # other weights
    assert calls == [0.5, 0.7, 0.1]
    for entry in tmp_path.glob("*.json"):
        entry.write_text('{"description": ')  # damaged entries are recomputed, not trusted
    assert cached_row(tmp_path, micro_model, settings, compute(0.3)) == ({"col": {"accuracy": 0.3}}, False)
    assert cached_row(None, micro_model, settings, compute(0.2)) == ({"col": {"accuracy": 0.2}}, False)  # no cache


def test_concurrent_callers_compute_once(micro_model, tmp_path):
    calls, rows = [], []
    gate = threading.Event()

    def compute():
        calls.append(1)
        gate.wait(2)  # hold the lock while the other caller arrives
        return {"col": {"accuracy": 1.0}}

    threads = [threading.Thread(target=lambda: rows.append(cached_row(tmp_path, micro_model, {"k": 1}, compute)))
               for _ in range(2)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(hit for _, hit in rows) == [False, True]


def test_runs_sharing_a_start_share_row_zero(micro_dir, tmp_path):
    def config(method: str) -> dict:
        return {"name": method, "model": str(micro_dir), "method": {"name": method, "batch_size": 4, "train": {"lr": 1e-2}},
                "stages": [{"task": "arith", "steps": 1}], "eval": {"tasks": ["arith", "reverse"], "n": 4},
                "shift": {"prompts": 0}}

    cache = tmp_path / "cache"
    plain = run_experiment(parse_experiment(config("sft")), tmp_path / "plain")
    first = run_experiment(parse_experiment(config("sft")), tmp_path / "a", eval_cache=cache)
    second = run_experiment(parse_experiment(config("eaft")), tmp_path / "b", eval_cache=cache)
    assert len(list(cache.glob("*.json"))) == 1  # one starting row for both runs
    assert first["matrix"][0] == second["matrix"][0] == plain["matrix"][0]
    assert read_json(tmp_path / "a" / "stages" / "0" / "eval.json") == read_json(tmp_path / "plain" / "stages" / "0" / "eval.json")
    assert (first["matrix"], first["metrics"]) == (plain["matrix"], plain["metrics"])  # the cache changes nothing
