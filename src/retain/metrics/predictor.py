"""The forgetting predictor (Razor, Table 1) and the small statistics the report needs (SPEC §3.1, §2.4).

Across runs, forgetting (prior-skill drop, or −FM) is fitted against each candidate shift measure — forward KL,
reverse KL, L2 weight distance — with a quadratic ``forgetting ≈ a + b·x + c·x²`` by ordinary least squares, and
the fit's R² is reported per candidate, as Razor's Table 1 does. A Spearman rank correlation goes with it, since
R² of a quadratic rewards any smooth trend while Spearman asks only whether the order is right.

Everything here is numpy only; ranks, the t table and the bootstrap are implemented in this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from retain.metrics.matrix import MetricInputError, finite_number

__all__ = [
    "CANDIDATES",
    "fit_quadratic",
    "forgetting_predictor",
    "rank_average",
    "spearman",
    "bootstrap_ci",
    "MeanCI",
    "mean_ci",
    "t_critical",
]

#: The candidate predictors of Razor's Table 1 under the names runs report them.
CANDIDATES: tuple[str, ...] = ("forward_kl", "reverse_kl", "weight_l2")


def _vector(values: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise MetricInputError(f"{what} must be numbers; got {values!r}") from None
    if arr.ndim != 1:
        raise MetricInputError(f"{what} must be 1-D; got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise MetricInputError(f"{what}[{int(bad[0])}] is {arr[bad[0]]!r}; values must be finite")
    return arr


# --------------------------------------------------------------------------------------------------------------
# ranks and Spearman


def rank_average(values: Any) -> np.ndarray:
    """1-based ranks of ``values``, ties given the average of the ranks they span.

    Example: ``[10, 20, 20, 30]`` → ``[1, 2.5, 2.5, 4]`` (the two 20s share ranks 2 and 3).
    """
    arr = _vector(values, "values")
    order = np.argsort(arr, kind="mergesort")
    ranks = np.empty(arr.size, dtype=float)
    sorted_vals = arr[order]
    i = 0
    while i < arr.size:
        k = i
        while k + 1 < arr.size and sorted_vals[k + 1] == sorted_vals[i]:
            k += 1
        ranks[order[i : k + 1]] = (i + k) / 2.0 + 1.0  # positions i..k hold ranks i+1..k+1; their mean
        i = k + 1
    return ranks


def spearman(x: Any, y: Any) -> float | None:
    """Spearman rank correlation: the Pearson correlation of the average ranks of ``x`` and ``y``.

    Ties get average ranks (so this is the tie-corrected coefficient, not ``1 − 6Σd²/(n(n²−1))``, which is only
    exact without ties). Returns ``None`` when it is undefined: fewer than 2 points, or all ``x`` (or all ``y``)
    equal, so one rank vector has zero variance.
    """
    xa, ya = _vector(x, "x"), _vector(y, "y")
    if xa.size != ya.size:
        raise MetricInputError(f"x and y have different lengths ({xa.size} vs {ya.size})")
    if xa.size < 2:
        return None
    rx, ry = rank_average(xa), rank_average(ya)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0.0 or syy == 0.0:
        return None
    return float((dx @ dy) / math.sqrt(sxx * syy))


# --------------------------------------------------------------------------------------------------------------
# the quadratic fit


def fit_quadratic(x: Any, y: Any) -> dict[str, Any]:
    """Least-squares fit ``y ≈ a + b·x + c·x²``; returns ``{"coef": [a, b, c], "r2", "n", "spearman", "note"}``.

    * ``coef`` are coefficients in the units of ``x`` (the fit itself runs on standardised ``x`` for conditioning
      and is mapped back). ``None`` when there are no points.
    * ``r2 = 1 − SS_res / SS_tot`` with ``SS_res = Σ (y − ŷ)²``, ``SS_tot = Σ (y − ȳ)²``, **in-sample** (the fit is
      scored on the points it was fitted to, as in Razor's Table 1; no cross-validation). It is ``None``, with the
      reason in ``note``, when it carries no information:
        - ``n ≤ 3``: a quadratic has 3 parameters, so with 3 distinct points it passes through all of them and R²
          is 1 by construction;
        - ``x`` constant: the prediction cannot depend on ``x`` (``coef`` is then ``[mean(y), 0, 0]``);
        - ``y`` constant: ``SS_tot = 0`` and R² is 0/0.
    * When ``x`` has only 2 distinct values the quadratic is not identifiable; the fit drops to a line
      (``c = 0``), which reaches the same minimum of ``SS_res``.
    * ``spearman``: rank correlation of ``x`` and ``y`` (see :func:`spearman`), ``None`` when undefined.
    * ``note``: ``None``, or why ``r2`` is ``None``.
    """
    xa, ya = _vector(x, "x"), _vector(y, "y")
    if xa.size != ya.size:
        raise MetricInputError(f"x and y have different lengths ({xa.size} vs {ya.size})")
    n = int(xa.size)
    if n == 0:
        return {"coef": None, "r2": None, "n": 0, "spearman": None, "note": "no points to fit"}

    distinct = np.unique(xa).size
    if distinct == 1:
        coef = [float(ya.mean()), 0.0, 0.0]
        pred = np.full(n, ya.mean())
    else:
        degree = min(2, distinct - 1)
        m, s = float(xa.mean()), float(xa.std())
        z = (xa - m) / s
        design = np.vander(z, degree + 1, increasing=True)  # columns 1, z, (z²)
        beta, *_ = np.linalg.lstsq(design, ya, rcond=None)
        beta = np.concatenate([beta, np.zeros(3 - beta.size)])
        pred = design @ beta[: degree + 1]
        # y = α + β·(x−m)/s + γ·(x−m)²/s²  →  a + b·x + c·x²
        al, be, ga = (float(v) for v in beta)
        coef = [al - be * m / s + ga * m * m / (s * s), be / s - 2.0 * ga * m / (s * s), ga / (s * s)]

    note = None
    r2: float | None = None
    if n <= 3:
        note = f"n = {n} ≤ 3: a quadratic (3 parameters) fits that few points exactly, so R² says nothing"
    elif distinct == 1:
        note = "x is the same in every run: forgetting cannot be predicted from it (R² undefined)"
    elif np.ptp(ya) == 0:
        note = "forgetting is the same in every run: SS_tot = 0, R² undefined"
    else:
        ss_res = float(np.sum((ya - pred) ** 2))
        ss_tot = float(np.sum((ya - ya.mean()) ** 2))
        r2 = 1.0 - ss_res / ss_tot
    return {"coef": coef, "r2": r2, "n": n, "spearman": spearman(xa, ya), "note": note}


def forgetting_predictor(
    runs: Sequence[Mapping[str, Any]],
    candidates: Sequence[str] = CANDIDATES,
    target: str = "forgetting",
) -> dict[str, dict[str, Any]]:
    """Razor's Table 1: for each candidate key, a quadratic fit of ``run[target]`` on ``run[candidate]``.

    ``runs`` is a list of dicts such as ``{"forgetting": 4.1, "forward_kl": 0.03, "reverse_kl": 0.05,
    "weight_l2": 1.7, ...}``; ``target`` names the forgetting value (prior-skill drop, or −FM — positive =
    more forgetting either way). For each candidate, the runs that report both the candidate and the target
    (key present, value not ``None``) are used; ``n`` says how many. A NaN/inf value raises
    :class:`MetricInputError` naming the run and key — filter diverged runs out first, deliberately.

    Returns ``{candidate: fit_quadratic(...)}``, i.e. per candidate ``{"coef": [a, b, c], "r2", "n",
    "spearman", "note"}``; see :func:`fit_quadratic` for when ``r2`` is ``None``.
    """
    if isinstance(candidates, str):
        candidates = [candidates]
    out: dict[str, dict[str, Any]] = {}
    for cand in candidates:
        xs: list[float] = []
        ys: list[float] = []
        for i, run in enumerate(runs):
            if not isinstance(run, Mapping):
                raise MetricInputError(f"runs[{i}] must be a dict of run measurements; got {type(run).__name__}")
            xv, yv = run.get(cand), run.get(target)
            if xv is None or yv is None:
                continue
            xs.append(finite_number(xv, f"runs[{i}][{cand!r}]"))
            ys.append(finite_number(yv, f"runs[{i}][{target!r}]"))
        fit = fit_quadratic(xs, ys)
        if fit["n"] == 0:
            fit["note"] = f"no run reports both {cand!r} and {target!r}"
        out[cand] = fit
    return out


# --------------------------------------------------------------------------------------------------------------
# intervals over seeds


def bootstrap_ci(
    values: Any,
    stat: Callable[[np.ndarray], Any] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` for ``stat(values)``.

    Draws ``n_boot`` resamples of ``values`` with replacement (``numpy.random.default_rng(seed)``, so the same
    seed gives the same interval), applies ``stat`` to each, and returns the empirical ``alpha/2`` and
    ``1 − alpha/2`` quantiles (numpy's default linear interpolation). With one value the interval is that value
    twice. Few values (a handful of seeds) give intervals that are too narrow; :func:`mean_ci` is the better
    choice for a mean over seeds.
    """
    arr = _vector(values, "values")
    if arr.size == 0:
        raise MetricInputError("bootstrap_ci: no values")
    if not 0.0 < alpha < 1.0:
        raise MetricInputError(f"bootstrap_ci: alpha must be in (0, 1); got {alpha!r}")
    if int(n_boot) < 1:
        raise MetricInputError(f"bootstrap_ci: n_boot must be ≥ 1; got {n_boot!r}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(int(n_boot), arr.size))
    stats = np.array([float(stat(arr[row])) for row in idx])
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


# 0.975 quantiles of Student's t for df = 1..30 (two-sided 95%), to 4 decimals.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_critical(df: int) -> float:
    """``t_{0.975, df}`` from a table for ``df = 1..30``; 1.96 (the normal quantile) above 30.

    Above 30 the normal value is slightly small (true t at df 40 is 2.021, at 120 is 1.980), i.e. the interval is
    at most ~4% too narrow there; retain accepts that to stay table-only.
    """
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise MetricInputError(f"t_critical: degrees of freedom must be an integer ≥ 1; got {df!r}")
    df = int(df)
    return _T975[df - 1] if df <= 30 else 1.96


class MeanCI(NamedTuple):
    """A mean with its two-sided 95% t-interval; ``half_width``, ``low``, ``high`` are ``None`` for n = 1."""

    mean: float
    half_width: float | None
    low: float | None
    high: float | None
    n: int


def mean_ci(values: Any) -> MeanCI:
    """Mean over seeds with a two-sided 95% Student-t interval.

    ``half_width = t_{0.975, n−1} · s / √n`` with ``s`` the sample standard deviation (Bessel's ``n − 1``) and
    ``t`` from :func:`t_critical` (table for df 1..30, 1.96 above). Example: ``[1, 2, 3]`` → mean 2, s = 1,
    half-width 4.3027/√3 ≈ 2.4842. With a single value there is no spread to estimate: the interval fields are
    ``None``. Only the 95% level is supported.
    """
    arr = _vector(values, "values")
    n = int(arr.size)
    if n == 0:
        raise MetricInputError("mean_ci: no values")
    mean = float(arr.mean())
    if n == 1:
        return MeanCI(mean, None, None, None, 1)
    s = float(arr.std(ddof=1))
    hw = t_critical(n - 1) * s / math.sqrt(n)
    return MeanCI(mean, hw, mean - hw, mean + hw, n)
