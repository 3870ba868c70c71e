"""Metrics of the accuracy matrix (SPEC §3) and the forgetting predictor (§3.1), checked against hand arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retain.errors import RetainError
from retain.metrics import (
    MetricInputError,
    average_accuracy,
    avalanche_forgetting,
    backward_transfer,
    bootstrap_ci,
    fit_quadratic,
    forgetting_measure,
    forgetting_predictor,
    forward_transfer,
    gain,
    mean_ci,
    ood_change,
    prior_drop,
    rank_average,
    spearman,
    summarize,
    t_critical,
    target_gain,
)

# SPEC §3 worked example. Rows: stage 0 (base) .. 3; columns: tasks 1..3 in training order.
SPEC_R = [[0.2, 0.1, 0.0], [0.9, 0.2, 0.1], [0.7, 0.8, 0.2], [0.6, 0.7, 0.9]]

# A second example, T = 4, worked by hand below. Task 1 peaks at stage 3 (0.95), not at its own stage, so FM and
# BWT differ.
R2 = [
    [0.10, 0.0, 0.3, 0.2],  # row 0: base model
    [0.80, 0.1, 0.3, 0.2],  # row 1: after stage 1 (trained task 1)
    [0.60, 0.9, 0.4, 0.3],  # row 2: after stage 2
    [0.95, 0.5, 0.8, 0.5],  # row 3: after stage 3
    [0.50, 0.6, 0.6, 0.9],  # row 4: after stage 4 (final)
]
# AA  = (0.5 + 0.6 + 0.6 + 0.9) / 4 = 2.6 / 4 = 0.65
# FM  (1-based task j, max over rows j..T-1 = j..3):
#   j=1: 0.5 - max(0.8, 0.6, 0.95) = 0.5 - 0.95 = -0.45
#   j=2: 0.6 - max(0.9, 0.5)       = 0.6 - 0.9  = -0.30
#   j=3: 0.6 - max(0.8)            = 0.6 - 0.8  = -0.20
#   FM = (-0.45 - 0.30 - 0.20) / 3 = -0.95 / 3 = -0.316667
# BWT (final minus right after own stage):
#   j=1: 0.5 - 0.8 = -0.3;  j=2: 0.6 - 0.9 = -0.3;  j=3: 0.6 - 0.8 = -0.2
#   BWT = -0.8 / 3 = -0.266667
# FWT (just before own stage minus base), j = 2..4:
#   j=2: R[1][2] - R[0][2] = 0.1 - 0.0 = 0.1
#   j=3: R[2][3] - R[0][3] = 0.4 - 0.3 = 0.1
#   j=4: R[3][4] - R[0][4] = 0.5 - 0.2 = 0.3
#   FWT = 0.5 / 3 = 0.166667
# Avalanche F_j = R[j][j] - R[4][j]: F1 = 0.8-0.5 = 0.3, F2 = 0.9-0.6 = 0.3, F3 = 0.8-0.6 = 0.2, F4 = 0.9-0.9 = 0
#   mean over j < 4 = 0.8 / 3 = 0.266667 (= -BWT)
# target gains R[j][j] - R[0][j]: 0.8-0.1 = 0.7, 0.9-0.0 = 0.9, 0.8-0.3 = 0.5, 0.9-0.2 = 0.7


# ---------------------------------------------------------------------------------------------------------------
# accuracy-matrix metrics


def test_spec_worked_example():
    assert average_accuracy(SPEC_R) == pytest.approx(0.7333, abs=1e-4)
    assert forgetting_measure(SPEC_R) == pytest.approx(-0.2, abs=1e-4)
    assert backward_transfer(SPEC_R) == pytest.approx(-0.2, abs=1e-4)
    assert forward_transfer(SPEC_R) == pytest.approx(0.15, abs=1e-4)


def test_spec_example_avalanche():
    # F1 = 0.9 - 0.6 = 0.3, F2 = 0.8 - 0.7 = 0.1, F3 = 0.9 - 0.9 = 0; mean over j < 3 = 0.2
    aval = avalanche_forgetting(SPEC_R)
    assert aval["per_task"] == pytest.approx([0.3, 0.1, 0.0], abs=1e-12)
    assert aval["mean"] == pytest.approx(0.2, abs=1e-12)


def test_second_example_by_hand():
    assert average_accuracy(R2) == pytest.approx(0.65, abs=1e-12)
    assert forgetting_measure(R2) == pytest.approx(-0.95 / 3, abs=1e-12)
    assert backward_transfer(R2) == pytest.approx(-0.8 / 3, abs=1e-12)
    assert forward_transfer(R2) == pytest.approx(0.5 / 3, abs=1e-12)
    aval = avalanche_forgetting(R2)
    assert aval["per_task"] == pytest.approx([0.3, 0.3, 0.2, 0.0], abs=1e-12)
    assert aval["mean"] == pytest.approx(0.8 / 3, abs=1e-12)
    assert [target_gain(R2, j) for j in (1, 2, 3, 4)] == pytest.approx([0.7, 0.9, 0.5, 0.7], abs=1e-12)


def test_numpy_input_same_as_lists():
    arr = np.array(R2)
    assert forgetting_measure(arr) == forgetting_measure(R2)
    assert summarize(arr) == summarize(R2)


def test_fm_is_not_clamped_when_final_exceeds_peak():
    # T = 2: task 1 is 0.5 after its stage and 0.9 at the end: FM = 0.9 - max(R[1][1]) = 0.9 - 0.5 = +0.4
    R = [[0.0, 0.0], [0.5, 0.0], [0.9, 0.9]]
    assert forgetting_measure(R) == pytest.approx(0.4)
    assert backward_transfer(R) == pytest.approx(0.4)


def test_single_stage_edge_case():
    R = [[0.3], [0.8]]
    assert average_accuracy(R) == pytest.approx(0.8)
    assert forgetting_measure(R) is None
    assert backward_transfer(R) is None
    assert forward_transfer(R) is None
    aval = avalanche_forgetting(R)
    assert aval == {"per_task": [0.0], "mean": None}
    assert target_gain(R, 1) == pytest.approx(0.5)
    s = summarize(R)
    assert s["forgetting_measure"] is None and s["backward_transfer"] is None and s["forward_transfer"] is None
    assert s["avalanche_forgetting"] is None and s["num_stages"] == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cell_rejected_with_its_name(bad):
    R = [row[:] for row in SPEC_R]
    R[2][1] = bad
    with pytest.raises(ValueError, match=r"R\[2\]\[1\]"):
        summarize(R)
    with pytest.raises(RetainError):  # also a user-facing error for the CLI
        average_accuracy(R)


@pytest.mark.parametrize(
    "R",
    [
        [[0.1, 0.2], [0.3, 0.4]],  # 2 rows, 2 columns: not T+1 × T
        [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]],  # looks transposed
        [[0.1]],  # T = 0
        [0.1, 0.2],  # 1-D
        [[0.1], [0.2, 0.3]],  # ragged
        [["a"], ["b"]],  # not numbers
    ],
)
def test_bad_shapes_rejected(R):
    with pytest.raises(MetricInputError):
        average_accuracy(R)


def test_target_gain_index_checked():
    with pytest.raises(MetricInputError, match="1..3"):
        target_gain(SPEC_R, 0)
    with pytest.raises(MetricInputError):
        target_gain(SPEC_R, 4)
    assert target_gain(SPEC_R, 1) == pytest.approx(0.7)  # 0.9 - 0.2


def test_gain_drop_ood():
    assert gain(0.2, 0.65) == pytest.approx(0.45)
    # prior columns 2 and 3 of a wider evaluation row: before (0.8, 0.6), after (0.5, 0.7)
    # drop = mean(0.8 - 0.5, 0.6 - 0.7) = mean(0.3, -0.1) = 0.1 (positive = forgetting)
    before = [0.1, 0.2, 0.8, 0.6]
    after = [0.9, 0.3, 0.5, 0.7]
    assert prior_drop(before, after, [2, 3]) == pytest.approx(0.1)
    assert prior_drop([0.8, 0.6], [0.5, 0.7]) == pytest.approx(0.1)
    # Chu's GeneralPoints language-only RL: 11.5 -> 15.0 is +3.5
    assert ood_change(11.5, 15.0) == pytest.approx(3.5)
    assert ood_change(before, after, [1]) == pytest.approx(0.1)
    # a NaN in an unused column is fine; in a used one it is named
    assert prior_drop([float("nan"), 0.8], [0.0, 0.5], [1]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"after\[1\]"):
        prior_drop([0.1, 0.8], [0.0, float("nan")], [1])
    with pytest.raises(MetricInputError):
        prior_drop(before, after, [])
    with pytest.raises(MetricInputError):
        prior_drop(before, after, [7])
    with pytest.raises(MetricInputError):
        gain(float("nan"), 0.3)


def test_summarize_keys_and_prior():
    s = summarize(SPEC_R, prior_before=[0.8, 0.6], prior_after=[0.5, 0.7])
    for key in ("average_accuracy", "forgetting_measure", "backward_transfer", "forward_transfer",
                "avalanche_forgetting", "avalanche_forgetting_per_task", "target_gains", "final_accuracies"):
        assert key in s
    assert s["average_accuracy"] == pytest.approx(0.7333, abs=1e-4)
    assert s["avalanche_forgetting"] == pytest.approx(0.2)
    assert s["prior_drop"] == pytest.approx(0.1)
    assert s["prior_drop_per_skill"] == pytest.approx([0.3, -0.1])
    with pytest.raises(MetricInputError):
        summarize(SPEC_R, prior_before=[0.8])


finite01 = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def acc_matrices(draw):
    T = draw(st.integers(min_value=1, max_value=6))
    return np.array(draw(st.lists(st.lists(finite01, min_size=T, max_size=T), min_size=T + 1, max_size=T + 1)))


@settings(max_examples=150, deadline=None)
@given(acc_matrices())
def test_properties_of_random_matrices(R):
    T = R.shape[1]
    aa = average_accuracy(R)
    assert -1e-12 <= aa <= 1 + 1e-12
    fm, bwt, fwt = forgetting_measure(R), backward_transfer(R), forward_transfer(R)
    aval = avalanche_forgetting(R)
    if T == 1:
        assert fm is None and bwt is None and fwt is None and aval["mean"] is None
        return
    # max over k in [j, T-1] includes k = j, so every FM term is <= its BWT term
    assert fm <= bwt + 1e-12
    assert -1 - 1e-12 <= fm <= 1 + 1e-12 and -1 - 1e-12 <= fwt <= 1 + 1e-12
    # Avalanche mean over j < T is exactly -BWT; F_T is always 0
    assert aval["mean"] == pytest.approx(-bwt, abs=1e-12)
    assert aval["per_task"][-1] == 0.0
    # FM <= 0 whenever no task ends above what it had at its own stage or later (before the last)
    if all(R[T, c] <= R[c + 1 : T, c].max() for c in range(T - 1)):
        assert fm <= 1e-12


# ---------------------------------------------------------------------------------------------------------------
# the forgetting predictor


def test_exact_quadratic_recovered():
    x = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 5.0])
    y = 1.0 + 2.0 * x + 3.0 * x**2
    fit = fit_quadratic(x, y)
    assert fit["coef"] == pytest.approx([1.0, 2.0, 3.0], rel=1e-9, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["n"] == 6 and fit["spearman"] == pytest.approx(1.0) and fit["note"] is None


def test_exact_quadratic_small_and_offset_x():
    # KL-sized x far from 0 and weight-size x: conditioning must not spoil the coefficients
    x = 1e-3 * np.arange(1, 9)
    y = 0.5 - 40.0 * x + 2e4 * x**2
    assert fit_quadratic(x, y)["coef"] == pytest.approx([0.5, -40.0, 2e4], rel=1e-6)
    x = 100.0 + np.arange(8.0)
    y = 2.0 - 0.1 * x + 0.01 * x**2
    assert fit_quadratic(x, y)["coef"] == pytest.approx([2.0, -0.1, 0.01], rel=1e-6)


def test_noisy_r2_strictly_between_0_and_1():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 1, 30)
    y = 2 * x**2 + rng.normal(0, 0.2, size=x.size)
    fit = fit_quadratic(x, y)
    assert 0.0 < fit["r2"] < 1.0
    # same R² by the definition, computed here from the returned coefficients
    a, b, c = fit["coef"]
    pred = a + b * x + c * x**2
    r2 = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    assert fit["r2"] == pytest.approx(r2, abs=1e-10)


def test_constant_x_handled():
    fit = fit_quadratic([0.2, 0.2, 0.2, 0.2, 0.2], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert fit["r2"] is None and "same in every run" in fit["note"]
    assert fit["coef"] == pytest.approx([3.0, 0.0, 0.0])
    assert fit["spearman"] is None and fit["n"] == 5


def test_small_n_and_constant_y():
    fit = fit_quadratic([1.0, 2.0, 4.0], [3.0, 1.0, 7.0])
    assert fit["r2"] is None and "n = 3" in fit["note"]
    fit = fit_quadratic([1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5])
    assert fit["r2"] is None and "SS_tot" in fit["note"]
    assert fit_quadratic([], [])["n"] == 0


def test_two_distinct_x_values_fit_a_line():
    # x in {0, 1}: line through the group means (1 and 3): a = 1, b = 2, c = 0
    fit = fit_quadratic([0, 0, 1, 1, 1], [0.5, 1.5, 2.0, 3.0, 4.0])
    assert fit["coef"] == pytest.approx([1.0, 2.0, 0.0], abs=1e-12)
    # SS_res = 0.25+0.25+1+0+1 = 2.5; mean y = 11/5 = 2.2; SS_tot = 2.89+0.49+0.04+0.64+3.24 = 7.3
    assert fit["r2"] == pytest.approx(1 - 2.5 / 7.3, abs=1e-12)


def test_rank_average_and_spearman_by_hand():
    assert list(rank_average([10, 20, 20, 30])) == [1.0, 2.5, 2.5, 4.0]
    assert list(rank_average([3, 1, 3, 3])) == [3.0, 1.0, 3.0, 3.0]  # three 3s share ranks 2, 3, 4
    # x = [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4]; y = [1, 3, 2, 4] -> ranks [1, 3, 2, 4]; mean rank 2.5
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, 0.5, -0.5, 1.5]
    # Σdx·dy = 2.25 + 2.25 = 4.5; Σdx² = 4.5; Σdy² = 2.25 + 0.25 + 0.25 + 2.25 = 5
    # rho = 4.5 / sqrt(4.5 · 5) = 3 / sqrt(10) = 0.948683
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1], [2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-100, 100), st.integers(-100, 100)), min_size=2, max_size=12))
def test_spearman_bounded_and_monotone_invariant(pairs):
    x = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs], dtype=float)
    rho = spearman(x, y)
    if rho is None:
        assert np.ptp(x) == 0 or np.ptp(y) == 0
        return
    assert -1 - 1e-12 <= rho <= 1 + 1e-12
    assert spearman(x**3 + 7, y) == pytest.approx(rho, abs=1e-9)  # ranks unchanged by increasing maps


def test_forgetting_predictor_runs():
    runs = []
    for i in range(8):
        kl = 0.01 * (i + 1)
        rkl = kl * (1 + (-1) ** i * 0.5)
        runs.append({"forgetting": 0.1 + 5 * kl + 20 * kl**2, "forward_kl": kl, "reverse_kl": rkl,
                     "weight_l2": 1.0, "lr": 1e-4})
    runs.append({"forgetting": 0.3, "forward_kl": None, "reverse_kl": 0.02})  # no forward KL, no weight_l2
    table = forgetting_predictor(runs)
    assert set(table) == {"forward_kl", "reverse_kl", "weight_l2"}
    assert table["forward_kl"]["n"] == 8 and table["forward_kl"]["r2"] == pytest.approx(1.0, abs=1e-12)
    assert table["forward_kl"]["coef"] == pytest.approx([0.1, 5.0, 20.0], rel=1e-8)
    assert table["reverse_kl"]["n"] == 9 and 0.0 <= table["reverse_kl"]["r2"] < 1.0
    assert table["weight_l2"]["r2"] is None and table["weight_l2"]["n"] == 8
    assert forgetting_predictor(runs, candidates=["missing"])["missing"]["n"] == 0
    with pytest.raises(ValueError, match=r"runs\[1\]\['forward_kl'\]"):
        forgetting_predictor([{"forgetting": 1.0, "forward_kl": 0.1}, {"forgetting": 1.0, "forward_kl": float("nan")}])


# ---------------------------------------------------------------------------------------------------------------
# intervals


def test_mean_ci_by_hand():
    # [1, 2, 3]: mean 2, s = sqrt(((1-2)² + 0 + (3-2)²) / 2) = 1, half-width t_{0.975,2} · 1/√3 = 4.303/√3
    ci = mean_ci([1, 2, 3])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert ci.low == pytest.approx(2 - ci.half_width) and ci.high == pytest.approx(2 + ci.half_width)
    one = mean_ci([0.7])
    assert one.mean == 0.7 and one.half_width is None and one.low is None
    with pytest.raises(MetricInputError):
        mean_ci([])
    with pytest.raises(MetricInputError):
        mean_ci([1.0, float("nan")])


def test_t_table():
    assert t_critical(1) == pytest.approx(12.706, abs=1e-3)
    assert t_critical(10) == pytest.approx(2.228, abs=1e-3)
    assert t_critical(30) == pytest.approx(2.042, abs=1e-3)
    assert t_critical(31) == 1.96 and t_critical(1000) == 1.96
    assert all(t_critical(d) > t_critical(d + 1) for d in range(1, 30))  # decreasing in df
    with pytest.raises(MetricInputError):
        t_critical(0)


def test_bootstrap_deterministic_with_seed():
    vals = [0.613, 0.581, 0.662, 0.704, 0.557, 0.638, 0.599, 0.671]
    a = bootstrap_ci(vals, seed=3)
    assert a == bootstrap_ci(vals, seed=3)
    assert a != bootstrap_ci(vals, seed=4)
    lo, hi = a
    assert min(vals) <= lo <= np.mean(vals) <= hi <= max(vals)
    lo_m, hi_m = bootstrap_ci(vals, stat=np.median, n_boot=500, alpha=0.1, seed=0)
    assert min(vals) <= lo_m <= hi_m <= max(vals)
    assert bootstrap_ci([0.4]) == (0.4, 0.4)
    with pytest.raises(MetricInputError):
        bootstrap_ci([])
