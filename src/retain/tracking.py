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
another; ``wandb`` — an offline run in ``DIR/wandb`` (``WANDB_MODE`` may say otherwise; ``wandb sync DIR/wandb/
offline-run-*`` uploads it), project = the experiment; ``trackio`` — its local SQLite database in ``STORE/trackio``
unless ``TRACKIO_DIR`` names another (``TRACKIO_DIR=STORE/trackio trackio show``), project = the experiment, no server
started. A backend whose package is missing is one error naming the extra: ``pip install 'retain[tracking]'``.

W&B wants its step axis to only grow, and in-stage evaluation points are logged at the stage's end, behind its
last training step: W&B's own step counts calls, and every metric is plotted against ``global_step`` (the axis
above; ``define_metric``).

Everything is read from the run's own files when the runner announces them (its progress events), so tracking
changes nothing about the run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from retain.config import ExperimentConfig
from retain.errors import RetainError
from retain.files import read_json

INSTALL = "pip install 'retain[tracking]'"
TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")
PREFIXES = ("train", "eval", "shift", "metrics")  # every logged name starts with one of these
TRL_NAMES = {"loss": "train/loss", "reward": "train/reward", "kl": "train/kl", "entropy": "train/entropy",
             "kl_mean": "train/kl", "grad_norm": "train/grad_norm", "lr": "train/learning_rate"}
NOT_SCALARS = {"stage", "step", "task", "event"}
EVAL_FIELDS = ("accuracy", "pass_at_k", "nll")

Progress = Callable[[str, dict[str, Any]], None]

logger = logging.getLogger("retain")


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

    def close(self, failed: bool = False) -> None:
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

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandB:
    def __init__(self, out: Path, store: Path, experiment: str, run: str) -> None:
        try:
            import wandb
        except ImportError:
            raise RetainError(f"report_to: wandb needs the wandb package: {INSTALL}") from None
        self.wandb = wandb
        # no console capture, git probe or system sampling: the run's own files say what they would
        settings = wandb.Settings(console="off", disable_git=True, save_code=False, x_disable_stats=True,
                                  x_disable_meta=True, silent=True)
        self.run = wandb.init(project=tag(experiment), name=run, dir=str(out), reinit="create_new", settings=settings,
                              mode=os.environ.get("WANDB_MODE", "offline"))
        self.run.define_metric("global_step")
        for prefix in PREFIXES:
            self.run.define_metric(f"{prefix}/*", step_metric="global_step")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "global_step": step})

    def table(self, name: str, markdown: str, rows: dict[str, Any]) -> None:
        self.run.log({name: self.wandb.Table(columns=rows["columns"], data=rows["data"])})

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackio:
    def __init__(self, out: Path, store: Path, experiment: str, run: str) -> None:
        trackio = import_trackio(Path(os.environ.get("TRACKIO_DIR") or store / "trackio"))
        self.trackio = trackio
        with said_to_log():  # trackio prints where it logs and how to open its dashboard
            self.run = trackio.init(project=tag(experiment), name=run, embed=False, auto_log_gpu=False,
                                    auto_log_cpu=False)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def table(self, name: str, markdown: str, rows: dict[str, Any]) -> None:
        self.run.log({name: self.trackio.Table(columns=rows["columns"], data=rows["data"])})

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:  # trackio has no failed state: the run just ends
        with said_to_log():
            self.run.finish()
        if self.trackio.context_vars.current_run.get() is self.run:  # else trackio finishes it again at exit
            self.trackio.context_vars.current_run.set(None)


def import_trackio(directory: Path) -> Any:
    """trackio, keeping its database in ``directory``. trackio reads its directory (``TRACKIO_DIR``) once, when it is
    first imported: this sets it for that import only, and a later run of the same process that wants another one
    logs where trackio already does (warned, naming both)."""
    if "trackio" not in sys.modules:
        before = os.environ.get("TRACKIO_DIR")
        os.environ["TRACKIO_DIR"] = str(directory)
        try:
            import trackio
        except ImportError:
            raise RetainError(f"report_to: trackio needs the trackio package: {INSTALL}") from None
        finally:  # so a process started from this one (a sweep's worker) chooses its own
            if before is None:
                os.environ.pop("TRACKIO_DIR", None)
            else:
                os.environ["TRACKIO_DIR"] = before
    import trackio
    import trackio.utils

    if Path(trackio.utils.TRACKIO_DIR).resolve() != directory.resolve():
        logger.warning("trackio logs to %s, chosen by this process's first trackio run, not %s (trackio reads "
                       "TRACKIO_DIR once; one process per run directory keeps them apart)",
                       trackio.utils.TRACKIO_DIR, directory)
    return trackio


@contextlib.contextmanager
def said_to_log():
    """What a tracker prints to stdout goes to the log instead (a command's stdout is its own)."""
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            yield
    finally:
        if text.getvalue().strip():
            logger.info("%s", text.getvalue().strip())


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "trackio": Trackio, "wandb": WandB}


def parse_report_to(text: str) -> list[str]:
    """``--report-to tensorboard,wandb`` (``none``: no tracker) as the config's list; unknown names refused."""
    names = [part.strip() for part in text.split(",") if part.strip() and part.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise RetainError(f"--report-to: unknown tracker {unknown[0]!r} (trackers: {', '.join(TRACKERS)}, none)")
    return list(dict.fromkeys(names))


def check_installed(report_to: list[str]) -> None:
    """Fail before the run starts when a named tracker's package is missing."""
    import importlib.util

    for name in report_to:  # each tracker's package is named as its import
        if importlib.util.find_spec(name) is None:
            raise RetainError(f"report_to: {name} needs the {name} package: {INSTALL}")


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

    def close(self, failed: bool = False) -> None:
        """Close every backend once; ``failed``: the run raised (MLflow marks it FAILED, W&B exits 1)."""
        for backend in self.backends:
            backend.close(failed)
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
