"""A run directory written by an older retain resumes: its config.yaml lacks the fields added since (``datasets``,
``eval.lm_eval``, ``eval.checkpoints``...), read as their defaults; a real change is still refused, naming the field."""

from __future__ import annotations

import shutil

import pytest
import yaml

from retain.config import parse_experiment
from retain.errors import RetainError
from retain.files import read_jsonl
from retain.runner import run_experiment
from retain.stored_config import config_difference, resolved

# fields added to the experiment config after runs were first written (cf90109 → the issue-14 merge)
ADDED = {"": ["datasets"], "eval": ["lm_eval", "checkpoints", "checkpoint_tasks", "nll", "n_per_task", "seed"]}


def older(stored: dict) -> dict:
    """``stored`` as an older retain wrote it: without the fields added since."""
    old = {k: v for k, v in stored.items() if k not in ADDED[""]}
    old["eval"] = {k: v for k, v in stored["eval"].items() if k not in ADDED["eval"]}
    return old


def config(**eval_fields) -> dict:
    return {"name": "t", "stages": [{"task": "arith", "steps": 1}, {"task": "reverse", "steps": 1}],
            "eval": {"tasks": ["arith"], "n": 4, **eval_fields}}


def test_missing_fields_read_as_their_defaults():
    cfg = parse_experiment(config())
    stored = older(resolved(cfg))
    assert "datasets" not in stored and "lm_eval" not in stored["eval"]
    assert config_difference(cfg, stored) is None


@pytest.mark.parametrize("change,now,message", [
    (lambda s: s["eval"].update(n=8), {}, "eval.n: stored 8, now 4"),
    (lambda s: None, {"checkpoints": 2}, "eval.checkpoints: not stored (its default 1), now 2"),
    (lambda s: s.update(colour="red"), {}, "colour: stored 'red', not a field now"),
    (lambda s: s["stages"].pop(), {}, "stages: stored [{'method': None, 'steps': 1, 'task': 'arith'}], now"),
    (lambda s: s["stages"][1].update(task="facts"), {}, "stages[1].task: stored 'facts', now 'reverse'"),
])
def test_a_real_change_is_named_by_its_field(change, now, message):
    stored = older(resolved(parse_experiment(config())))
    change(stored)
    difference = config_difference(parse_experiment(config(**now)), stored)
    assert difference is not None and difference.startswith(message)


def test_an_old_run_directory_resumes(micro_dir, tmp_path):
    """A 2-stage run interrupted after stage 1 whose config.yaml an older retain wrote: the resume redoes stage 2
    only; the same directory under a changed config is refused, naming the field."""
    data = {**config(), "model": str(micro_dir), "method": {"name": "sft", "batch_size": 2, "train": {"lr": 1e-2}},
            "shift": {"prompts": 0}}
    out = tmp_path / "run"
    first = run_experiment(parse_experiment(data), out)
    shutil.rmtree(out / "stages" / "2")
    (out / "results.json").unlink()
    stored = older(yaml.safe_load((out / "config.yaml").read_text()))
    (out / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=True))
    results = run_experiment(parse_experiment(data), out)
    assert results["tasks"] == ["arith", "reverse"] and results["matrix"][1] == first["matrix"][1]
    assert [r["stage"] for r in read_jsonl(out / "steps.jsonl")] == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text()) == stored  # the record of the run is left as written
    changed = {**data, "eval": {**data["eval"], "n": 3}}
    with pytest.raises(RetainError, match=r"different config \(eval\.n: stored 4, now 3\)"):
        run_experiment(parse_experiment(changed), out)
