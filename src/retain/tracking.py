"""Experiment tracking through the trackers' own libraries (``report_to:`` in the experiment config, TRL's option).

Logged, on one step axis that runs on across stages (stage k's step s is ``steps of stages < k + s``):

- every numeric field of each ``steps.jsonl`` record under TRL's names — ``train/loss``, ``train/reward``,
  ``train/kl``, ``train/entropy``, ``train/grad_norm``, ``train/learning_rate`` — and the rest as ``train/<field>``;
- every evaluation row, before the first stage, at the in-stage checkpoints and after each stage:
  ``eval/<column>/accuracy`` (and ``pass_at_k``, ``nll`` where measured);
- at each stage end the KL shift and weight distance from the base (``shift/forward_kl``, ...);
- at the run's end the continual metrics (``metrics/average_accuracy``, ...) and the accuracy matrix as a table.

Backends, each offline: ``tensorboard`` — event files in ``DIR/tensorboard`` (``tensorboard --logdir DIR``; a
sweep's directory shows its runs side by side); ``mlflow`` — a local file store ``STORE/mlruns`` (the run directory,
or the sweep's directory so a sweep's runs are runs of one experiment), unless ``MLFLOW_TRACKING_URI`` names
another. A backend whose package is missing is one error naming the extra: ``pip install 'retain[tracking]'``.

Everything is read from the run's own files when the runner announces them (its progress events), so tracking
changes nothing about the run.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from retain.config import ExperimentConfig
from retain.errors import RetainError
from retain.io import read_json

INSTALL = "pip install 'retain[tracking]'"
TRACKERS = ("tensorboard", "mlflow")
TRL_NAMES = {"loss": "train/loss", "reward": "train/reward", "kl": "train/kl", "entropy": "train/entropy",
             "kl_mean": "train/kl", "grad_norm": "train/grad_norm", "lr": "train/learning_rate"}
NOT_SCALARS = {"stage", "step", "task", "event"}
EVAL_FIELDS = ("accuracy", "pass_at_k", "nll")

Progress = Callable[[str, dict[str, Any]], None]


def tag(name: str) -> str:
    """A metric name every tracker accepts (MLflow allows letters, digits and ``_-./ ``): an eval column such as
    ``kg@ood`` or a dataset path becomes ``kg_ood``."""
    return re.sub(r"[^\w\-./ ]", "_", name)


class TensorBoard:
    def __init__(self, out: Path, store: Path, experiment: str, run: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RetainError(f"report_to: tensorboard needs the tensorboard package: {INSTALL}") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def table(self, name: str, markdown: str, rows: dict[str, Any]) -> None:
        self.writer.add_text(name, markdown)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, out: Path, store: Path, experiment: str, run: str) -> None:
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise RetainError(f"report_to: mlflow needs the mlflow package: {INSTALL}") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (store / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps the file store (the offline, serverless one) behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = self.client.create_experiment(experiment)
            except MlflowException:  # another run of the sweep created it first
                experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run, tags={"retain.dir": str(out)}).info.run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def table(self, name: str, markdown: str, rows: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, rows, f"{name}.json")
        self.client.log_text(self.run_id, markdown, f"{name}.md")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow}


def parse_report_to(text: str) -> list[str]:
    """``--report-to tensorboard,mlflow`` (``none``: no tracker) as the config's list; unknown names refused."""
    names = [part.strip() for part in text.split(",") if part.strip() and part.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise RetainError(f"--report-to: unknown tracker {unknown[0]!r} (trackers: {', '.join(TRACKERS)}, none)")
    return list(dict.fromkeys(names))


def check_installed(report_to: list[str]) -> None:
    """Fail before the run starts when a named tracker's package is missing."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
    for name in report_to:
        if importlib.util.find_spec(modules[name]) is None:
            raise RetainError(f"report_to: {name} needs the {modules[name]} package: {INSTALL}")


class Tracking:
    """Turns the runner's progress events into tracker calls; ``listen`` wraps the runner's progress callback."""

    def __init__(self, cfg: ExperimentConfig, out: Path, store: str | Path | None = None) -> None:
        check_installed(cfg.report_to)
        self.cfg, self.out, self.store = cfg, Path(out), Path(store) if store is not None else Path(out)
        steps = [cfg.stage_method(k).train.steps for k in range(len(cfg.stages))]
        self.offset = [sum(steps[:k]) for k in range(len(steps) + 1)]  # global step at the start of stage k+1
        self.backends: list[Any] = []
        self.base_logged = False

    def _open(self) -> None:
        if self.backends:
            return
        experiment, _, run = self.cfg.name.partition("/")  # a sweep names its runs "<experiment>/<grid values>"
        for name in self.cfg.report_to:
            self.backends.append(BACKENDS[name](self.out, self.store, experiment, run or self.out.name))

    def log(self, values: dict[str, float], step: int) -> None:
        self._open()
        values = {tag(k): float(v) for k, v in values.items()}
        for backend in self.backends:
            backend.scalars(values, step)

    def listen(self, say: Progress) -> Progress:
        def relay(event: str, data: dict[str, Any]) -> None:
            self.on_event(event, data)
            say(event, data)

        return relay

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "stage_start" and not self.base_logged:
            self.base_logged = True
            self.log(row_scalars(read_json(self.out / "stages" / "0" / "eval.json")), 0)
        elif event == "step" and "step" in data:
            values = {TRL_NAMES.get(k, f"train/{k}"): v for k, v in data.items()
                      if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.log(values, self.offset[data["stage"] - 1] + data["step"])
        elif event == "stage_done":
            stage = data["stage"]
            record = read_json(self.out / "stages" / str(stage) / "stage.json")
            for point in record.get("trajectory", []):
                self.log(row_scalars(point["row"]), self.offset[stage - 1] + point["step"])
            shift = {f"shift/{k}": v for k, v in leaves(record.get("shift") or {}).items()}
            self.log({**row_scalars(record["row"]), **shift}, self.offset[stage])
            for backend in self.backends:
                backend.flush()

    def finish(self, results: dict[str, Any]) -> None:
        """The final metrics and the accuracy matrix as a table; then every backend is closed."""
        scalars = {f"metrics/{k}": v for k, v in results["metrics"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log(scalars, self.offset[-1])
        rows = ["base", *results["tasks"]]
        table = {"columns": ["stage", *results["eval_tasks"]],
                 "data": [[label, *row] for label, row in zip(rows, results["matrix"])]}
        markdown = "\n".join(["| " + " | ".join(table["columns"]) + " |", "|---" * len(table["columns"]) + "|"]
                             + ["| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |"
                                for r in table["data"]])
        for backend in self.backends:
            backend.table("accuracy_matrix", markdown, table)
        self.close()

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def row_scalars(row: dict[str, dict[str, Any]]) -> dict[str, float]:
    """An evaluation row as ``eval/<column>/<field>`` scalars."""
    return {f"eval/{column}/{field}": cell[field] for column, cell in row.items() for field in EVAL_FIELDS
            if isinstance(cell.get(field), (int, float)) and not isinstance(cell.get(field), bool)}


def leaves(node: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict (a stage's shift), keyed by path: ``from_base/forward/per_sequence``."""
    out: dict[str, float] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out
