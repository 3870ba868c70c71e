"""Gather a demo directory's runs and summarise them per (method, learning rate) over seeds.

Where the runs come from
------------------------
* With ``DIR/demo.json``: its ``runs`` list (``method``, ``lr``, ``seed``, ``dir`` relative to ``DIR``). A listed run
  without ``results.json`` (failed or still running) is skipped and named in ``missing``.
* Without it: every sub-directory of ``DIR`` (searched recursively) that holds a ``results.json``; the method is the
  config's method name (stage overrides joined with ``+``, as ``retain compare`` names them), the lr its
  ``train.lr`` (the preset's default when the config names only a preset), the seed the config's seed.

What is summarised
------------------
Per run (values exactly as ``results.json`` holds them, accuracies as fractions):
``prior_drop`` (positive = forgetting), ``forgetting_measure`` (≤ 0 = forgetting), ``target_gain``,
``average_accuracy``, ``backward_transfer``, ``avalanche_forgetting``, ``heldout:<task>`` (last row, held-out test
split, every stage task) and ``heldout_mean`` (their mean), ``train:<task>`` (last row, the ``<task>@train`` column:
accuracy on the training prompts) and ``train_mean``, ``ood:<task>@<split>`` (``metrics.ood_change``; ``@train``
columns are not OOD and are left out), and the last stage's shift from the base model: ``forward_kl``,
``forward_kl_exact``, ``reverse_kl``, ``reverse_kl_exact``, ``weight_l2``.

Per (method, lr) group: for each of those, the mean over seeds with a two-sided 95% Student-t interval
(:func:`retain.metrics.mean_ci`) and the per-seed values; the element-wise mean accuracy matrix.

Per method: the **operating point** — the lr whose mean ``target_gain`` is highest (ties: the lower mean prior drop,
then the smaller lr) — and the **Pareto frontier** over its lrs of new-task accuracy (``heldout_mean``, higher is
better) against prior drop (lower is better): an lr is on the frontier when no other lr of the same method is at least
as good on both and strictly better on one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from retain.comparison import method_lr, method_names
from retain.errors import RetainError
from retain.files import read_json
from retain.losses import CONFLICT_ENTROPY_MAX, CONFLICT_PROB_MAX
from retain.metrics import mean_ci
from retain.report.matched import run_points

OPERATING_POINT_RULE = (
    "operating point of a method = the learning rate with the highest mean target gain over seeds "
    "(ties: lower mean prior drop, then the smaller lr)"
)
PARETO_RULE = (
    "Pareto frontier of a method = its learning rates that no other lr of the same method beats on both new-task "
    "held-out accuracy (higher is better) and prior drop (lower is better)"
)
BASE_METRICS = (
    "prior_drop", "forgetting_measure", "target_gain", "average_accuracy", "backward_transfer", "avalanche_forgetting",
)
SHIFT_KEYS = ("forward_kl", "forward_kl_exact", "reverse_kl", "reverse_kl_exact", "weight_l2")
PREFERRED_ORDER = ("sft", "grpo", "self_sft", "iterative_sft", "eaft", "conflict_sft", "replay", "multitask",
                   "sft_likely", "sft_unlikely")


# ----------------------------------------------------------------------------------------------------------------
# finding the runs


def _method_and_lr(results: dict[str, Any]) -> tuple[str, float | None]:
    return method_names(results), method_lr(results)


def _load_results(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "matrix" in data and "config" in data else None


def discover_runs(root: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """``(demo.json or {}, runs, missing)``; each run ``{"method", "lr", "seed", "dir", "results"}``."""
    root = Path(root)
    if not root.is_dir():
        raise RetainError(f"{root}: not a directory")
    meta: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    missing: list[str] = []
    demo_file = root / "demo.json"
    if demo_file.is_file():
        try:
            meta = read_json(demo_file)
        except ValueError:
            raise RetainError(f"{demo_file}: not valid JSON") from None
    if meta.get("runs"):
        for entry in meta["runs"]:
            run_dir = root / entry["dir"]
            results = _load_results(run_dir / "results.json")
            if results is None:
                missing.append(str(entry["dir"]))
                continue
            runs.append({
                "method": str(entry["method"]), "lr": float(entry["lr"]) if entry.get("lr") is not None else None,
                "seed": entry.get("seed", results.get("seeds", {}).get("run")), "dir": run_dir, "results": results,
            })
    else:
        for path in sorted(root.rglob("results.json")):
            results = _load_results(path)
            if results is None:
                missing.append(str(path.parent.relative_to(root)))
                continue
            method, lr = _method_and_lr(results)
            runs.append({"method": method, "lr": lr, "seed": results.get("seeds", {}).get("run"),
                         "dir": path.parent, "results": results})
    return meta, runs, missing


# ----------------------------------------------------------------------------------------------------------------
# per run


def _finite(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def run_values(results: dict[str, Any]) -> dict[str, float | None]:
    """The flat per-run values listed in the module docstring (``None`` where a run does not report one)."""
    m = results.get("metrics", {})
    out: dict[str, float | None] = {k: _finite(m.get(k)) for k in BASE_METRICS}
    cols = list(results["eval_tasks"])
    last = results["matrix"][-1]
    tasks = list(results["tasks"])
    held = []
    for t in tasks:
        v = _finite(last[cols.index(t)]) if t in cols else None
        out[f"heldout:{t}"] = v
        if v is not None:
            held.append(v)
    out["heldout_mean"] = float(np.mean(held)) if held else None
    train = []
    for t in tasks:
        c = f"{t}@train"
        v = _finite(last[cols.index(c)]) if c in cols else None
        if c in cols:
            out[f"train:{t}"] = v
            if v is not None:
                train.append(v)
    out["train_mean"] = float(np.mean(train)) if train else None
    for col, v in (m.get("ood_change") or {}).items():
        if not col.endswith("@train"):
            out[f"ood:{col}"] = _finite(v)
            # the base model's accuracy there: a change from 0 can only be a rise (a fall is unmeasurable)
            out[f"ood_base:{col}"] = _finite(results["matrix"][0][cols.index(col)]) if col in cols else None
    shift = results.get("shift") or {}
    for k in SHIFT_KEYS:
        vals = shift.get(k) or []
        out[k] = _finite(vals[-1]) if vals else None
    return out


# ----------------------------------------------------------------------------------------------------------------
# per group


def summarize_values(values: list[float]) -> dict[str, Any]:
    """Mean, 95% t-interval (``mean_ci``) and the values themselves; interval fields ``None`` for one value."""
    ci = mean_ci(values)
    return {"mean": ci.mean, "low": ci.low, "high": ci.high, "half_width": ci.half_width, "n": ci.n,
            "values": [float(v) for v in values]}


def _mean_matrix(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    first = runs[0]["results"]
    shape = np.shape(first["matrix"])
    same = [r for r in runs
            if r["results"]["eval_tasks"] == first["eval_tasks"] and np.shape(r["results"]["matrix"]) == shape]
    if not same:
        return None
    arr = np.array([np.asarray(r["results"]["matrix"], dtype=float) for r in same])
    return {"eval_tasks": list(first["eval_tasks"]), "tasks": list(first["tasks"]),
            "mean": arr.mean(axis=0).tolist(), "n": len(same)}


def _order_methods(names: list[str], meta: dict[str, Any]) -> list[str]:
    listed = [m for m in meta.get("methods", []) if m in names]
    rest = [m for m in PREFERRED_ORDER if m in names and m not in listed]
    rest += sorted(m for m in names if m not in listed and m not in rest)
    return listed + rest


def _lr_key(lr: float | None) -> float:
    return -1.0 if lr is None else lr


def operating_point(groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The group (of one method) with the highest mean target gain; ties → lower mean prior drop → smaller lr."""
    def key(g: dict[str, Any]) -> tuple[float, float, float]:
        gain = g["stats"].get("target_gain")
        drop = g["stats"].get("prior_drop")
        return (-(gain["mean"] if gain else -math.inf), drop["mean"] if drop else math.inf, _lr_key(g["lr"]))

    return min(groups, key=key) if groups else None


def pareto_frontier(points: list[tuple[Any, float | None, float | None]]) -> list[Any]:
    """Keys of the non-dominated ``(key, accuracy, drop)`` points (higher accuracy, lower drop are better).

    Points missing either coordinate are never on the frontier. Returned in order of increasing drop."""
    valid = [(k, a, d) for k, a, d in points if a is not None and d is not None]
    front = []
    for k, a, d in valid:
        dominated = any((a2 >= a and d2 <= d) and (a2 > a or d2 < d) for k2, a2, d2 in valid if k2 != k)
        if not dominated:
            front.append((d, -a, k))
    return [k for _, _, k in sorted(front, key=lambda p: (p[0], p[1]))]


def conflict_thresholds(meta: dict[str, Any], tokens: dict[str, Any]) -> dict[str, float]:
    """The confident-conflict thresholds the demo used: demo.json's, else a token summary's, else the defaults."""
    thresholds = dict(meta.get("thresholds") or {})
    if not thresholds:
        for t in tokens.values():
            s = t.get("summary") or {}
            if "entropy_max" in s:
                thresholds = {"entropy_max": s["entropy_max"], "prob_max": s["prob_max"]}
                break
    thresholds.setdefault("entropy_max", CONFLICT_ENTROPY_MAX)
    thresholds.setdefault("prob_max", CONFLICT_PROB_MAX)
    return thresholds


def lr_groups(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One group per (method, lr): its seeds, each value's summary over them, the mean matrix."""
    by_key: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for r in runs:
        by_key.setdefault((r["method"], r["lr"]), []).append(r)
    groups = []
    for method in methods:
        for lr in sorted({lr for m, lr in by_key if m == method}, key=_lr_key):
            members = sorted(by_key[(method, lr)], key=lambda r: (r["seed"] is None, r["seed"]))
            keys = list(dict.fromkeys(k for r in members for k in r["values"]))
            stats = {}
            for k in keys:
                vals = [r["values"].get(k) for r in members]
                vals = [v for v in vals if v is not None]
                if vals:
                    stats[k] = summarize_values(vals)
            groups.append({"method": method, "lr": lr, "seeds": [r["seed"] for r in members],
                           "n_seeds": len(members), "stats": stats, "matrix": _mean_matrix(members),
                           "dirs": [str(r["dir"]) for r in members]})
    return groups


def eval_sizes(runs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """{column: [fewest, most] items evaluated} over every run and row."""
    eval_n: dict[str, list[int]] = {}
    for r in runs:
        res = r["results"]
        for j, col in enumerate(res["eval_tasks"]):
            ns = [row[j] for row in res.get("eval_n") or [] if j < len(row)]
            if ns:
                lo, hi = eval_n.get(col, [min(ns), max(ns)])
                eval_n[col] = [min(lo, min(ns)), max(hi, max(ns))]
    return eval_n


def aggregate(root: str | Path) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready dict (see the module docstring).

    Keys: ``dir``, ``meta`` (demo.json without its token rows), ``tokens`` (demo.json's token rows per task),
    ``thresholds``, ``scale`` (100: accuracies are shown in points), ``sequence``, ``eval_tasks``,
    ``prior_columns``, ``ood_columns``, ``runs`` (per run: method, lr, seed, dir, values), ``missing``,
    ``methods``, ``groups`` (per (method, lr): stats, matrix, seeds), ``operating_points`` ({method: lr}),
    ``pareto`` ({method: [lr, ...]}), ``eval_n`` ({column: [min, max]}), ``shift_config``, ``rules``,
    ``warnings`` (per run: the no-signal warnings its stages raised), ``rewards`` ({task: reward function}).
    """
    root = Path(root)
    meta, runs, missing = discover_runs(root)
    if not runs:
        raise RetainError(f"{root}: no finished run (no results.json) to report on")
    tokens = meta.get("tokens") or {}
    meta_small = {k: v for k, v in meta.items() if k not in ("tokens", "runs")}
    thresholds = conflict_thresholds(meta, tokens)
    run_rows = []
    for r in runs:
        r["values"] = run_values(r["results"])
        rel = Path(r["dir"]).relative_to(root) if Path(r["dir"]).is_relative_to(root) else Path(r["dir"])
        run_rows.append({"method": r["method"], "lr": r["lr"], "seed": r["seed"], "dir": str(rel),
                         "values": r["values"], "points": run_points(r["results"]),
                         "shift": r["results"].get("shift") or {}})
    methods = _order_methods(sorted({r["method"] for r in runs}), meta)
    groups = lr_groups(runs, methods)
    op, pareto = {}, {}
    for method in methods:
        mine = [g for g in groups if g["method"] == method]
        best = operating_point(mine)
        op[method] = best["lr"] if best else None
        pareto[method] = pareto_frontier([
            (g["lr"], (g["stats"].get("heldout_mean") or {}).get("mean"),
             (g["stats"].get("prior_drop") or {}).get("mean"))
            for g in mine
        ])
    first = runs[0]["results"]
    sequence = list(meta.get("sequence") or first["tasks"])
    all_cols = list(dict.fromkeys(c for r in runs for c in r["results"]["eval_tasks"]))
    prior = list(dict.fromkeys(c for r in runs for c in (r["results"].get("metrics", {}).get("prior_columns") or [])))
    ood = list(dict.fromkeys(c for r in runs for c in (r["results"].get("metrics", {}).get("ood_change") or {})
                             if not c.endswith("@train")))
    shift_cfg = first["config"].get("shift") or {}
    return {
        "dir": str(root),
        "meta": meta_small,
        "tokens": tokens,
        "thresholds": thresholds,
        "scale": 100.0,
        "sequence": sequence,
        "eval_tasks": all_cols,
        "prior_columns": prior,
        "ood_columns": ood,
        "runs": run_rows,
        "missing": missing,
        "methods": methods,
        "groups": groups,
        "operating_points": op,
        "pareto": pareto,
        "eval_n": eval_sizes(runs),
        "shift_config": {"prompts": shift_cfg.get("prompts"), "samples": shift_cfg.get("samples")},
        "rules": {"operating_point": OPERATING_POINT_RULE, "pareto": PARETO_RULE},
        # what the runs warned about (a GRPO stage without signal) and the user reward functions they trained on
        "warnings": [{"run": row["dir"], "message": w["message"]} for r, row in zip(runs, run_rows)
                     for w in r["results"].get("warnings", [])],
        "rewards": {t: name for r in runs for t, name in (r["results"].get("rewards") or {}).items()},
    }


_OP: Any = object()


def group(agg: dict[str, Any], method: str, lr: Any = _OP) -> dict[str, Any] | None:
    """The group of ``method`` at ``lr`` (default: the method's operating point); ``None`` when absent."""
    if method not in agg["operating_points"]:
        return None
    if lr is _OP:
        lr = agg["operating_points"][method]
    for g in agg["groups"]:
        if g["method"] == method and g["lr"] == lr:
            return g
    return None


def read_steps(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``steps.jsonl`` (a torn or malformed line is skipped); ``[]`` when there is none."""
    path = Path(run_dir) / "steps.jsonl"
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out
