"""``retain sweep``: grid expansion and validation, retry once, skip finished runs, and a sweep on a local Ray cluster
whose runs ``retain compare DIR`` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from retain.cli import main
from retain.comparison import compare_rows
from retain.errors import RetainError
from retain.sweep import expand, load_sweep, parse_sweep, run_name, run_sweep

TINY = {  # one stage, two steps, four prompts: a run takes a few seconds
    "name": "tiny",
    "method": {"name": "sft", "train": {"lr": 3.0e-4}},
    "stages": [{"task": "countdown", "steps": 2}],
    "eval": {"tasks": ["countdown"], "n": 4},
    "shift": {"prompts": 4},
}


def sweep_of(**extra):
    return parse_sweep({**TINY, **extra}, "test.yaml")


def write_sweep(path: Path, **extra) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **extra}), encoding="utf-8")
    return path


# --- grid expansion (pure) -------------------------------------------------------------------------------------
def test_grid_expands_every_combination_in_grid_order():
    runs = expand(sweep_of(grid={"method": ["sft", "grpo"], "seed": [0, 1], "method.train.lr": [1e-4, 3e-4]}))
    assert len(runs) == 8
    assert runs[0].name == "method=sft,seed=0,method.train.lr=0.0001"
    assert runs[-1].name == "method=grpo,seed=1,method.train.lr=0.0003"
    assert len({r.name for r in runs}) == 8
    last = runs[-1].experiment
    assert (last.seed, last.stage_method(0).name, last.stage_method(0).train.lr) == (1, "grpo", 3e-4)
    assert last.name == "tiny/method=grpo,seed=1,method.train.lr=0.0003"  # compare's name column tells runs apart
    assert runs == expand(sweep_of(grid={"method": ["sft", "grpo"], "seed": [0, 1], "method.train.lr": [1e-4, 3e-4]}))


def test_method_name_keeps_overrides_and_paths_reach_into_presets_and_lists():
    # a method name swaps the preset and keeps the base's train.lr; the dotted path applies after it, whatever the order
    runs = expand(sweep_of(grid={"method.train.steps": [3], "method": ["grpo"], "stages.0.steps": [1]}))
    (run,) = runs
    method = run.experiment.stage_method(0)
    assert (method.name, method.train.lr) == ("grpo", 3e-4)
    assert run.experiment.method["train"] == {"lr": 3e-4, "steps": 3}
    assert run.experiment.stages[0].steps == 1
    # a preset string in the base becomes {name: ...} to take overrides
    (run,) = expand(parse_sweep({**TINY, "method": "eaft", "grid": {"method.loss.k": [10]}}))
    assert run.experiment.stage_method(0).loss.k == 10
    # a dict value replaces the whole method; the name stays filesystem-safe and unique
    (run,) = expand(sweep_of(grid={"method": [{"name": "grpo", "data": {"group_size": 4}}]}))
    assert run.experiment.stage_method(0).data.group_size == 4
    assert "/" not in run.name and "{" not in run.name and run.name.startswith("method=")
    assert run.name == "method=grpo"  # a whole method goes by its name
    with pytest.raises(RetainError, match="same run name"):  # two methods of one name would share a directory
        expand(sweep_of(grid={"method": [{"name": "grpo"}, {"name": "grpo", "data": {"group_size": 4}}]}))


def test_run_names_are_readable_and_filesystem_safe():
    assert run_name({"method": "sft", "seed": 0}) == "method=sft,seed=0"
    assert run_name({"method.train.lr": 1e-4, "flag": True}) == "method.train.lr=0.0001,flag=true"
    assert run_name({}) == "run"
    odd = run_name({"model": "../runs/my model"})
    assert "/" not in odd and " " not in odd and not odd.startswith(".")
    assert odd != run_name({"model": "../runs/my_model"})  # a changed name carries a hash of the exact value


def test_empty_grid_is_one_run_and_resources_default():
    cfg = sweep_of()
    (run,) = expand(cfg)
    assert run.name == "run" and run.experiment.name == "tiny"
    assert (cfg.resources.cpus, cfg.resources.gpus) == (1, 0)
    assert sweep_of(resources={"cpus": 2, "gpus": 0.5}).resources.threads == 2


@pytest.mark.parametrize("extra, words", [
    ({"grid": {"method.train.lrr": [1e-4]}}, ["'method.train.lrr'", "0.0001", "Extra inputs"]),
    ({"grid": {"method.train.lr": [1e-4, -1.0]}}, ["'method.train.lr'", "-1.0", "greater than 0"]),
    ({"grid": {"nope": [1]}}, ["'nope'", "nope"]),
    ({"grid": {"stages.3.steps": [1]}}, ["'stages.3.steps'", "list of 1"]),
    ({"grid": {"method": ["sft", "sfft"]}}, ["'method'", "'sfft'", "unknown method"]),
    ({"grid": {"stages.0.task": ["kg", "nosuchtask"]}}, ["'stages.0.task'", "'nosuchtask'"]),
    ({"grid": {"method": ["grpo"], "method.data.group_size": [4], "stages.0.task": ["kg", "bad"]}},
     ["grid key 'stages.0.task', value 'bad'"]),
    ({"grid": {"seed": 3}}, ["'seed'", "non-empty list"]),
    ({"grid": {"seed": []}}, ["'seed'", "non-empty list"]),
    ({"grid": {"seed": [0, 0]}}, ["'seed'", "listed twice"]),
    ({"grid": {"method..lr": [1]}}, ["'method..lr'", "field path"]),
    ({"grid": {"seed": ["1", 1]}}, ["same run name"]),
    ({"resources": {"cpus": 0}}, ["resources.cpus"]),
    ({"resources": {"tpus": 1}}, ["resources.tpus"]),
    ({"grid": {"seed": [0]}, "stages": []}, ["stages"]),
])
def test_grid_errors_name_the_key_and_value(extra, words):
    with pytest.raises(RetainError) as err:
        expand(sweep_of(**extra), "test.yaml")
    message = str(err.value)
    assert message.startswith("test.yaml") and "\n" not in message
    for word in words:
        assert word in message, message


def test_cli_rejects_a_bad_grid_with_exit_2_and_writes_nothing(tmp_path, capsys):
    config = write_sweep(tmp_path / "sweep.yaml", grid={"seed": [0, 1], "method.train.lr": [1e-4, 0]})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(config), "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("retain: error: ") and "'method.train.lr'" in err and "value 0" in err
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(out)])
    assert exit_.value.code == 2 and not out.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(config), "--out", str(out), "--backend", "slurm"])
    assert exit_.value.code == 2 and not out.exists()


# --- local backend: retry once, skip finished runs ---------------------------------------------------------------
def test_local_sweep_retries_a_failed_run_once_and_skips_finished_runs(tmp_path, monkeypatch):
    import retain.runner

    real = retain.runner.run_experiment
    calls: list[str] = []

    def flaky(cfg, out, progress=None, **kwargs):
        calls.append(cfg.name)
        if cfg.seed == 1 and calls.count(cfg.name) == 1:
            raise RuntimeError("injected failure")
        return real(cfg, out, progress, **kwargs)

    monkeypatch.setattr(retain.runner, "run_experiment", flaky)
    events: list[tuple[str, str]] = []
    out = tmp_path / "sweep"
    cfg = sweep_of(grid={"seed": [1, 0]})
    summary = run_sweep(cfg, out, backend="local", workers=0, progress=lambda e, d: events.append((e, d.get("name"))))
    # seed=1 failed, seed=0 went on, then seed=1 was retried at the back of the queue and finished
    assert [e for e in events if e[0] in ("start", "done", "failed")] == [
        ("start", "seed=1"), ("failed", "seed=1"), ("start", "seed=0"), ("done", "seed=0"),
        ("start", "seed=1"), ("done", "seed=1"),
    ]
    assert summary["failed"] == []
    saved = json.loads((out / "sweep.json").read_text())
    by_name = {r["name"]: r for r in saved["runs"]}
    assert by_name["seed=1"]["status"] == "done" and by_name["seed=1"]["attempts"] == 2
    assert by_name["seed=1"]["errors"][0]["error"] == "RuntimeError: injected failure"
    assert by_name["seed=0"]["attempts"] == 1 and by_name["seed=0"]["errors"] == []
    assert all(r["seconds"] > 0 for r in saved["runs"]) and saved["wall_seconds"] > 0
    assert [Path(r["run"]).name for r in compare_rows([out])] == ["seed=0", "seed=1"]

    # a rerun skips both (results.json under the same config) without calling the runner
    calls.clear()
    summary = run_sweep(cfg, out, backend="local", workers=0)
    assert calls == [] and [r["status"] for r in summary["runs"]] == ["skipped", "skipped"]

    # a changed sweep file whose run names collide with finished runs of another config: refused before running
    with pytest.raises(RetainError, match="different config"):
        run_sweep(sweep_of(grid={"seed": [1, 0]}, eval={"tasks": ["countdown"], "n": 5}), out, workers=0)
    assert calls == []


def test_a_run_that_fails_twice_is_reported_and_the_cli_exits_1(tmp_path, capsys):
    """In a spawn process pool: the run with a missing model fails on both attempts, the other one finishes."""
    config = write_sweep(tmp_path / "sweep.yaml", grid={"model": ["base", str(tmp_path / "no-such-model")]})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(config), "--backend", "local", "--workers", "1", "--out", str(out)])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "retrying once" in captured.err and "failed twice" in captured.err
    assert "1 done, 0 skipped (already finished), 1 failed" in captured.out
    saved = json.loads((out / "sweep.json").read_text())
    status = {r["values"]["model"]: r for r in saved["runs"]}
    bad = status[str(tmp_path / "no-such-model")]
    assert bad["status"] == "failed" and bad["attempts"] == 2 and len(bad["errors"]) == 2
    assert "no-such-model" in bad["errors"][0]["error"]
    assert saved["failed"] == [bad["name"]]
    assert status["base"]["status"] == "done" and (out / status["base"]["dir"] / "results.json").is_file()


# --- the Ray backend --------------------------------------------------------------------------------------------
def test_ray_sweep_on_a_local_cluster_then_compare(tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = sweep_of(grid={"method": ["sft", "grpo"]}, resources={"cpus": 1, "gpus": 0})
    out = tmp_path / "sweep"
    try:
        summary = run_sweep(cfg, out, backend="ray", workers=2)  # a local cluster of 2 CPUs, one run on each
        assert not ray.is_initialized()  # the cluster the sweep started is shut down
    finally:
        ray.shutdown()
    assert summary["failed"] == [] and [r["status"] for r in summary["runs"]] == ["done", "done"]
    hosts = {r["host"] for r in summary["runs"]}
    assert hosts and None not in hosts
    capsys.readouterr()
    main(["compare", str(out)])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4  # header, rule, one row per run
    assert "| tiny/method=grpo | grpo | 0 |" in table[2] and "| tiny/method=sft | sft | 0 |" in table[3]
    main(["compare", str(out), "--csv"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("run,name,method")


def test_ray_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(RetainError, match=r"pip install 'retain\[ray\]'"):
        run_sweep(sweep_of(), tmp_path / "out", backend="ray")


def test_example_sweep_file_is_valid():
    runs = expand(load_sweep(Path(__file__).parent.parent / "configs" / "sweep.yaml"))
    assert [r.name for r in runs] == ["method=sft,seed=0", "method=sft,seed=1", "method=grpo,seed=0", "method=grpo,seed=1"]
