"""Across runs: one flat table of every run's metrics and shift, as markdown, CSV or a parquet file (which DuckDB,
pandas or polars query directly: ``SELECT method, avg(prior_drop) FROM 'runs.parquet' GROUP BY method``)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from retain.errors import RetainError
from retain.files import read_json

COLUMNS = [
    "run", "name", "method", "seed", "stages", "average_accuracy", "forgetting_measure", "backward_transfer",
    "forward_transfer", "target_gain", "prior_drop", "forward_kl", "reverse_kl", "weight_l2",
]


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise RetainError(f"{run_dir}: no results.json (not a finished retain run)")
    try:
        return read_json(path)
    except ValueError:
        raise RetainError(f"{path}: not valid JSON") from None


def _last(values: list[Any] | None) -> Any:
    return values[-1] if values else None


def method_names(results: dict[str, Any]) -> str:
    """The run's method: its stages' resolved method names (results.json ``methods``), joined when they differ.
    A run written before results.json held them: read from its raw config."""
    if isinstance(results.get("methods"), list) and results["methods"]:
        names = {m.get("name", "custom") for m in results["methods"]}
    else:
        cfg = results["config"]
        name = lambda spec: spec if isinstance(spec, str) else (spec or {}).get("name", "custom")  # noqa: E731
        names = {name(s["method"]) for s in cfg["stages"] if s.get("method")} | {name(cfg["method"])}
    return "+".join(sorted(names))


def method_lr(results: dict[str, Any]) -> float | None:
    """The first stage's learning rate, as resolved (``None`` for a run whose results do not record it)."""
    methods = results.get("methods")
    if isinstance(methods, list) and methods:
        lr = (methods[0].get("train") or {}).get("lr")
    else:
        spec = results["config"].get("method")
        lr = (spec.get("train") or {}).get("lr") if isinstance(spec, dict) else None
    return float(lr) if lr is not None else None


def run_row(run_dir: str | Path, results: dict[str, Any]) -> dict[str, Any]:
    cfg = results["config"]
    metrics, shift = results["metrics"], results["shift"]
    row = {
        "run": str(run_dir),
        "name": cfg.get("name"),
        "method": method_names(results),
        "seed": results["seeds"]["run"],
        "stages": "→".join(results["tasks"]),
        **{k: metrics.get(k) for k in COLUMNS[5:11]},
        "forward_kl": _last(shift.get("forward_kl")),
        "reverse_kl": _last(shift.get("reverse_kl")),
        "weight_l2": _last(shift.get("weight_l2")),
    }
    for column, value in zip(results["eval_tasks"], results["matrix"][-1]):
        row[f"final:{column}"] = value
    return row


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself when it is a run; else every finished run below it (a sweep's or demo's directory), sorted."""
    path = Path(path)
    if (path / "results.json").is_file() or not path.is_dir():
        return [path]
    found = sorted(p.parent for p in path.rglob("results.json"))
    if not found:
        raise RetainError(f"{path}: no results.json in it or below it (not a finished retain run, nor a directory of runs)")
    return found


def compare_rows(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run; a directory that is not itself a run stands for every finished run below it."""
    if not run_dirs:
        raise RetainError("compare needs at least one run directory")
    return [run_row(d, load_results(d)) for given in run_dirs for d in find_runs(given)]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in COLUMNS if c != "run"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_parquet(rows: list[dict[str, Any]], path: str | Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(c for r in rows for c in r))
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
