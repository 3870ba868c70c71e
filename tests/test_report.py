"""The report: aggregation over seeds, the findings' verdict rules, the figures and the self-contained HTML.

Everything runs on fabricated demo directories: ``make_results`` builds a valid results.json (the runner's own
``compute_metrics`` computes its metrics) from a few knobs — how much each stage gains, how much earlier tasks and the
prior skills are forgotten, the KL shift — plus per-seed noise.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retain.config import ExperimentConfig
from retain.results import compute_metrics

TASKS = ["gpoints", "kg", "countdown"]
PRIOR = ["facts", "reverse", "arith"]


def make_config(method: str, lr: float, seed: int) -> ExperimentConfig:
    return ExperimentConfig(
        name=f"{method}_lr{lr:g}_s{seed}", seed=seed, method={"name": method, "train": {"lr": lr}},
        stages=[{"task": t} for t in TASKS], eval={"tasks": ["auto"] + [f"{t}@train" for t in TASKS], "n": 64},
    )


def make_results(method: str, lr: float, seed: int, *, gain: float = 0.3, forget: float = 0.05, drop: float = 0.1,
                 ood: float = 0.0, kl: float = 1.0, noise: float = 0.01, base: float = 0.2,
                 prior_base: float = 0.9, train_extra: float = 0.1, ood_base: float = 0.3) -> dict[str, Any]:
    """A valid results.json: stage task j gains ``gain`` at its stage and loses ``forget`` per later stage; prior skills
    fall linearly to ``prior_base − drop``; the gpoints OOD split moves by ``ood``; the last stage's forward KL is
    ``kl`` (reverse KL 0.5·kl + 0.1, weight L2 √kl); ``noise`` is the sd of seeded Gaussian noise on every cell."""
    cfg = make_config(method, lr, seed)
    cols = cfg.eval_tasks()
    T = len(TASKS)
    rng = np.random.default_rng(zlib.crc32(f"{method}|{lr}|{seed}".encode()))
    matrix = []
    for k in range(T + 1):
        row = []
        for c in cols:
            name, _, split = c.partition("@")
            if name in TASKS:
                j = TASKS.index(name) + 1
                held = base + (gain - forget * (k - j) if k >= j else 0.0)
                v = held + train_extra if split == "train" else held
                if split == "ood":
                    v = ood_base + (ood * k / T if name == "gpoints" else 0.0)
            else:
                v = prior_base - drop * k / T
            eps = rng.normal(0.0, noise) if noise and k > 0 else 0.0
            row.append(float(v + eps))
        matrix.append(row)
    shift = {
        "forward_kl": [kl * (k + 1) / T for k in range(T)],
        "forward_kl_exact": [kl * (k + 1) / T for k in range(T)],
        "reverse_kl": [(0.5 * kl + 0.1) * (k + 1) / T for k in range(T)],
        "reverse_kl_exact": [(0.5 * kl + 0.1) * (k + 1) / T for k in range(T)],
        "weight_l2": [math.sqrt(max(kl, 0.0)) * (k + 1) / T for k in range(T)],
    }
    return {
        "config": cfg.model_dump(mode="json"), "seeds": {"run": seed, "stages": [seed * 1000 + k for k in range(T)]},
        "versions": {}, "tasks": list(TASKS), "eval_tasks": cols, "matrix": matrix,
        "eval_n": [[64] * len(cols) for _ in range(T + 1)], "metrics": compute_metrics(cfg, cols, matrix),
        "shift": shift, "train_seconds": [1.0] * T,
    }


def _steps(method: str, seed: int) -> list[dict[str, Any]]:
    out = []
    for stage, task in enumerate(TASKS, 1):
        for step in range(1, 21):
            rec = {"stage": stage, "task": task, "step": step, "loss": 2.0 / (1 + 0.2 * step) + 0.01 * seed,
                   "lr": 1e-4, "grad_norm": 1.0}
            if method == "grpo":
                rec.update(reward=0.2 + 0.02 * step, accuracy=0.2 + 0.02 * step, kl_mean=0.001 * step)
            out.append(rec)
    return out


def make_demo(root: Path, spec: dict[str, dict[float, Any]], seeds: list[int] = (0, 1, 2), tokens: bool = True,
              demo_json: bool = True) -> Path:
    """Write a demo directory. ``spec[method][lr]`` is a dict of ``make_results`` knobs, or a callable
    ``seed -> knobs``."""
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    for method, lrs in spec.items():
        for lr, knobs in lrs.items():
            for seed in seeds:
                kw = knobs(seed) if callable(knobs) else knobs
                name = f"runs/{method}_lr{lr:g}_s{seed}"
                d = root / name
                d.mkdir(parents=True)
                (d / "results.json").write_text(json.dumps(make_results(method, lr, seed, **kw)))
                (d / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _steps(method, seed)))
                runs.append({"method": method, "lr": lr, "seed": seed, "dir": name})
    if demo_json:
        rng = np.random.default_rng(0)
        tok = {}
        if tokens:
            for t in TASKS:
                h = np.abs(rng.normal(0.8, 0.7, 300))
                p = rng.beta(2, 1.5, 300)
                p[:30] = rng.uniform(0, 0.08, 30)
                h[:30] = rng.uniform(0, 0.4, 30)
                rows = [{"entropy": float(a), "prob": float(b), "example": i // 5, "position": i % 5, "token": 7}
                        for i, (a, b) in enumerate(zip(h, p))]
                tok[t] = {"summary": {"tokens": 300, "conflict_share": float(np.mean((h < 0.5) & (p < 0.1))),
                                      "entropy_max": 0.5, "prob_max": 0.1}, "rows": rows}
        demo = {"preset": "test", "sequence": TASKS, "methods": list(spec), "seeds": list(seeds),
                "lrs": {m: sorted(v) for m, v in spec.items()}, "runs": runs, "tokens": tok,
                "thresholds": {"entropy_max": 0.5, "prob_max": 0.1}, "wall_seconds": 412.0, "peak_rss_mb": 1800.0,
                "base_model": "embedded base (1.8M)", "machine": "test machine"}
        (root / "demo.json").write_text(json.dumps(demo))
    return root


def _findings(root: Path) -> dict[str, dict[str, Any]]:
    from retain.report.aggregate import aggregate
    from retain.report.findings import findings

    return {f["id"]: f for f in findings(aggregate(root))}


SFT_FORGETS = {"gain": 0.35, "forget": 0.15, "drop": 0.25, "ood": -0.1, "kl": 2.0}
GRPO_KEEPS = {"gain": 0.3, "forget": 0.01, "drop": 0.01, "ood": 0.05, "kl": 0.5}


# ----------------------------------------------------------------------------------------------------------------
# (a) the comparison findings


def test_grpo_forgets_less_is_reproduced(tmp_path: Path) -> None:
    root = make_demo(tmp_path, {"sft": {1e-4: {**SFT_FORGETS, "gain": 0.2}, 3e-4: SFT_FORGETS},
                                "grpo": {1e-5: {**GRPO_KEEPS, "gain": 0.1}, 3e-5: GRPO_KEEPS}})
    f = _findings(root)
    assert f["1"]["verdict"] == "reproduced", f["1"]
    assert f["2"]["verdict"] == "reproduced", f["2"]
    assert f["6"]["verdict"] == "reproduced", f["6"]
    assert "lr 0.0003" in f["1"]["measured"] and "lr 3e-05" in f["1"]["measured"]  # the operating points
    for x in f.values():
        assert set(x) >= {"id", "claim", "paper", "measured", "verdict", "rule"} and x["rule"]


def test_grpo_forgets_more_is_not_reproduced(tmp_path: Path) -> None:
    root = make_demo(tmp_path, {"sft": {1e-4: GRPO_KEEPS, 3e-4: GRPO_KEEPS}, "grpo": {1e-5: SFT_FORGETS,
                                                                                      3e-5: SFT_FORGETS}})
    f = _findings(root)
    assert f["1"]["verdict"] == "not reproduced"
    assert f["2"]["verdict"] == "not reproduced"
    assert f["6"]["verdict"] == "not reproduced"


def test_overlapping_groups_are_inconclusive(tmp_path: Path) -> None:
    # both near zero drop: with equal non-zero drops '≫' would be clearly missed (see the next test)
    same = {"gain": 0.3, "forget": 0.05, "drop": 0.005, "noise": 0.03}
    root = make_demo(tmp_path, {"sft": {3e-4: same}, "grpo": {3e-5: {**same, "drop": 0.004, "forget": 0.048}}})
    f = _findings(root)
    assert f["1"]["verdict"] == "inconclusive"
    assert f["2"]["verdict"] == "inconclusive"
    d = f["1"]["numbers"]["d"]
    assert d["low"] < 0 < d["high"]


def test_much_larger_needs_the_factor(tmp_path: Path) -> None:
    # SFT clearly drops more, but only ~1.3× GRPO's drop: '≫' (more than 2×) is clearly not met
    root = make_demo(tmp_path, {"sft": {3e-4: {**SFT_FORGETS, "drop": 0.26}}, "grpo": {3e-5: {**GRPO_KEEPS,
                                                                                                "drop": 0.2}}})
    f = _findings(root)
    assert f["2"]["numbers"]["d"]["low"] > 0
    assert f["2"]["verdict"] == "not reproduced"


def test_one_seed_is_inconclusive(tmp_path: Path) -> None:
    root = make_demo(tmp_path, {"sft": {3e-4: SFT_FORGETS}, "grpo": {3e-5: GRPO_KEEPS}}, seeds=[0])
    f = _findings(root)
    for fid in ("1", "2", "6"):
        assert f[fid]["verdict"] == "inconclusive"
        assert "too few seeds" in f[fid]["measured"]


def test_missing_method_is_not_run(tmp_path: Path) -> None:
    root = make_demo(tmp_path, {"sft": {3e-4: SFT_FORGETS}})
    f = _findings(root)
    for fid in ("1", "2", "4", "5", "6", "7"):
        assert f[fid]["verdict"] == "inconclusive"
        assert "not run" in f[fid]["measured"]


def test_other_methods_findings(tmp_path: Path) -> None:
    spec = {
        "sft": {3e-4: SFT_FORGETS},
        "grpo": {3e-5: GRPO_KEEPS},
        "eaft": {3e-4: {**SFT_FORGETS, "gain": 0.34, "drop": 0.05}},  # keeps the gain, cuts the drop
        "self_sft": {3e-4: {**SFT_FORGETS, "drop": 0.12}},  # between
        "iterative_sft": {3e-4: {**SFT_FORGETS, "drop": 0.3}},  # worse than SFT
        "conflict_sft": {3e-4: {**SFT_FORGETS, "drop": 0.15}},
    }
    f = _findings(make_demo(tmp_path, spec))
    assert f["4"]["verdict"] == "reproduced", f["4"]
    assert f["5"]["verdict"] == "not reproduced", f["5"]  # iterative_sft is not between
    assert "self_sft" in f["5"]["measured"] and "→ reproduced" in f["5"]["measured"]
    assert f["7"]["verdict"] == "reproduced", f["7"]


def test_ood_finding_is_inconclusive_when_the_base_scores_zero(tmp_path: Path) -> None:
    spec = {"sft": {3e-4: {**SFT_FORGETS, "ood": 0.0, "ood_base": 0.0, "noise": 0.0}},
            "grpo": {3e-4: {**GRPO_KEEPS, "ood": 0.0, "ood_base": 0.0, "noise": 0.0}}}
    f = _findings(make_demo(tmp_path, spec))["6"]
    assert f["verdict"] == "inconclusive" and "cannot be measured" in f["measured"], f
    # the same runs with a base that can fall: SFT falls, GRPO rises -> reproduced
    spec = {"sft": {3e-4: SFT_FORGETS}, "grpo": {3e-4: GRPO_KEEPS}}
    assert _findings(make_demo(tmp_path / "b", spec))["6"]["verdict"] == "reproduced"


def test_eaft_losing_the_gain_is_not_reproduced(tmp_path: Path) -> None:
    spec = {"sft": {3e-4: SFT_FORGETS}, "eaft": {3e-4: {**SFT_FORGETS, "gain": 0.1, "drop": 0.05}}}
    assert _findings(make_demo(tmp_path, spec))["4"]["verdict"] == "not reproduced"


# ----------------------------------------------------------------------------------------------------------------
# (b) the forgetting predictor


def _kl_spec(kls: list[float], drops: list[float]) -> dict[str, dict[float, Any]]:
    spec: dict[str, dict[float, Any]] = {"sft": {}, "grpo": {}}
    for i, (kl, dr) in enumerate(zip(kls, drops)):
        spec["sft" if i % 2 else "grpo"][1e-5 * (i + 1)] = {"kl": kl, "drop": dr, "noise": 0.0}
    return spec


def test_kl_on_an_exact_quadratic_is_reproduced(tmp_path: Path) -> None:
    kls = list(np.linspace(0.1, 3.0, 8))
    drops = [0.01 + 0.02 * x + 0.03 * x * x for x in kls]
    f = _findings(make_demo(tmp_path, _kl_spec(kls, drops), seeds=[0]))["3"]
    assert f["verdict"] == "reproduced", f
    assert f["numbers"]["fits"]["forward"]["r2"] == pytest.approx(1.0, abs=1e-9)
    assert "reverse KL" in f["measured"] and "weight L2" in f["measured"]


def test_shuffled_kl_is_not_reproduced(tmp_path: Path) -> None:
    kls = list(np.linspace(0.1, 3.0, 8))
    drops = [0.01 + 0.02 * x + 0.03 * x * x for x in kls]
    shuffled = list(np.random.default_rng(3).permutation(kls))
    f = _findings(make_demo(tmp_path, _kl_spec(shuffled, drops), seeds=[0]))["3"]
    assert f["verdict"] == "not reproduced", f


def test_kl_with_too_few_runs_is_inconclusive(tmp_path: Path) -> None:
    f = _findings(make_demo(tmp_path, _kl_spec([0.1, 0.5, 1.0], [0.01, 0.05, 0.1]), seeds=[0]))["3"]
    assert f["verdict"] == "inconclusive"


# ----------------------------------------------------------------------------------------------------------------
# statistics and aggregation, by hand


def test_welch_contrast_by_hand() -> None:
    from retain.report.findings import contrast

    c = contrast([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    # d = 2 − 6 = −4; se² = 1/3 + 4/3 = 5/3; df = (5/3)² / ((1/3)²/2 + (4/3)²/2) = 2.941 → 2; t = 4.3027
    assert c["d"] == pytest.approx(-4.0)
    assert c["df"] == 2
    assert c["high"] == pytest.approx(-4.0 + 4.3027 * math.sqrt(5 / 3), abs=1e-4)
    k2 = contrast([1.0, 2.0, 3.0], [4.0, 6.0, 8.0], k=2.0)  # 2 − 12, se² = 1/3 + 4·4/3
    assert k2["d"] == pytest.approx(-10.0)
    assert contrast([1.0], [2.0, 3.0])["low"] is None


def test_pareto_and_operating_point() -> None:
    from retain.report.aggregate import pareto_frontier

    pts = [(1e-4, 0.5, 0.02), (3e-4, 0.6, 0.10), (1e-3, 0.55, 0.2), (3e-3, 0.6, 0.3)]
    assert pareto_frontier(pts) == [1e-4, 3e-4]
    assert pareto_frontier([(1, None, 0.1), (2, 0.3, 0.2)]) == [2]


def test_aggregate_without_demo_json(tmp_path: Path) -> None:
    from retain.report.aggregate import aggregate

    root = make_demo(tmp_path, {"sft": {1e-4: {"gain": 0.2}, 3e-4: {"gain": 0.4}}}, demo_json=False)
    agg = aggregate(root)
    assert agg["methods"] == ["sft"]
    assert [g["lr"] for g in agg["groups"]] == [1e-4, 3e-4]
    assert agg["operating_points"] == {"sft": 3e-4}
    g = agg["groups"][1]
    assert g["n_seeds"] == 3 and len(g["stats"]["prior_drop"]["values"]) == 3
    assert g["stats"]["heldout:gpoints"]["mean"] == pytest.approx(0.2 + 0.4 - 0.1, abs=0.05)
    assert g["stats"]["train_mean"]["mean"] > g["stats"]["heldout_mean"]["mean"]
    assert "ood:gpoints@ood" in g["stats"] and not any(k.endswith("@train") for k in g["stats"] if k.startswith("ood:"))
    assert g["stats"]["forward_kl"]["mean"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# (c) the whole report


FULL_SPEC = {
    "sft": {1e-4: {**SFT_FORGETS, "gain": 0.2, "drop": 0.1, "kl": 1.2}, 3e-4: SFT_FORGETS},
    "grpo": {1e-5: {**GRPO_KEEPS, "gain": 0.15, "kl": 0.3}, 3e-5: GRPO_KEEPS},
    "eaft": {3e-4: {**SFT_FORGETS, "drop": 0.12, "kl": 1.3}},
}


@pytest.fixture(scope="module")
def built_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retain.report import build_report

    root = make_demo(tmp_path_factory.mktemp("demo"), FULL_SPEC)
    path = build_report(root)
    assert path == root / "report.html"
    return root


def test_build_report_writes_every_file(built_report: Path) -> None:
    root = built_report
    pngs = sorted(p.name for p in (root / "report_files").glob("*.png"))
    assert pngs == sorted(["matrices.png", "forgetting_bars.png", "pareto.png", "kl_forward.png", "kl_reverse.png",
                           "tokens.png", "curves.png"])
    for p in (root / "report_files").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert not list(root.rglob("*.tmp"))
    summary = json.loads((root / "report_files" / "summary.json").read_text())
    assert len(summary["findings"]) == 7
    md = (root / "report.md").read_text()
    assert "| # | claim | paper | measured (95% intervals) | verdict |" in md
    assert md.count("\n| ") >= 8


def test_html_is_self_contained(built_report: Path) -> None:
    text = (built_report / "report.html").read_text()
    assert '<table id="findings">' in text
    imgs = re.findall(r"<img\b[^>]*>", text)
    assert len(imgs) == 7
    assert all('src="data:image/png;base64,' in i for i in imgs)
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower()
    assert "<link" not in text.lower()
    assert text.count("<figcaption>") == 7
    for word in ("reproduced", "operating point", "Caveats", "How to read this", "entropy &lt; 0.5 nats"):
        assert word in text


def test_descriptive_tables_never_give_a_verdict(built_report: Path) -> None:
    """Operating-point and equal-lr rows describe the sweep (forgetting follows lr × steps): their column says
    which way the numbers point, and the words of a verdict appear only in the matched-gain table above them."""
    from retain.report.html import descriptive

    assert descriptive("reproduced") == "points the paper's way" and descriptive("inconclusive") == "unclear"
    md = (built_report / "report.md").read_text()
    rows = md.split("## Descriptive comparisons", 1)[1].split("Rules:", 1)[0]
    assert "pattern (description, not a verdict)" in rows
    assert "**reproduced**" not in rows and "**not reproduced**" not in rows
    html = (built_report / "report.html").read_text()
    assert "pattern (description, not a verdict)" in html.split("Descriptive comparisons", 1)[1]
