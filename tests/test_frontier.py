"""Matched-gain verdicts (SPEC §2.4) and the nested budget-vs-predictor test (SPEC §3.2), against hand arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retain.metrics.frontier import (
    MATCHED_RULE,
    Point,
    best_gain,
    combined_verdict,
    f_survival,
    frontier,
    matched_contrast,
    nested_predictor,
    target_gains,
    verdict,
)
from retain.metrics.matrix import MetricInputError
from retain.metrics.predictor import mean_ci


def pt(method, seed, lr, step, gain, drop, gain_test=None):
    return Point(method, seed, lr, step, gain, gain if gain_test is None else gain_test, {"drop": drop})


# --------------------------------------------------------------------------------------------------------------
# frontier and targets on a hand-built run

RUN = [
    pt("a", 0, 1e-4, 0, 0.0, 0.0),
    pt("a", 0, 3e-4, 0, 0.0, 0.0),  # the same starting model listed under both lrs
    pt("a", 0, 1e-4, 10, 0.10, 0.02),
    pt("a", 0, 1e-4, 20, 0.20, 0.05),
    pt("a", 0, 3e-4, 10, 0.25, 0.04),
    pt("a", 0, 3e-4, 20, 0.30, 0.09),
]


def test_frontier_picks_least_drop_at_or_above_g():
    # g = 0: the starting model (drop 0) wins; of the two step-0 copies the smaller lr.
    f0 = frontier(RUN, 0.0)
    assert (f0.step, f0.lr) == (0, 1e-4)
    # g = 0.15: candidates (0.20, .05), (0.25, .04), (0.30, .09) → the lr 3e-4 step-10 point, drop .04.
    f = frontier(RUN, 0.15)
    assert (f.lr, f.step, f.readouts["drop"]) == (3e-4, 10, 0.04)
    assert frontier(RUN, 0.25).gain == 0.25  # ≥, not >
    assert frontier(RUN, 0.26).readouts["drop"] == 0.09
    assert frontier(RUN, 0.31) is None
    assert best_gain(RUN) == 0.30


def test_frontier_ties_go_to_fewer_steps_then_smaller_lr():
    run = [pt("a", 0, 3e-4, 10, 0.3, 0.05), pt("a", 0, 1e-4, 20, 0.3, 0.05), pt("a", 0, 1e-4, 10, 0.3, 0.05)]
    f = frontier(run, 0.1)
    assert (f.step, f.lr) == (10, 1e-4)
    assert frontier(list(reversed(run)), 0.1) == f


def test_frontier_other_readout():
    run = [Point("a", 0, 1e-4, 10, 0.2, 0.2, {"drop": 0.01, "nll": 0.9}),
           Point("a", 0, 1e-4, 20, 0.3, 0.3, {"drop": 0.03, "nll": 0.4})]
    assert frontier(run, 0.1).step == 10
    assert frontier(run, 0.1, readout="nll").step == 20


# Three seeds of methods a and b, plus a seed 3 that only b has. At g* = 0.1 the chosen points are
# a: (step 10, gain .20, test .18, drop da_s), b: (step 10, gain .25, test .22, drop db_s).
DA, DB = [0.03, 0.02, 0.05], [0.05, 0.06, 0.08]
PAIRS = []
for s in range(3):
    PAIRS += [pt("a", s, 1e-4, 0, 0.0, 0.0), pt("a", s, 1e-4, 5, 0.05, 0.001),
              pt("a", s, 1e-4, 10, 0.20, DA[s], 0.18)]
for s in range(4):
    db = DB[s] if s < 3 else 0.07
    PAIRS += [pt("b", s, 1e-4, 0, 0.0, 0.0), pt("b", s, 1e-4, 10, 0.25, db, 0.22),
              pt("b", s, 3e-4, 10, 0.30, 0.12, 0.27)]


def test_target_gains_uses_gains_only():
    # best gains: a 0.20 on every seed, b 0.30 → the smaller mean is 0.20 → ¼, ½, ¾ of it.
    assert target_gains(PAIRS, "a", "b") == pytest.approx([0.05, 0.10, 0.15])
    # Readouts do not enter: scrambling every drop leaves the targets unchanged.
    scrambled = [Point(p.method, p.seed, p.lr, p.step, p.gain, p.gain_test, {"drop": 9.0 - i})
                 for i, p in enumerate(PAIRS)]
    assert target_gains(scrambled, "b", "a", fractions=(0.5,)) == pytest.approx([0.10])
    # Per-seed best then the mean: a = (0.4, 0.6) → 0.5; b = (0.2, 0.4) → 0.3; targets = fractions × 0.3.
    pts = [pt("a", 0, 1, 1, 0.4, 0), pt("a", 0, 1, 2, 0.1, 0), pt("a", 1, 1, 1, 0.6, 0),
           pt("b", 0, 1, 1, 0.2, 0), pt("b", 1, 1, 1, 0.4, 0)]
    assert target_gains(pts, "a", "b") == pytest.approx([0.075, 0.15, 0.225])
    # Nothing learned by b: nothing to match.
    flat = [pt("a", 0, 1, 1, 0.3, 0), pt("b", 0, 1, 1, 0.0, 0), pt("b", 0, 1, 2, -0.02, 0)]
    assert target_gains(flat, "a", "b") == []


def test_matched_contrast_by_hand():
    at0, at1, at28 = matched_contrast(PAIRS, "a", "b", [0.0, 0.1, 0.28])
    # g* = 0.1: Δ = (.03−.05, .02−.06, .05−.08) = (−.02, −.04, −.03); mean −.03; deviations (.01, −.01, 0) →
    # s² = .0002/2, s = .01; half-width = t_{.975,2}·s/√3 = 4.302653·.01/1.7320508 = 0.024842 (the table's
    # 4.3027 gives 0.0248416) → (−0.054842, −0.005158). Seed 3 has no partner: it counts for reached_b (4/4) only.
    assert at1["status"] == "ok" and at1["pairs"] == 3 and at1["readout"] == "drop"
    assert at1["delta"] == pytest.approx(-0.03)
    assert at1["low"] == pytest.approx(-0.054842, abs=2e-6)
    assert at1["high"] == pytest.approx(-0.005158, abs=2e-6)
    assert [r["delta"] for r in at1["per_seed"]] == pytest.approx([-0.02, -0.04, -0.03])
    assert at1["per_seed"][1]["a"] == {"lr": 1e-4, "step": 10, "gain": 0.20, "gain_test": 0.18, "value": 0.02}
    assert at1["per_seed"][1]["b"]["value"] == 0.06
    assert (at1["reached_a"], at1["reached_b"]) == (1.0, 1.0)
    assert (at1["gain_test_a"], at1["gain_test_b"]) == pytest.approx((0.18, 0.22))
    assert verdict(at1, -1) == "reproduced" and verdict(at1, +1) == "not reproduced"
    # g* = 0: every frontier is the starting model, Δ = 0 with no spread: the interval [0, 0] contains 0.
    assert at0["status"] == "ok" and (at0["delta"], at0["low"], at0["high"]) == (0.0, 0.0, 0.0)
    assert verdict(at0, -1) == "inconclusive"
    # g* = 0.28: a's best is 0.20, so no seed of a reaches it.
    assert at28["status"] == "not reached: a" and at28["pairs"] == 0 and at28["delta"] is None
    assert (at28["reached_a"], at28["reached_b"]) == (0.0, 1.0) and at28["gain_test_a"] is None
    assert verdict(at28, -1) == "not reached"

    assert combined_verdict([at0, at1, at28], -1) == "inconclusive"  # one ok level inconclusive
    assert combined_verdict([at1, at28], -1) == "reproduced"
    assert combined_verdict([at1, at28], +1) == "not reproduced"
    assert combined_verdict([at28], -1) == "not reached"
    assert combined_verdict([], -1) == "not reached"  # target_gains gave []: a method learned nothing
    assert "reproduced only if" in MATCHED_RULE


def test_contrast_too_few_pairs_and_reached_share():
    pts = [pt("a", 0, 1, 1, 0.3, 0.01), pt("b", 0, 1, 1, 0.3, 0.02),
           pt("a", 1, 1, 1, 0.0, 0.0), pt("b", 1, 1, 1, 0.3, 0.02)]
    (c,) = matched_contrast(pts, "a", "b", [0.2])
    # a reaches on 1 of 2 seeds: 0.5 is not below the 0.5 share, but only one pair is left.
    assert c["status"] == "too few pairs" and c["pairs"] == 1
    assert c["delta"] == pytest.approx(-0.01) and c["low"] is None and c["high"] is None
    assert verdict(c, -1) == "inconclusive" and combined_verdict([c], -1) == "inconclusive"
    (c,) = matched_contrast(pts, "a", "b", [0.2], min_reached_share=0.75)
    assert c["status"] == "not reached: a"


# --------------------------------------------------------------------------------------------------------------
# fabricated trajectories: methods that differ only by budget or lr grid


def simulate(rng, variant, n_seeds=8, drop_ratio_a=1.0):
    """Every method follows one law: gain = G·(1 − exp(−x/8)), drop = c·x, with x = lr·steps in units of the
    smallest lr × a fifth of the base budget. Gains are read as binomial accuracies on 200 prompts per half
    (SE ≈ 3 pts); drop gets N(0, 0.01). ``variant``: "budget" gives b twice the steps, "lr" shifts b's lr grid by
    √2; either way the two methods lie on the same gain–drop curve unless ``drop_ratio_a`` scales a's drop."""
    base, budget, big_g, p0, c, n_eval = 1e-5, 100, 0.5, 0.2, 0.004, 200
    lrs = {m: [base * 2.0**i for i in range(4)] for m in "ab"}
    steps = {"a": budget, "b": 2 * budget if variant == "budget" else budget}
    if variant == "lr":
        lrs["b"] = [base * 2.0 ** (i + 0.5) for i in range(4)]
    pts = []
    for m in "ab":
        for s in range(n_seeds):
            for lr in lrs[m]:
                pts.append(pt(m, s, lr, 0, 0.0, 0.0))
                for k in range(1, 6):  # 5 checkpoints per stage
                    step = k * steps[m] // 5
                    x = lr * step / (base * budget / 5)
                    true_gain = big_g * (1.0 - math.exp(-x / 8.0))
                    g_sel, g_test = rng.binomial(n_eval, p0 + true_gain, size=2) / n_eval - p0
                    drop = c * x * (drop_ratio_a if m == "a" else 1.0) + rng.normal(0.0, 0.01)
                    pts.append(pt(m, s, lr, step, g_sel, drop, g_test))
    return pts


def final_drop_gap(pts):
    """Naive end-of-training comparison: per seed, mean over lrs of (final drop b − final drop a)."""
    last = {}
    for p in pts:
        key = (p.method, p.seed, p.lr)
        if key not in last or p.step > last[key].step:
            last[key] = p
    gaps = []
    for s in sorted({p.seed for p in pts}):
        mean = {m: np.mean([p.readouts["drop"] for (mm, ss, _), p in last.items() if (mm, ss) == (m, s)])
                for m in "ab"}
        gaps.append(mean["b"] - mean["a"])
    return mean_ci(gaps)


@pytest.mark.parametrize("variant", ["budget", "lr"])
@pytest.mark.parametrize("sim_seed", range(5))
def test_budget_or_lr_alone_is_not_a_verdict(variant, sim_seed):
    pts = simulate(np.random.default_rng(sim_seed), variant)
    targets = target_gains(pts, "a", "b")
    contrasts = matched_contrast(pts, "a", "b", targets)
    assert len(targets) == 3 and all(c["status"] == "ok" for c in contrasts)
    assert combined_verdict(contrasts, -1) != "reproduced"
    assert combined_verdict(contrasts, +1) != "reproduced"
    # Teeth: at the end of training b has dropped clearly more (×2 budget, or ×√2 lr) — a naive comparison
    # would call "a forgets less" every time. Expected gap: c·mean(x_final) = .004·18.75 = .075 (budget) or
    # .075·(√2 − 1) = .031 (lr), against a seed-to-seed SE of ≈ .004.
    naive = final_drop_gap(pts)
    assert naive.low > 0.01
    assert naive.mean == pytest.approx(0.075 if variant == "budget" else 0.031, abs=0.01)


@pytest.mark.parametrize("variant", ["none", "budget"])
def test_a_real_difference_is_reproduced(variant):
    # a forgets 0.3× as much as b at every gain: the matched contrast must find it, whatever b's budget. (Over
    # 100 simulated seeds this design reproduces 92 times with equal budgets and 99 with b's double budget; the
    # rest are inconclusive, never the wrong sign. The null test above passed 100 of 100 seeds per variant.)
    pts = simulate(np.random.default_rng(0), variant, drop_ratio_a=0.3)
    contrasts = matched_contrast(pts, "a", "b", target_gains(pts, "a", "b"))
    assert combined_verdict(contrasts, -1) == "reproduced"
    assert combined_verdict(contrasts, +1) == "not reproduced"


# --------------------------------------------------------------------------------------------------------------
# the F tail and the nested predictor


def test_f_survival_known_values():
    assert f_survival(4.9646, 1, 10) == pytest.approx(0.05, abs=1e-5)  # table 95% points
    assert f_survival(4.96, 1, 10) == pytest.approx(0.05, abs=2e-4)
    assert f_survival(3.4928, 2, 20) == pytest.approx(0.05, abs=1e-5)
    assert f_survival(161.4476, 1, 1) == pytest.approx(0.05, abs=1e-6)
    # Closed forms: F(2, d) tail = (d/(d + 2f))^(d/2); F(d, 2) tail = 1 − (d·f/(2 + d·f))^(d/2).
    assert f_survival(2.0, 2, 7) == pytest.approx((7 / 11) ** 3.5, rel=1e-10)
    assert f_survival(3.0, 5, 2) == pytest.approx(1 - (15 / 17) ** 2.5, rel=1e-10)
    assert f_survival(1.0, 3, 3) == pytest.approx(0.5, abs=1e-12)  # equal dfs: the median is 1
    assert f_survival(0.0, 2, 5) == 1.0 and f_survival(math.inf, 2, 5) == 0.0


def budget_rows(rng, drop_of, kl_of):
    rows = []
    for method in ["sft", "grpo", "eaft", "distill", "kl_reg"]:
        for lr in [1e-5, 2e-5, 4e-5, 8e-5]:
            for steps in [50, 100, 200]:
                b = lr * steps * 1e3  # lr × steps, in units that keep numbers near 1
                kl = kl_of(b, rng)
                rows.append({"method": method, "lr_steps": b, "kl": kl, "drop": drop_of(b, kl, rng)})
    return rows


def test_nested_predictor_kl_that_only_follows_the_budget_adds_nothing():
    rng = np.random.default_rng(1)
    drop_of = lambda b, kl, r: 0.02 * b + r.normal(0, 0.01)  # noqa: E731
    kl_of = lambda b, r: 0.5 * b * (1 + r.normal(0, 0.2))  # noqa: E731
    rows = budget_rows(rng, drop_of, kl_of)
    out = nested_predictor(rows, ["lr_steps"], "kl")
    assert out["n"] == 60 and out["groups"] == 5 and out["dropped"] == 0 and out["reason"] is None
    assert out["r2_budget"] > 0.9  # the budget alone explains drop ...
    assert out["r2_full"] >= out["r2_budget"]  # ... nested: more columns never fit worse in-sample
    assert out["gain_r2_cv"] < 0.02  # ... and the KL adds nothing on held-out methods
    assert out["p_value"] > 0.05 and (out["df1"], out["df2"]) == (2, 56)
    # A KL that tracks the budget does look like a good predictor on its own: that is the trap.
    alone = nested_predictor([{**r, "one": 1.0} for r in rows], ["one"], "kl")
    assert alone["r2_full"] > 0.7


def test_nested_predictor_kl_that_explains_drop():
    rng = np.random.default_rng(2)
    rows = budget_rows(rng, lambda b, kl, r: kl**2, lambda b, r: r.uniform(0.1, 1.0))
    out = nested_predictor(rows, ["lr_steps"], "kl")
    assert out["r2_full"] == pytest.approx(1.0, abs=1e-9)
    assert out["r2_budget"] < 0.2
    assert out["r2_cv_full"] == pytest.approx(1.0, abs=1e-9)
    assert out["gain_r2_cv"] > 0.8
    assert out["p_value"] < 1e-12


def test_nested_predictor_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    drop_of = lambda b, kl, r: 0.02 * b + 0.05 * kl + r.normal(0, 0.01)  # noqa: E731
    rows = budget_rows(rng, drop_of, lambda b, r: r.uniform(0, 1))
    out = nested_predictor(rows, ["lr_steps"], "kl")
    b, kl, y = (np.array([r[k] for r in rows]) for k in ("lr_steps", "kl", "drop"))
    methods = np.array([r["method"] for r in rows])
    sst = np.sum((y - y.mean()) ** 2)
    ss_b = np.sum((y - np.polyval(np.polyfit(b, y, 1), b)) ** 2)
    design = np.column_stack([np.ones_like(b), b, kl, kl**2])  # unscaled columns: the scaling must not matter
    ss_f = np.sum((y - design @ np.linalg.lstsq(design, y, rcond=None)[0]) ** 2)
    assert out["r2_budget"] == pytest.approx(1 - ss_b / sst, rel=1e-9)
    assert out["r2_full"] == pytest.approx(1 - ss_f / sst, rel=1e-9)
    assert out["f"] == pytest.approx(((ss_b - ss_f) / 2) / (ss_f / (60 - 4)), rel=1e-8)
    pred = np.empty_like(y)
    for m in np.unique(methods):  # leave one method out, a straight line on the budget
        held = methods == m
        pred[held] = np.polyval(np.polyfit(b[~held], y[~held], 1), b[held])
    assert out["r2_cv_budget"] == pytest.approx(1 - np.sum((y - pred) ** 2) / sst, rel=1e-9)


def test_nested_predictor_drops_missing_and_reports_why():
    rows = [{"method": m, "b": float(i), "kl": float(i % 3), "drop": float(i) * 0.1 + (i % 3) ** 2}
            for i, m in enumerate(["a", "b"] * 4)]
    rows.append({"method": "a", "b": 1.0, "kl": None, "drop": 0.2})
    rows.append({"method": None, "b": 1.0, "kl": 0.5, "drop": 0.2})
    out = nested_predictor(rows, ["b"], "kl")
    assert out["n"] == 8 and out["dropped"] == 2 and out["groups"] == 2
    assert out["r2_full"] is not None and out["r2_cv_full"] is None and "at least 3" in out["cv_reason"]
    few = nested_predictor(rows[:5], ["b"], "kl")  # 4 parameters need ≥ 6 rows
    assert few["r2_budget"] is None and few["f"] is None and "at least 6" in few["reason"]


# --------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "call",
    [
        lambda: frontier([], 0.1),
        lambda: frontier([pt("a", 0, 1e-4, 1, float("nan"), 0.1)], 0.1),
        lambda: frontier(RUN, 0.1, readout="nll"),
        lambda: frontier(RUN + [pt("a", 1, 1e-4, 1, 0.1, 0.1)], 0.1),  # two seeds
        lambda: frontier(RUN, float("nan")),
        lambda: frontier([Point("a", 0, 1e-4, 1, 0.1, 0.1, {"drop": math.inf})], 0.1),
        lambda: target_gains(PAIRS, "a", "zzz"),
        lambda: target_gains(PAIRS, "a", "a"),
        lambda: target_gains(PAIRS, "a", "b", fractions=(0.5, 1.5)),
        lambda: matched_contrast(PAIRS, "a", "b", [0.1], readout="nll"),
        lambda: matched_contrast(PAIRS, "a", "b", [float("nan")]),
        lambda: verdict({"status": "ok", "low": -1, "high": -0.5}, 0),
        lambda: combined_verdict([], True),
        lambda: nested_predictor([{"method": "a", "b": 1.0, "kl": float("nan"), "drop": 0.1}], ["b"], "kl"),
        lambda: nested_predictor([], [], "kl"),
        lambda: nested_predictor([], ["kl"], "kl"),
        lambda: f_survival(2.0, 0, 3),
    ],
)
def test_bad_input_raises(call):
    with pytest.raises(MetricInputError):
        call()
