"""Verdicts at matched new-task gain (SPEC §2.4) and the nested "beat the budget" predictor test (SPEC §3.2).

With Adam(W), prior-skill drop tracks lr × steps, so "method A forgets less than B" is only a claim about the
methods when both are compared at the *same* new-task gain. Per (method, seed), every checkpoint of every lr of a
stage is a :class:`Point`; the frontier ``f(g)`` is the least drop among the points whose selection-half gain is
≥ ``g``. Target gains are fixed from gains alone (before any drop is read), the contrast
``Δ_s = f_A,s(g*) − f_B,s(g*)`` is paired by seed, and a t-interval over seeds decides the verdict. The test-half
gains of the chosen checkpoints are reported beside it: choosing on one half and showing the other keeps the
"matched" gains honest (the selection half is biased upwards by the choice).

The frontier is a step function of the checkpoint grid: when readouts are nearly noiseless, the method whose
checkpoints (lr × steps) happen to land closer above g* wins that level by grid alone. Requiring every usable
level to agree (:data:`MATCHED_RULE`) is what keeps such single-level accidents from becoming a verdict; a gap
between ``gain_test_a`` and ``gain_test_b`` is the symptom to look for.

:func:`nested_predictor` asks whether a shift measure (e.g. forward KL) predicts drop *beyond* the budget: both
follow the learning rate, so a predictor that only re-encodes lr × steps fits well in-sample and says nothing.

Pure numpy + stdlib; the F distribution's tail is computed here from the regularized incomplete beta function.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retain.metrics.matrix import MetricInputError, finite_number
from retain.metrics.predictor import mean_ci

__all__ = [
    "MATCHED_RULE",
    "Point",
    "frontier",
    "best_gain",
    "target_gains",
    "matched_contrast",
    "verdict",
    "combined_verdict",
    "f_survival",
    "nested_predictor",
]

MATCHED_RULE = (
    "Matched-gain verdict (SPEC §2.4). Per method and seed, f(g) = the least prior-skill readout (lower is better) "
    "over all lrs and checkpoints (step 0 included) whose selection-half gain is >= g. Target gains g* are fixed "
    "from gains only: a fraction (1/4, 1/2, 3/4) of the smaller of the two methods' mean-over-seeds best gain. At "
    "each g*, delta_s = f_A,s(g*) - f_B,s(g*) for every seed where both reach g*; the mean delta gets a paired "
    "two-sided 95% t-interval (df = pairs - 1). A level is 'not reached' when a method reaches g* on fewer than half "
    "of its seeds, and has too few pairs below 2. A level is reproduced when its interval lies entirely on the "
    "expected side of 0, not reproduced when entirely on the other side, else inconclusive. Combined over the "
    "levels: reproduced only if at least one level is ok and every ok level is reproduced; not reproduced if every "
    "ok level is not reproduced; not reached if no level is ok and some level was not reached (or there were no "
    "levels because a method gained nothing); otherwise inconclusive."
)


@dataclass(frozen=True)
class Point:
    """One checkpoint of one training run, as the matched-gain comparison sees it.

    ``step`` counts optimizer steps into the stage (0 = the stage's starting model, gain 0). ``gain`` is the
    selection-half held-out gain (accuracy − accuracy at step 0, a fraction) and is the only thing used to choose;
    ``gain_test`` is the test-half gain of the same checkpoint, reported only. ``readouts`` are forgetting readouts
    where lower is better, e.g. ``{"drop": 0.05, "nll_increase": 0.3}``.
    """

    method: str
    seed: int
    lr: float
    step: int
    gain: float
    gain_test: float
    readouts: Mapping[str, float]


# --------------------------------------------------------------------------------------------------------------
# input checks


def _label(p: Point) -> str:
    return f"point (method={p.method!r}, seed={p.seed}, lr={p.lr}, step={p.step})"


def _check_points(points: Sequence[Point], readout: str | None) -> list[Point]:
    points = list(points)
    if not points:
        raise MetricInputError("no points given")
    for p in points:
        if not isinstance(p, Point):
            raise MetricInputError(f"points must be Point instances; got {type(p).__name__}")
        finite_number(p.gain, f"{_label(p)}.gain")
        finite_number(p.gain_test, f"{_label(p)}.gain_test")
        finite_number(p.lr, f"{_label(p)}.lr")
        if readout is not None:
            if readout not in p.readouts:
                raise MetricInputError(
                    f"{_label(p)} has no readout {readout!r}; it has {sorted(p.readouts)}"
                )
            finite_number(p.readouts[readout], f"{_label(p)}.readouts[{readout!r}]")
    return points


def _by_seed(points: Sequence[Point], method: str) -> dict[int, list[Point]]:
    runs: dict[int, list[Point]] = {}
    for p in points:
        if p.method == method:
            runs.setdefault(p.seed, []).append(p)
    if not runs:
        present = sorted({p.method for p in points})
        raise MetricInputError(f"no points for method {method!r}; methods present: {present}")
    return runs


# --------------------------------------------------------------------------------------------------------------
# the frontier and the targets


def frontier(points: Sequence[Point], g: float, readout: str = "drop") -> Point | None:
    """f(g): among ``points`` (one method, one seed, every lr and checkpoint) with ``gain >= g``, the one with the
    least ``readouts[readout]`` (lower is better).

    Ties go to fewer steps, then the smaller lr, so the choice is deterministic. Step-0 points (gain 0, the
    stage's starting model) count: f(0) is the starting model when its readout is the least. ``None`` when no
    point reaches ``g``. Mixing methods or seeds raises :class:`MetricInputError`.
    """
    points = _check_points(points, readout)
    g = finite_number(g, "target gain g")
    runs = {(p.method, p.seed) for p in points}
    if len(runs) > 1:
        raise MetricInputError(f"frontier() takes one method and one seed; got {sorted(runs)}")
    reached = [p for p in points if p.gain >= g]
    if not reached:
        return None
    return min(reached, key=lambda p: (float(p.readouts[readout]), p.step, p.lr))


def best_gain(points: Sequence[Point]) -> float:
    """The largest selection-half gain among ``points`` (one method and seed: that run's best checkpoint)."""
    return max(float(p.gain) for p in _check_points(points, None))


def target_gains(
    points: Sequence[Point],
    method_a: str,
    method_b: str,
    fractions: Sequence[float] = (0.25, 0.5, 0.75),
) -> list[float]:
    """Target gains fixed before any drop is read: ``fraction × min(mean_s best_gain_A,s, mean_s best_gain_B,s)``.

    Each method's level is the mean over its seeds of the per-seed best gain. Only gains are used, never a
    readout, so the levels cannot be tuned to the outcome. When the smaller mean is ≤ 0 a method learned nothing
    and there is nothing to match: ``[]``.
    """
    points = _check_points(points, None)
    if method_a == method_b:
        raise MetricInputError(f"compare two different methods; got {method_a!r} twice")
    fracs = [finite_number(f, "fraction") for f in fractions]
    if not fracs or any(not 0.0 < f <= 1.0 for f in fracs):
        raise MetricInputError(f"fractions must be a non-empty list of values in (0, 1]; got {list(fractions)!r}")
    means = [
        float(np.mean([best_gain(run) for run in _by_seed(points, m).values()])) for m in (method_a, method_b)
    ]
    level = min(means)
    if level <= 0.0:
        return []
    return [f * level for f in fracs]


# --------------------------------------------------------------------------------------------------------------
# the paired contrast and the verdicts


def _chosen(p: Point, readout: str) -> dict[str, Any]:
    return {"lr": p.lr, "step": p.step, "gain": p.gain, "gain_test": p.gain_test, "value": float(p.readouts[readout])}


def matched_contrast(
    points: Sequence[Point],
    method_a: str,
    method_b: str,
    targets: Sequence[float],
    readout: str = "drop",
    min_reached_share: float = 0.5,
) -> list[dict[str, Any]]:
    """For each target g*, the seed-paired contrast ``Δ_s = readout(f_A,s(g*)) − readout(f_B,s(g*))``.

    A seed is a pair when it is present for both methods and both reach g*. Per target the dict holds
    ``target, readout, pairs`` (n), ``delta`` (mean Δ; ``None`` with no pairs), ``low, high`` (paired two-sided 95%
    t-interval, df = n − 1; ``None`` when n < 2), ``per_seed`` (per pair: seed, delta and the chosen checkpoints
    ``a``/``b`` as ``{lr, step, gain, gain_test, value}``), ``reached_a``/``reached_b`` (share of that method's own
    seeds reaching g*), ``gain_test_a``/``gain_test_b`` (mean test-half gain of the chosen checkpoints over the
    pairs: they should match if the comparison is at matched gain), and ``status``: ``"ok"``;
    ``"not reached: <method>"`` (methods joined by ", ") when a method reaches g* on fewer than
    ``min_reached_share`` of its seeds; ``"too few pairs"`` when fewer than 2 pairs remain.
    """
    points = _check_points(points, readout)
    if method_a == method_b:
        raise MetricInputError(f"compare two different methods; got {method_a!r} twice")
    share = finite_number(min_reached_share, "min_reached_share")
    if not 0.0 <= share <= 1.0:
        raise MetricInputError(f"min_reached_share must be in [0, 1]; got {share!r}")
    runs_a, runs_b = _by_seed(points, method_a), _by_seed(points, method_b)
    out: list[dict[str, Any]] = []
    for target in targets:
        g = finite_number(target, "target gain")
        fa = {s: frontier(run, g, readout) for s, run in runs_a.items()}
        fb = {s: frontier(run, g, readout) for s, run in runs_b.items()}
        reached_a = sum(p is not None for p in fa.values()) / len(fa)
        reached_b = sum(p is not None for p in fb.values()) / len(fb)
        per_seed = []
        for s in sorted(set(fa) & set(fb)):
            a, b = fa[s], fb[s]
            if a is None or b is None:
                continue
            per_seed.append({"seed": s, "delta": float(a.readouts[readout]) - float(b.readouts[readout]),
                             "a": _chosen(a, readout), "b": _chosen(b, readout)})
        n = len(per_seed)
        deltas = [r["delta"] for r in per_seed]
        ci = mean_ci(deltas) if n else None
        missed = [m for m, r in ((method_a, reached_a), (method_b, reached_b)) if r < share]
        if missed:
            status = "not reached: " + ", ".join(missed)
        elif n < 2:
            status = "too few pairs"
        else:
            status = "ok"
        out.append({
            "target": g,
            "readout": readout,
            "pairs": n,
            "delta": ci.mean if ci else None,
            "low": ci.low if ci else None,
            "high": ci.high if ci else None,
            "per_seed": per_seed,
            "reached_a": reached_a,
            "reached_b": reached_b,
            "gain_test_a": float(np.mean([r["a"]["gain_test"] for r in per_seed])) if n else None,
            "gain_test_b": float(np.mean([r["b"]["gain_test"] for r in per_seed])) if n else None,
            "status": status,
        })
    return out


def _check_expect(expect: int) -> int:
    if isinstance(expect, bool) or expect not in (-1, 1):
        raise MetricInputError(f"expect must be -1 (A forgets less: Δ < 0) or +1 (Δ > 0); got {expect!r}")
    return int(expect)


def verdict(contrast: Mapping[str, Any], expect: int) -> str:
    """One target level's verdict (see :data:`MATCHED_RULE`); ``expect`` is the sign of Δ the paper claims
    (−1: A forgets less). ``"reproduced"`` / ``"not reproduced"`` when the interval lies entirely on the expected /
    the other side of 0, ``"inconclusive"`` when it contains 0 or there are too few pairs, ``"not reached"``.
    """
    expect = _check_expect(expect)
    status = contrast.get("status")
    if not isinstance(status, str):
        raise MetricInputError(f"contrast has no status; got {dict(contrast)!r}")
    if status.startswith("not reached"):
        return "not reached"
    if status != "ok":
        return "inconclusive"
    low, high = finite_number(contrast["low"], "contrast low"), finite_number(contrast["high"], "contrast high")
    lo, hi = sorted((expect * low, expect * high))  # flip so that "expected side" is always > 0
    if lo > 0.0:
        return "reproduced"
    if hi < 0.0:
        return "not reproduced"
    return "inconclusive"


def combined_verdict(contrasts: Sequence[Mapping[str, Any]], expect: int) -> str:
    """The verdict over the fixed target levels, by the rule in :data:`MATCHED_RULE`.

    No levels at all (``target_gains`` returned ``[]``: a method gained nothing) is ``"not reached"``.
    """
    expect = _check_expect(expect)
    if not contrasts:
        return "not reached"
    ok = [verdict(c, expect) for c in contrasts if c.get("status") == "ok"]
    if not ok:
        reached = any(str(c.get("status", "")).startswith("not reached") for c in contrasts)
        return "not reached" if reached else "inconclusive"
    if all(v == "reproduced" for v in ok):
        return "reproduced"
    if all(v == "not reproduced" for v in ok):
        return "not reproduced"
    return "inconclusive"


# --------------------------------------------------------------------------------------------------------------
# the F distribution's upper tail


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of I_x(a, b), modified Lentz (Numerical Recipes §6.4); converges fast for x < (a+1)/(a+b+2).
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def f_survival(f: float, df1: float, df2: float) -> float:
    """P(F > f) for F ~ F(df1, df2): ``I_{df2/(df2 + df1·f)}(df2/2, df1/2)``.

    Example: f = 4.96 with (1, 10) gives ≈ 0.05 (4.96 is the table's 95% point).
    """
    df1, df2 = finite_number(df1, "df1"), finite_number(df2, "df2")
    if df1 <= 0 or df2 <= 0:
        raise MetricInputError(f"F degrees of freedom must be > 0; got ({df1}, {df2})")
    if f == math.inf:  # a full model that fits exactly
        return 0.0
    f = finite_number(f, "F")
    if f <= 0.0:
        return 1.0
    return _betainc(df2 / 2.0, df1 / 2.0, df2 / (df2 + df1 * f))


# --------------------------------------------------------------------------------------------------------------
# the nested predictor


def _standardise(col: np.ndarray) -> np.ndarray:
    # An affine change of a column leaves OLS predictions unchanged when the design has an intercept, so scaling
    # once over all rows is only for conditioning and leaks nothing into the cross-validation folds.
    s = float(col.std())
    return (col - col.mean()) / s if s > 0 else np.zeros_like(col)


def _fit_predict(design: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    beta, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
    return design[test] @ beta


def nested_predictor(
    rows: Sequence[Mapping[str, Any]],
    budget_keys: Sequence[str],
    predictor_key: str,
    target_key: str = "drop",
    group_key: str = "method",
) -> dict[str, Any]:
    """Does ``predictor_key`` predict ``target_key`` beyond the budget alone? (SPEC §3.2)

    Budget model: OLS of the target on ``[1, *budget features]``. Full model: the budget features plus
    ``[x, x²]`` of the predictor (Razor's quadratic). Returns

    * ``n`` (rows used), ``dropped`` (rows with a missing or ``None`` value in a needed key), ``groups`` (number
      of distinct ``group_key`` values);
    * ``r2_budget``, ``r2_full``: in-sample R² = 1 − SS_res/SS_tot;
    * ``f``, ``df1``, ``df2``, ``p_value``: the nested F-test ``((SS_b − SS_f)/df1) / (SS_f/df2)`` with df1 = rank
      gained by the full design, df2 = n − rank(full); ``p_value`` = P(F > f) (:func:`f_survival`);
    * ``r2_cv_budget``, ``r2_cv_full``: leave-one-group-out R² — each group is predicted from a fit on the
      others, then 1 − Σ(y − ŷ_cv)²/Σ(y − ȳ)² over all rows with ȳ the overall mean; ``None`` (see
      ``cv_reason``) with fewer than 3 groups. ``gain_r2_cv`` = ``r2_cv_full − r2_cv_budget``: what the predictor
      adds on methods it has not seen, the number that matters when both variables follow the learning rate;
    * ``reason``: ``None``, or why the fits are ``None`` (fewer rows than parameters + 2, constant target, or a
      predictor that adds no direction).

    A NaN/inf value raises :class:`MetricInputError`; filter diverged runs out first, deliberately.
    """
    if isinstance(budget_keys, str):
        budget_keys = [budget_keys]
    budget_keys = list(budget_keys)
    if not budget_keys:
        raise MetricInputError("nested_predictor needs at least one budget key (the model the predictor must beat)")
    if predictor_key in budget_keys:
        raise MetricInputError(f"predictor {predictor_key!r} is also a budget key")
    keys = [*budget_keys, predictor_key, target_key]
    table: list[list[float]] = []
    groups: list[Hashable] = []
    dropped = 0
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise MetricInputError(f"rows[{i}] must be a dict; got {type(row).__name__}")
        if any(row.get(k) is None for k in (*keys, group_key)):
            dropped += 1
            continue
        table.append([finite_number(row[k], f"rows[{i}][{k!r}]") for k in keys])
        groups.append(row[group_key])
    n = len(table)
    distinct = list(dict.fromkeys(groups))
    out: dict[str, Any] = {
        "n": n, "dropped": dropped, "groups": len(distinct), "budget_keys": budget_keys,
        "predictor_key": predictor_key, "target_key": target_key,
        "r2_budget": None, "r2_full": None, "f": None, "df1": None, "df2": None, "p_value": None,
        "r2_cv_budget": None, "r2_cv_full": None, "gain_r2_cv": None, "reason": None, "cv_reason": None,
    }
    n_params = len(budget_keys) + 3
    if n < n_params + 2:
        out["reason"] = f"{n} usable rows; the full model has {n_params} parameters and needs at least {n_params + 2}"
        return out
    data = np.asarray(table, dtype=float)
    y = data[:, -1]
    sst = float(np.sum((y - y.mean()) ** 2))
    if sst == 0.0:
        out["reason"] = f"{target_key!r} is the same in every row: SS_tot = 0, R² undefined"
        return out
    z = _standardise(data[:, -2])
    budget = np.column_stack([np.ones(n)] + [_standardise(data[:, j]) for j in range(len(budget_keys))])
    full = np.column_stack([budget, z, _standardise(z * z)])

    everything = np.arange(n)
    ss = {}
    for name, design in (("budget", budget), ("full", full)):
        resid = y - _fit_predict(design, y, everything, everything)
        ss[name] = float(resid @ resid)
        out[f"r2_{name}"] = 1.0 - ss[name] / sst

    rank_b, rank_f = int(np.linalg.matrix_rank(budget)), int(np.linalg.matrix_rank(full))
    df1, df2 = rank_f - rank_b, n - rank_f
    if df1 == 0:
        out["reason"] = f"{predictor_key!r} adds no direction beyond the budget (constant or collinear): no F-test"
    else:
        out["df1"], out["df2"] = df1, df2
        gained = max(ss["budget"] - ss["full"], 0.0)
        out["f"] = math.inf if ss["full"] == 0.0 else (gained / df1) / (ss["full"] / df2)
        out["p_value"] = f_survival(out["f"], df1, df2)

    if len(distinct) < 3:
        out["cv_reason"] = f"{len(distinct)} {group_key} group(s); leave-one-group-out needs at least 3"
        return out
    labels = np.array([distinct.index(g) for g in groups])
    for name, design in (("budget", budget), ("full", full)):
        pred = np.empty(n)
        for k in range(len(distinct)):
            held = labels == k
            pred[held] = _fit_predict(design, y, ~held, held)
        out[f"r2_cv_{name}"] = 1.0 - float(np.sum((y - pred) ** 2)) / sst
    out["gain_r2_cv"] = out["r2_cv_full"] - out["r2_cv_budget"]
    return out
