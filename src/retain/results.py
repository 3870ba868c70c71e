"""results.json: assembled from a run's per-stage files by pure reading (the same files give the same results), in
one schema for batch and streaming runs — the accuracy matrix, its metrics, the shift table, per-item flips and the
in-stage trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retain import metrics as M
from retain import tasks as task_registry
from retain.config import ExperimentConfig
from retain.evaluate import flips
from retain.files import atomic_write_json, fault_point, read_json
from retain.rundir import versions
from retain.stage_eval import eval_seed


def collect_results(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Assemble results.json from the per-stage files."""
    stages_dir = out / "stages"
    stage_files = [read_json(stages_dir / str(k + 1) / "stage.json") for k in range(len(cfg.stages))]
    rows = [read_json(stages_dir / "0" / "eval.json")] + [s["row"] for s in stage_files]
    return results_from_rows(cfg, rows, stage_files, [s["train_seconds"] for s in stage_files])


def publish_results(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Write a finished batch run's ``DIR/results.json`` (:func:`collect_results`); its presence = the run done."""
    results = collect_results(cfg, out)
    fault_point("results")
    atomic_write_json(out / "results.json", results)
    return results


def results_from_rows(
    cfg: ExperimentConfig, rows: list[dict[str, Any]], stage_files: list[dict[str, Any]], train_seconds: list[float]
) -> dict[str, Any]:
    """results.json from the evaluation rows (before any stage, then after each) and each stage's shift."""
    eval_tasks = cfg.eval_tasks()
    matrix = [[row[c]["accuracy"] for c in eval_tasks] for row in rows]
    trajectories = [
        [{"step": 0, "row": rows[k]}, *s.get("trajectory", []), {"step": s.get("steps"), "row": rows[k + 1]}]
        for k, s in enumerate(stage_files)
    ]
    return {
        "config": cfg.model_dump(mode="json"),
        "methods": [m.model_dump(mode="json") for m in cfg.stage_methods()],  # each stage's, resolved
        "seeds": {"run": cfg.seed, "stages": [cfg.stage_seed(k) for k in range(len(cfg.stages))],
                  "eval": eval_seed(cfg)},
        "versions": versions(),
        "tasks": cfg.stage_tasks(),
        "eval_tasks": eval_tasks,
        "matrix": matrix,
        "eval_n": [[row[c]["n"] for c in eval_tasks] for row in rows],
        "metrics": compute_metrics(cfg, eval_tasks, matrix),
        "shift": shift_table(stage_files),
        "train_seconds": train_seconds,
        "flips": row_flips(rows[0], rows[-1]),
        "trajectories": trajectories,
        "warnings": [w for s in stage_files for w in s.get("warnings", [])],
        "rewards": {t: task_registry.get(t).reward_name for t in dict.fromkeys(cfg.stage_tasks())
                    if task_registry.get(t).reward_name},
    }


def row_flips(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per column, the items forgotten (correct → wrong) and learned (wrong → correct) between two rows of a run."""
    out = {}
    for column, cell in after.items():
        old = before.get(column, {}).get("correct")
        new = cell.get("correct")
        if isinstance(old, str) and isinstance(new, str) and len(old) == len(new):
            out[column] = flips(old, new)
    return out


def compute_metrics(cfg: ExperimentConfig, eval_tasks: list[str], matrix: list[list[float]]) -> dict[str, Any]:
    """The matrix metrics (:func:`retain.metrics.summarize`) over the stage tasks' columns, the prior drop over the
    columns that are neither a stage task nor one of its splits, and each stage task's OOD change."""
    stage_tasks = cfg.stage_tasks()
    R = [[row[eval_tasks.index(t)] for t in stage_tasks] for row in matrix]
    stage_related = set(stage_tasks) | {c for c in eval_tasks if c.partition("@")[0] in stage_tasks}
    prior_cols = [i for i, c in enumerate(eval_tasks) if c not in stage_related]
    ood_cols = {c: i for i, c in enumerate(eval_tasks) if "@" in c and c.partition("@")[0] in stage_tasks}
    prior = ([matrix[0][i] for i in prior_cols], [matrix[-1][i] for i in prior_cols]) if prior_cols else (None, None)
    summary = M.summarize(R, *prior)
    gains = summary["target_gains"]
    return {
        "average_accuracy": summary["average_accuracy"],
        "forgetting_measure": summary["forgetting_measure"],
        "backward_transfer": summary["backward_transfer"],
        "forward_transfer": summary["forward_transfer"],
        "avalanche_forgetting": summary["avalanche_forgetting"],
        "target_gain": sum(gains) / len(gains),
        "target_gain_per_stage": gains,
        "prior_drop": summary.get("prior_drop"),
        "prior_columns": [eval_tasks[i] for i in prior_cols],
        "ood_change": {c: matrix[-1][i] - matrix[0][i] for c, i in ood_cols.items()},
    }


def shift_table(stage_files: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """One value per stage for each shift measure (``None`` where KL measurement was switched off)."""

    def pick(s: dict[str, Any], *path: str) -> float | None:
        node: Any = s["shift"]
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    return {
        "forward_kl": [pick(s, "from_base", "forward", "per_sequence") for s in stage_files],
        "forward_kl_exact": [pick(s, "from_base", "forward", "exact_per_sequence") for s in stage_files],
        "forward_kl_per_token": [pick(s, "from_base", "forward", "per_token") for s in stage_files],
        "reverse_kl": [pick(s, "from_base", "reverse", "per_sequence") for s in stage_files],
        "reverse_kl_exact": [pick(s, "from_base", "reverse", "exact_per_sequence") for s in stage_files],
        "reverse_kl_per_token": [pick(s, "from_base", "reverse", "per_token") for s in stage_files],
        "forward_kl_from_previous": [pick(s, "from_previous", "forward", "per_sequence") for s in stage_files],
        "reverse_kl_from_previous": [pick(s, "from_previous", "reverse", "per_sequence") for s in stage_files],
        "weight_l2": [pick(s, "weight_l2") for s in stage_files],
        "weight_l2_from_previous": [pick(s, "weight_l2_from_previous") for s in stage_files],
    }
