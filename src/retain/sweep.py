"""``retain sweep``: one base experiment × a grid of overrides, each run a ``run_experiment`` of its own, on Ray or
in local processes, into one directory that ``retain compare DIR`` and ``retain report DIR`` read.

Sweep file (YAML)::

    name: sft-vs-grpo          # every field of an experiment config (retain.config.ExperimentConfig) ...
    model: base
    method: {name: sft, train: {lr: 3.0e-4}}
    stages: [{task: countdown, steps: 10}]
    eval: {n: 16}
    grid:                      # ... plus the grid: every combination is one run
      method: [sft, grpo]      # a method name swaps the preset and keeps the base method's overrides (train.lr, ...);
                               # a dict value replaces the whole method
      seed: [0, 1]
      method.train.lr: [1.0e-4, 3.0e-4]   # any field by dotted path; list items by index (stages.0.steps)
    resources: {cpus: 1, gpus: 0}        # per run (Ray: num_cpus / num_gpus; local: torch threads per run)

Every expanded run is validated as an ``ExperimentConfig`` before anything runs or is written; an unknown field path
or a bad value is one ``RetainError`` naming the grid key and value.

Output::

    DIR/sweep.json                     the plan, each run's status, attempts, errors and timings (rewritten atomically
                                       after every event)
    DIR/<run-name>/                    one run directory each (``method=sft,seed=0,method.train.lr=0.0001``)

Run names are the grid values in grid order, ``key=value`` joined by commas, made filesystem-safe. A run whose
``results.json`` exists under the same resolved config is skipped on a rerun; an interrupted one resumes after its
last finished stage (the runner does that). A run that fails is retried once, at the back of the queue, while the
others go on; ``run_sweep`` reports it and returns, and the CLI exits 1 when any run failed twice.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import resource
import socket
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retain.config import ExperimentConfig, parse_experiment
from retain.errors import RetainError
from retain.files import atomic_write_json
from retain.stored_config import config_difference
from retain.yaml_input import field_error, read_yaml

Progress = Callable[[str, dict[str, Any]], None]  # "plan", "skip", "start", "done", "failed"
MAX_ATTEMPTS = 2  # a failed run is retried once
# forwarded to every run's process (Ray workers do not inherit the driver's environment)
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class Resources(BaseModel):
    """What one run asks for: Ray's ``num_cpus`` / ``num_gpus``; locally, ``cpus`` is each run's torch threads."""

    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(1, gt=0, description="CPUs per run (torch threads: at least 1)")
    gpus: float = Field(0, ge=0, description="GPUs per run (Ray backend)")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


class SweepConfig(BaseModel):
    """A sweep file: ``base`` is the experiment (every top-level key other than ``grid`` and ``resources``)."""

    model_config = ConfigDict(extra="forbid")

    base: dict[str, Any]
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)

    @field_validator("grid", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError(f"expected a mapping of field path to a list of values, got {type(v).__name__}")
        for key, values in v.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"grid key {key!r}: expected a field path such as 'seed' or 'method.train.lr'")
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid key {key!r}: expected a non-empty list of values, got {values!r}")
            seen = []
            for value in values:
                if value in seen:
                    raise ValueError(f"grid key {key!r}: value {value!r} is listed twice")
                seen.append(value)
        return v


class SweepRun(BaseModel):
    """One expanded run: its name (= directory under the sweep's DIR), grid values and validated experiment."""

    name: str
    values: dict[str, Any]
    config: dict[str, Any]  # the raw experiment dict (re-parsed in the worker)
    experiment: ExperimentConfig


# --- the sweep file ------------------------------------------------------------------------------------------------
def parse_sweep(data: Any, source: str = "sweep") -> SweepConfig:
    if not isinstance(data, dict):
        raise RetainError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    body = {k: v for k, v in data.items() if k not in ("grid", "resources")}
    extra = {k: data[k] for k in ("grid", "resources") if k in data}
    try:
        cfg = SweepConfig(base=body, **extra)
    except ValidationError as err:  # grid messages name their key
        raise field_error(err, source, lambda loc: [str(p) for p in loc if p != "grid"]) from None
    parse_experiment(cfg.base, source)  # the base experiment alone must be valid
    return cfg


def load_sweep(path: str | Path) -> SweepConfig:
    return parse_sweep(read_yaml(path, "sweep"), str(path))


# --- grid expansion ------------------------------------------------------------------------------------------------
def _path_parts(key: str) -> list[str | int]:
    """``method.train.lr`` → ['method', 'train', 'lr']; ``stages[0].steps`` and ``stages.0.steps`` → [..., 0, ...]."""
    parts: list[str | int] = []
    for token in key.replace("[", ".").replace("]", "").split("."):
        if token == "":
            raise RetainError("not a field path (an empty part)")
        parts.append(int(token) if token.isdigit() else token)
    return parts


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = _path_parts(key)
    if parts == ["method"] and isinstance(value, str) and isinstance(data.get("method"), dict):
        data["method"] = {**data["method"], "name": value}  # swap the preset, keep the overrides
        return
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(str(p) for p in parts[:i]) or "the config"
        if isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                raise RetainError(f"{where} is a list of {len(node)}; {part!r} is not an index of it")
        elif isinstance(node, dict):
            if isinstance(part, int):
                raise RetainError(f"{where} is not a list")
        else:
            raise RetainError(f"{where} is {node!r}, not a mapping or list to set a field in")
        if last:
            node[part] = copy.deepcopy(value)
            return
        child = node[part] if isinstance(node, list) or part in node else None
        if child is None:
            child = node[part] = {}  # a new sub-mapping: validation names the field if it does not exist
        elif isinstance(child, str) and part == "method":
            child = node[part] = {"name": child}  # a preset name gets overrides
        node = child


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"]  # a whole method (or any named part) goes by its name: method=grpo
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest exact form: 0.0001, 3e-05; two floats never share a name
    if isinstance(value, (str, int)):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def run_name(values: dict[str, Any]) -> str:
    """A readable, deterministic, filesystem-safe name: ``method=sft,seed=0`` (``run`` for an empty grid)."""
    if not values:
        return "run"
    raw = ",".join(f"{k}={_fmt(v)}" for k, v in values.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+@-]", "_", raw).lstrip(".")
    if safe != raw or len(safe) > 120:  # a changed or long name gets a hash of the exact values: never two alike
        safe = safe[:100] + "-" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return safe


def _validate(data: dict[str, Any], label: str) -> ExperimentConfig:
    try:
        return parse_experiment(data, label)
    except RetainError as err:
        raise RetainError(str(err).removeprefix(f"{label}: ")) from None


def expand(cfg: SweepConfig, source: str = "sweep") -> list[SweepRun]:
    """Every combination of the grid, validated; the first invalid one raises naming its grid key and value."""
    keys = list(cfg.grid)
    for key in keys:
        try:
            _path_parts(key)
        except RetainError as err:
            raise RetainError(f"{source}: grid key {key!r}: {err}") from None
    order = sorted(range(len(keys)), key=lambda i: len(_path_parts(keys[i])))  # 'method' before 'method.train.lr'
    base_name = cfg.base.get("name", "experiment")
    runs: list[SweepRun] = []
    names: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*(cfg.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = run_name(values)
        data = copy.deepcopy(cfg.base)
        if "name" not in values:
            data["name"] = f"{base_name}/{name}" if values else base_name
        try:
            for i in order:
                _set_path(data, keys[i], combo[i])
            experiment = _validate(data, name)
        except RetainError as err:
            raise RetainError(f"{source}: {_culprit(cfg, values, order)}: {err}") from None
        if name in names:
            raise RetainError(f"{source}: grid values {names[name]} and {values} give the same run name {name!r}")
        names[name] = values
        runs.append(SweepRun(name=name, values=values, config=data, experiment=experiment))
    return runs


def _culprit(cfg: SweepConfig, values: dict[str, Any], order: list[int]) -> str:
    """The grid key whose value breaks the run: values are applied one at a time (shallow paths first, as in
    ``expand``) and the first that makes the experiment invalid is named (else the whole combination)."""
    keys = list(values)
    data = copy.deepcopy(cfg.base)
    for i in order:
        try:
            _set_path(data, keys[i], values[keys[i]])
            parse_experiment(data, "grid")
        except RetainError:
            return f"grid key {keys[i]!r}, value {values[keys[i]]!r}"
    return "grid values " + ", ".join(f"{k}={v!r}" for k, v in values.items())


# --- one run, wherever it executes ---------------------------------------------------------------------------------
def _quiet(threads: int | None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def execute_run(name: str, config: dict[str, Any], out: str, threads: int | None = None,
                env: dict[str, str] | None = None, cwd: str | None = None) -> dict[str, Any]:
    """Run one experiment; never raises: returns ``{"ok": bool, "seconds", "error", ...}`` (a worker's report)."""
    started = time.perf_counter()
    report: dict[str, Any] = {"name": name, "pid": os.getpid(), "host": socket.gethostname()}
    try:
        for k, v in (env or {}).items():
            os.environ.setdefault(k, v)
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths in the config (model dirs, datasets) mean what they meant to the driver
        _quiet(threads)
        from retain.runner import run_experiment

        # the runs of a sweep share their starting rows (retain.eval_cache): a base evaluated once per seed
        # and their tracking store (MLflow): the runs of one experiment
        run_experiment(parse_experiment(config, name), out, eval_cache=Path(out).parent / "eval_cache",
                       tracking_store=Path(out).parent)
        report["ok"] = True
    except BaseException as err:  # noqa: BLE001 — a worker reports every failure instead of dying with it
        if isinstance(err, KeyboardInterrupt):
            raise
        report.update(ok=False, error=f"{type(err).__name__}: {err}".splitlines()[0][:500],
                      traceback=traceback.format_exc()[-4000:])
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


def _pool_init(threads: int) -> None:
    _quiet(threads)


# --- executors: submit a run, wait for any to finish ---------------------------------------------------------------
class _InProcess:
    """workers=0: one run after another in this process (no isolation; handy for debugging)."""

    capacity = 1

    def __init__(self) -> None:
        self.done: dict[int, dict[str, Any]] = {}

    def submit(self, key: int, args: tuple) -> None:
        self.done[key] = execute_run(*args[:3])

    def wait_any(self) -> list[tuple[int, dict[str, Any]]]:
        out = list(self.done.items())
        self.done.clear()
        return out

    def close(self) -> None:
        pass


class _LocalPool:
    """A spawn process pool; a worker that dies (OOM, segfault) fails the runs it held and the pool is rebuilt."""

    def __init__(self, workers: int, threads: int) -> None:
        self.capacity, self.threads = workers, threads
        self.pool = self._new()
        self.futures: dict[Any, int] = {}

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.capacity, mp_context=mp.get_context("spawn"),
                                   initializer=_pool_init, initargs=(self.threads,))

    def submit(self, key: int, args: tuple) -> None:
        self.futures[self.pool.submit(execute_run, *args)] = key

    def wait_any(self) -> list[tuple[int, dict[str, Any]]]:
        finished, _ = wait(self.futures, return_when=FIRST_COMPLETED)
        out, broken = [], False
        for future in finished:
            key = self.futures.pop(future)
            try:
                out.append((key, future.result()))
            except BrokenProcessPool as err:
                broken = True
                out.append((key, {"ok": False, "error": f"worker process died: {err}"}))
            except Exception as err:  # noqa: BLE001
                out.append((key, {"ok": False, "error": f"{type(err).__name__}: {err}"}))
        if broken:
            for future, key in list(self.futures.items()):
                self.futures.pop(future)
                out.append((key, {"ok": False, "error": "worker process died (pool broken)"}))
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new()
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RetainError("backend 'ray' needs Ray: pip install 'retain[ray]'") from None
    return ray


class _RayExecutor:
    """Each run a Ray task asking for ``num_cpus`` / ``num_gpus``; connects to ``address`` or starts a local cluster."""

    def __init__(self, resources: Resources, address: str | None, workers: int | None, env: dict[str, str]) -> None:
        ray = _import_ray()
        self.ray = ray
        runtime_env = {"env_vars": env}
        self.started = False
        self.task_env: dict[str, Any] | None = None
        if ray.is_initialized():  # the caller's cluster: leave it running afterwards
            self.task_env = runtime_env
        elif address:
            try:
                ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise RetainError(f"cannot connect to the Ray cluster at {address}: {err}") from None
            self.started = True
        else:
            num_cpus = max(1, int(round((workers or 0) * resources.cpus))) if workers else None
            ray.init(num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)
            self.started = True
        available = ray.cluster_resources()
        if available.get("CPU", 0) < resources.cpus or available.get("GPU", 0) < resources.gpus:
            self.close()
            raise RetainError(f"each run asks for {resources.cpus:g} CPU / {resources.gpus:g} GPU but the Ray cluster "
                              f"has {available.get('CPU', 0):g} CPU / {available.get('GPU', 0):g} GPU")
        self.capacity = workers or 10**9  # else Ray's scheduler decides how many run at once
        options: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_retries": 0}
        if self.task_env:
            options["runtime_env"] = self.task_env
        self.remote = ray.remote(execute_run).options(**options)
        self.refs: dict[Any, int] = {}

    def submit(self, key: int, args: tuple) -> None:
        self.refs[self.remote.remote(*args)] = key

    def wait_any(self) -> list[tuple[int, dict[str, Any]]]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        out = []
        for ref in ready:
            key = self.refs.pop(ref)
            try:
                out.append((key, self.ray.get(ref)))
            except Exception as err:  # noqa: BLE001 — a crashed worker, a lost node
                out.append((key, {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:500]}"}))
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


# --- the sweep -----------------------------------------------------------------------------------------------------
def _finished(run: SweepRun, run_dir: Path) -> bool:
    """True when the run is done under this config; raises when the directory holds a different config."""
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        return False
    difference = config_difference(run.experiment, yaml.safe_load(config_file.read_text(encoding="utf-8")))
    if difference:
        raise RetainError(f"{run_dir} holds a run of a different config ({difference}; was the sweep file changed?); "
                          "choose another --out or delete that directory")
    return (run_dir / "results.json").exists()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Ledger:
    """``sweep.json``: every run's status, attempts, errors and timings, written atomically after each change, so an
    interrupted sweep leaves a record of what finished, what failed and what was running."""

    def __init__(self, path: Path, runs: list[SweepRun], skipped: set[str], header: dict[str, Any]) -> None:
        self.path = path
        self.records = [{
            "name": r.name, "dir": r.name, "values": r.values, "status": "skipped" if r.name in skipped else "pending",
            "attempts": 0, "errors": [], "seconds": None, "started": None, "finished": None,
        } for r in runs]
        self.summary: dict[str, Any] = {**header, "started": _now(), "wall_seconds": None, "runs": self.records,
                                        "failed": []}
        self.clock = time.perf_counter()

    def save(self) -> None:
        self.summary["wall_seconds"] = round(time.perf_counter() - self.clock, 2)
        atomic_write_json(self.path, self.summary)

    def start(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        rec.update(status="running", attempts=rec["attempts"] + 1, started=rec["started"] or _now())
        self.save()
        return rec

    def finish(self, i: int, report: dict[str, Any], wall: float) -> bool:
        """Record run ``i``'s report; True when it failed and gets another attempt."""
        rec = self.records[i]
        rec["finished"] = _now()
        retry = False
        if report.get("ok"):
            rec.update(status="done", seconds=report.get("seconds", round(wall, 2)),
                       peak_rss_mb=report.get("peak_rss_mb"), host=report.get("host"))
        else:
            retry = rec["attempts"] < MAX_ATTEMPTS
            rec["errors"].append({"attempt": rec["attempts"], "error": report.get("error", "unknown error"),
                                  "traceback": report.get("traceback"), "seconds": round(wall, 2)})
            rec["status"] = "retrying" if retry else "failed"
            if not retry:
                self.summary["failed"].append(rec["name"])
        self.save()
        return retry

    def interrupted(self, running: Any) -> None:
        for i in running:  # what was running when the sweep stopped is not done
            self.records[i]["status"] = "interrupted"
        self.save()


def _check_backend(backend: str, address: str | None, workers: int | None) -> None:
    if backend not in ("ray", "local"):
        raise RetainError(f"unknown backend {backend!r} (backends: ray, local)")
    if workers is not None and workers < 0:
        raise RetainError(f"--workers must be ≥ 0, got {workers}")
    if backend == "ray" and workers == 0:
        raise RetainError("--workers 0 (in this process) is for the local backend")
    if address and backend != "ray":
        raise RetainError("--address is for the ray backend")


def _executor(backend: str, sweep: SweepConfig, address: str | None, workers: int | None, env: dict[str, str]) -> Any:
    """Where the runs execute: a Ray cluster, this process (``workers`` 0) or a local spawn pool."""
    if backend == "ray":
        return _RayExecutor(sweep.resources, address, workers, env)
    if workers == 0:
        return _InProcess()
    return _LocalPool(workers or 1, sweep.resources.threads)


def run_sweep(
    config: SweepConfig | str | Path,
    out: str | Path,
    backend: Literal["ray", "local"] = "local",
    address: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    report_to: list[str] | None = None,
) -> dict[str, Any]:
    """Run every grid combination of ``config`` (a ``SweepConfig`` or a sweep file) into ``out/<run-name>/``.
    ``report_to``: trackers for every run, replacing the file's (``retain.tracking``).

    backend ``local``: a spawn process pool of ``workers`` (default 1; 0 = one after another in this process).
    backend ``ray``: one Ray task per run with the sweep's ``resources``; ``address`` connects to a cluster, else a
    local one is started (``workers`` × ``resources.cpus`` CPUs, or all of them) and shut down at the end; at most
    ``workers`` runs are in flight when given. Returns the summary also written to ``out/sweep.json``; runs that
    failed twice are listed in ``summary["failed"]`` (the sweep itself does not raise for them).
    """
    source = str(config) if isinstance(config, (str, Path)) else "sweep"
    sweep = load_sweep(config) if isinstance(config, (str, Path)) else config
    if report_to is not None:
        sweep = sweep.model_copy(update={"base": {**sweep.base, "report_to": list(report_to)}})
    _check_backend(backend, address, workers)
    runs = expand(sweep, source)  # every error before anything is written
    if backend == "ray":
        _import_ray()
    out = Path(out).resolve()
    skipped = {r.name for r in runs if _finished(r, out / r.name)}
    say = progress or (lambda event, data: None)
    ledger = _Ledger(out / "sweep.json", runs, skipped, {
        "source": source, "backend": backend, "address": address, "workers": workers,
        "resources": sweep.resources.model_dump(), "grid": sweep.grid, "base": sweep.base})

    queue = deque(i for i, r in enumerate(runs) if r.name not in skipped)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    # a cluster that cannot start or be reached is an error before sweep.json is written
    executor = _executor(backend, sweep, address, workers, env) if queue else None
    in_flight: dict[int, float] = {}
    try:
        ledger.save()
        say("plan", {"runs": len(runs), "skipped": len(skipped), "out": str(out)})
        for r in runs:
            if r.name in skipped:
                say("skip", {"name": r.name})
        while queue or in_flight:
            while queue and len(in_flight) < executor.capacity:
                i = queue.popleft()
                in_flight[i] = time.perf_counter()
                rec = ledger.start(i)
                say("start", {"name": rec["name"], "attempt": rec["attempts"]})
                executor.submit(i, (runs[i].name, runs[i].config, str(out / runs[i].name), sweep.resources.threads,
                                    env, os.getcwd()))
            for i, report in executor.wait_any():
                retry = ledger.finish(i, report, time.perf_counter() - in_flight.pop(i))
                rec = ledger.records[i]
                if retry:
                    queue.append(i)  # at the back: the others go on first
                if rec["status"] == "done":
                    say("done", {"name": rec["name"], "seconds": rec["seconds"], "attempt": rec["attempts"]})
                else:
                    say("failed", {"name": rec["name"], "error": report.get("error"), "attempt": rec["attempts"],
                                   "retry": retry})
    finally:
        if executor is not None:
            executor.close()
        ledger.interrupted(in_flight)
    done = sum(r["status"] == "done" for r in ledger.records)
    say("finished", {"done": done, "skipped": len(skipped), "failed": len(ledger.summary["failed"])})
    return ledger.summary

