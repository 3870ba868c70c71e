"""Every tracker logs the same content: one 2-stage run on the embedded model with TensorBoard, MLflow, W&B (offline)
and trackio (local) on — whichever are installed — read back through each tracker's own reader and compared with
what the run's files hold (steps.jsonl, stage.json, results.json). Then a sweep's runs as runs of one project, the
trackers' directories, and the errors of a missing package."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

import retain
from retain.config import parse_experiment
from retain.errors import RetainError
from retain.files import read_json, read_jsonl
from retain.tracking import TRACKERS, Tracking, parse_report_to

INSTALLED = [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
NEEDS = "not installed: pip install 'retain[tracking]'"
SERIES = ["train/loss", "train/reward", "train/kl", "train/grad_norm", "train/learning_rate", "eval/arith/accuracy",
          "eval/reverse/accuracy", "shift/weight_l2", "shift/from_base/forward/per_sequence",
          "metrics/average_accuracy", "metrics/forgetting_measure"]


def needs(name: str):
    return pytest.mark.skipif(name not in INSTALLED, reason=f"{name} {NEEDS}")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The embedded base: 2 SFT steps on arith, 2 GRPO steps on reverse (reward and KL logged), an in-stage
    checkpoint each (logged at the stage's end, behind its last step: W&B's axis must cope)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    grpo = {"name": "grpo", "data": {"prompts_per_step": 2, "group_size": 2}, "max_new_tokens": 6,
            "train": {"lr": 1e-3, "log_every": 1}}
    config = {
        "name": "eco", "model": "base", "report_to": INSTALLED,
        "method": {"name": "sft", "batch_size": 4, "train": {"lr": 1e-3, "log_every": 1}},
        "stages": [{"task": "arith", "steps": 2}, {"task": "reverse", "steps": 2, "method": grpo}],
        "eval": {"tasks": ["arith"], "n": 4, "checkpoints": 2}, "shift": {"prompts": 2},
    }
    out = tmp_path_factory.mktemp("trackers") / "run"
    try:
        results = retain.run(config, out).results
    finally:
        torch.set_num_threads(threads)
    return out, results


def expected(out: Path, results: dict) -> dict[str, list[tuple[int, float]]]:
    """What every tracker should hold, built from the run's own files, on the one step axis (stage 2 after 1)."""
    series: dict[str, list[tuple[int, float]]] = {name: [] for name in SERIES}
    names = {"loss": "train/loss", "reward": "train/reward", "kl_mean": "train/kl", "grad_norm": "train/grad_norm",
             "lr": "train/learning_rate"}
    offset = {1: 0, 2: 2}
    for record in read_jsonl(out / "steps.jsonl"):
        for field, name in names.items():
            if field in record:
                series[name].append((offset[record["stage"]] + record["step"], record[field]))
    columns = results["eval_tasks"]
    for column in columns:
        series[f"eval/{column}/accuracy"].append((0, results["matrix"][0][columns.index(column)]))
    for stage in (1, 2):
        record = read_json(out / "stages" / str(stage) / "stage.json")
        for point in record["trajectory"]:
            for column, cell in point["row"].items():
                series[f"eval/{column}/accuracy"].append((offset[stage] + point["step"], cell["accuracy"]))
        for column in columns:
            series[f"eval/{column}/accuracy"].append((2 * stage, results["matrix"][stage][columns.index(column)]))
        series["shift/weight_l2"].append((2 * stage, results["shift"]["weight_l2"][stage - 1]))
        series["shift/from_base/forward/per_sequence"].append((2 * stage, results["shift"]["forward_kl"][stage - 1]))
    for name in ("average_accuracy", "forgetting_measure"):
        series[f"metrics/{name}"].append((4, results["metrics"][name]))
    return {name: sorted(points, key=lambda p: p[0]) for name, points in series.items()}


def same(logged: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]) -> None:
    for name, points in want.items():
        got = sorted(logged.get(name, []), key=lambda p: p[0])
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name


def test_the_run_logs_every_kind_of_value(tracked):
    out, results = tracked
    want = expected(out, results)
    assert len(want["train/loss"]) == 4 and len(want["train/reward"]) == 2 and len(want["train/kl"]) == 2
    assert [s for s, _ in want["eval/arith/accuracy"]] == [0, 1, 2, 3, 4]  # base, checkpoint, end, checkpoint, end


@needs("tensorboard")
def test_tensorboard_holds_it(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = tracked
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    same({name: [(e.step, e.value) for e in events.Scalars(name)] for name in events.Tags()["scalars"]},
         expected(out, results))
    assert "accuracy_matrix/text_summary" in events.Tags()["tensors"]


@needs("mlflow")
def test_mlflow_holds_it(tracked):
    from mlflow.tracking import MlflowClient

    out, results = tracked
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("eco").experiment_id])
    assert run.info.status == "FINISHED"
    same({name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] for name in SERIES},
         expected(out, results))
    matrix = json.loads(Path(client.download_artifacts(run.info.run_id, "accuracy_matrix.json", str(out))).read_text())
    assert [row[1:] for row in matrix["data"]] == results["matrix"]


# ---- W&B: the offline run's .wandb file, read with W&B's own record type -------------------------------------------


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's header, then LevelDB's log format (32 KiB blocks; each piece a 7-byte
    header — crc32 of type + data, length, type — FULL=1 or FIRST=2, MIDDLE=3, LAST=4), each record one
    ``wandb_internal_pb2.Record``. wandb 0.2x+ reads these in its Go core only, so the framing is read here."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), "not a .wandb file"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or kind == 0:  # the block's zero-filled tail
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: damaged record at {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(run_dir: Path) -> tuple[dict, dict[str, list[tuple[int, float]]], dict[str, object]]:
    """(run record fields, every logged scalar against global_step, the last non-scalar values) of the one offline
    run under ``run_dir/wandb``."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run, series, other = {}, {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"project": record.run.project, "name": record.run.display_name, "dir": path.parent}
        elif kind == "history":
            items: dict = {}
            for item in record.history.item:  # a logged dict (a table's reference) comes as one item per field
                key, *inner = [item.key] if item.key else list(item.nested_key)
                value = json.loads(item.value_json)
                if inner:
                    items.setdefault(key, {})["/".join(inner)] = value
                else:
                    items[key] = value
            step = items.pop("global_step", None)
            for key, value in items.items():
                if key.startswith("_"):
                    continue
                if isinstance(value, (int, float)) and step is not None:
                    series.setdefault(key, []).append((int(step), float(value)))
                else:
                    other[key] = value
    return run, series, other


@needs("wandb")
def test_wandb_offline_run_holds_it(tracked):
    out, results = tracked
    run, series, other = wandb_run(out)
    assert run["project"] == "eco" and run["name"] == "run"
    same(series, expected(out, results))
    table = other["accuracy_matrix"]
    assert table["_type"] == "table-file"
    written = json.loads((run["dir"] / "files" / table["path"]).read_text())  # the table file W&B wrote
    assert written["columns"] == ["stage", *results["eval_tasks"]]
    assert [row[1:] for row in written["data"]] == results["matrix"]


@needs("trackio")
def test_trackio_database_holds_it(tracked):
    import trackio.utils
    from trackio.sqlite_storage import SQLiteStorage

    out, results = tracked
    assert (Path(trackio.utils.TRACKIO_DIR) / "eco.db").exists()
    assert SQLiteStorage.get_runs("eco") == ["run"]
    logs = SQLiteStorage.get_logs("eco", "run")
    series = {name: [(row["step"], row[name]) for row in logs if name in row] for name in SERIES}
    same(series, expected(out, results))
    (table,) = [row["accuracy_matrix"]["_value"] for row in logs if "accuracy_matrix" in row]
    assert [[row[c] for c in results["eval_tasks"]] for row in table] == results["matrix"]


# ---- a sweep's runs, the trackers' directories, missing packages ---------------------------------------------------

SWEEP_SCRIPT = """
import json, os, sys
from pathlib import Path
from retain.config import parse_experiment
from retain.tracking import Tracking

sweep, report_to = Path(sys.argv[1]), sys.argv[2].split(",")
for seed in (0, 1):
    cfg = parse_experiment({"name": f"grid/seed={seed}", "report_to": report_to, "stages": [{"task": "arith", "steps": 2}]})
    tracking = Tracking(cfg, sweep / f"seed={seed}", store=sweep)
    for step in (1, 2):
        tracking.log({"train/loss": seed + step / 10}, step)
    tracking.close()
found = {"env": os.environ.get("TRACKIO_DIR")}
if "trackio" in report_to:
    import trackio.utils
    from trackio.sqlite_storage import SQLiteStorage
    found["dir"] = str(trackio.utils.TRACKIO_DIR)
    found["runs"] = {r: [[row["step"], row["train/loss"]] for row in SQLiteStorage.get_logs("grid", r)]
                     for r in SQLiteStorage.get_runs("grid")}
print("FOUND " + json.dumps(found))
"""


@pytest.mark.skipif(not {"wandb", "trackio"} & set(INSTALLED), reason=f"neither wandb nor trackio is {NEEDS}")
def test_a_sweeps_runs_are_runs_of_one_project(tmp_path):
    """In a fresh process (trackio chooses its directory at its first import): trackio's database in the sweep's
    directory holding both runs, each W&B offline run in its run directory under the experiment's project."""
    report_to = [name for name in ("wandb", "trackio") if name in INSTALLED]
    sweep = tmp_path / "sweep"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SWEEP_SCRIPT), str(sweep), ",".join(report_to)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("FOUND ", 1)[1])
    assert found["env"] is None  # set for trackio's import only: a process started from this one chooses its own
    logged = {seed: [[1, seed + 0.1], [2, seed + 0.2]] for seed in (0, 1)}
    if "trackio" in report_to:
        assert Path(found["dir"]) == sweep / "trackio" and (sweep / "trackio" / "grid.db").exists()
        assert found["runs"] == {f"seed={s}": points for s, points in logged.items()}
    if "wandb" in report_to:
        for seed, points in logged.items():
            run, series, _ = wandb_run(sweep / f"seed={seed}")
            assert run["project"] == "grid" and run["name"] == f"seed={seed}"
            assert series["train/loss"] == [tuple(p) for p in points]


@needs("trackio")
def test_trackio_in_another_directory_is_warned(tmp_path, caplog):
    import trackio.utils

    from retain.tracking import import_trackio

    import_trackio(tmp_path / "first")  # trackio's directory, unless this process imported it before
    with caplog.at_level("WARNING", logger="retain"):
        import_trackio(tmp_path / "other")
    assert f"trackio logs to {trackio.utils.TRACKIO_DIR}" in caplog.text and str(tmp_path / "other") in caplog.text


def test_every_tracker_is_a_name_and_a_missing_one_names_the_extra(tmp_path, monkeypatch):
    assert parse_report_to("wandb,trackio, tensorboard") == ["wandb", "trackio", "tensorboard"]
    with pytest.raises(RetainError, match="unknown tracker 'comet'.*tensorboard, mlflow, trackio, wandb"):
        parse_report_to("comet")
    real = importlib.util.find_spec
    for name in ("wandb", "trackio"):
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, gone=name: None if n == gone else real(n, *a))
        cfg = parse_experiment({"report_to": [name], "stages": [{"task": "arith"}]})
        with pytest.raises(RetainError, match=rf"{name} needs the {name} package: pip install 'retain\[tracking\]'"):
            Tracking(cfg, tmp_path / "run")


@needs("mlflow")
def test_a_run_that_raises_is_closed_as_failed(tmp_path, monkeypatch):
    """A run that dies of an error (here a full disk as results.json is written) is closed in its trackers as
    failed, not left RUNNING; the finished run of the fixture is FINISHED."""
    from mlflow.tracking import MlflowClient

    from retain.files import reset_fault_counts

    config = {"name": "dies", "model": "base", "report_to": ["mlflow"],
              "method": {"name": "sft", "batch_size": 2, "train": {"lr": 1e-3}},
              "stages": [{"task": "arith", "steps": 1}], "eval": {"tasks": ["arith"], "n": 2}, "shift": {"prompts": 1}}
    out = tmp_path / "run"
    monkeypatch.setenv("RETAIN_FAULT", "results:1:enospc")
    reset_fault_counts()
    with pytest.raises(OSError):
        retain.run(config, out)
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("dies").experiment_id])
    assert run.info.status == "FAILED"
