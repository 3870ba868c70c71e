"""Continual-learning metrics: pure functions of the accuracy matrix R (SPEC §3).

The accuracy matrix
-------------------
``R[k][j]`` is the accuracy on stage task ``j`` after training stage ``k``. With ``T`` stages, ``R`` has
``T + 1`` rows and ``T`` columns:

* row ``0`` is the model before any stage (the base model); row ``k`` (``1 <= k <= T``) is the model after
  stage ``k``;
* column ``c`` (0-based, as numpy indexes it) is the task trained in stage ``c + 1``: columns are in training
  order.

The formulas below are written, as in SPEC §3 and the papers, with a **1-based task index** ``j`` (task ``j`` is
trained in stage ``j``), so that ``R[j][j]`` means "task j right after its own stage". In 0-based numpy terms
that cell is ``R[j, j - 1]``: the row index equals the stage number, the column index is ``j - 1``. The
functions take care of this mapping; callers only pass the matrix.

Extra evaluation columns (prior skills, out-of-distribution splits) do not belong in ``R``; the stage-matrix
functions reject a matrix that is not exactly ``(T + 1) × T`` so a transposed or widened matrix cannot be
silently misread. Use :func:`prior_drop` / :func:`ood_change` on rows of a wider table instead, passing the
column indices.

Inputs may be lists of lists or numpy arrays, in any unit (fractions or percentages — results are in the same
unit). Every cell must be finite: NaN or ±inf raises :class:`MetricInputError` (a ``ValueError``) that names
the cell.

Undefined values are ``None``: with ``T = 1`` there is no earlier task, so FM, BWT, FWT and the Avalanche mean
are ``None`` (the sums are empty and their ``1/(T−1)`` normaliser is ``1/0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from retain.errors import RetainError

__all__ = [
    "MetricInputError",
    "as_matrix",
    "average_accuracy",
    "forgetting_measure",
    "avalanche_forgetting",
    "backward_transfer",
    "forward_transfer",
    "target_gain",
    "gain",
    "prior_drop",
    "ood_change",
    "summarize",
]


class MetricInputError(RetainError, ValueError):
    """An accuracy matrix or row that cannot be used: wrong shape, non-numeric, or a NaN/inf cell."""


# --------------------------------------------------------------------------------------------------------------
# validation


def _check_finite(arr: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        cell = "[" + "][".join(str(i) for i in idx) + "]"
        raise MetricInputError(f"{what}{cell} is {arr[idx]!r}; accuracies must be finite numbers")


def _to_float_array(values: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(f"{what} must be numbers (got {values!r}): {exc}") from None
    return arr


def as_matrix(R: Any) -> np.ndarray:
    """Validate ``R`` and return it as a float ``(T + 1, T)`` numpy array (a copy).

    Raises :class:`MetricInputError` when ``R`` is ragged, not 2-D, not ``(T + 1) × T`` with ``T >= 1``, or has a
    non-finite cell (the message names the cell as ``R[k][c]``, 0-based row and column).
    """
    arr = _to_float_array(R, "R")
    if arr.ndim != 2:
        raise MetricInputError(f"R must be a 2-D matrix (rows = stages 0..T, columns = tasks); got {arr.ndim}-D")
    rows, cols = arr.shape
    if cols < 1 or rows != cols + 1:
        raise MetricInputError(
            f"R must have T+1 rows and T columns (row 0 = before any stage, one column per stage task); "
            f"got {rows} rows × {cols} columns"
        )
    _check_finite(arr, "R")
    return arr.copy()


def _mean_or_none(terms: list[float]) -> float | None:
    return float(sum(terms) / len(terms)) if terms else None


# --------------------------------------------------------------------------------------------------------------
# stage-matrix metrics


def average_accuracy(R: Any) -> float:
    """Average accuracy after the last stage (SPEC §3; Lai, Chaudhry).

    ``AA = (1/T) Σ_{j=1..T} R[T][j]`` — the mean of the last row.
    """
    arr = as_matrix(R)
    return float(arr[-1].mean())


def forgetting_measure(R: Any) -> float | None:
    """Forgetting measure FM (SPEC §3; Lai, Chaudhry).

    ``FM = (1/(T−1)) Σ_{j=1..T−1} ( R[T][j] − max_{k∈[j, T−1]} R[k][j] )`` with 1-based task ``j``: the final
    accuracy on task ``j`` minus its best accuracy over the rows from its own stage ``j`` up to stage ``T−1``
    (row ``T`` itself is not in the max, the base row 0 never is). In numpy terms, for column ``c = j − 1`` the
    max runs over rows ``c+1 .. T−1``.

    Negative means forgetting. It is ≤ 0 whenever no earlier task ends above its previous peak — the usual case,
    hence SPEC's "≤ 0" — but it is not clamped: a task whose final accuracy exceeds every earlier one contributes
    a positive term. It is always ≤ :func:`backward_transfer`, since the max includes ``k = j``.

    Returns ``None`` when ``T = 1`` (no earlier task).
    """
    arr = as_matrix(R)
    T = arr.shape[1]
    terms = [arr[T, j - 1] - arr[j:T, j - 1].max() for j in range(1, T)]
    return _mean_or_none(terms)


def avalanche_forgetting(R: Any) -> dict[str, Any]:
    """Forgetting in the Avalanche convention (SPEC §3): ``F_j = R[j][j] − R[T][j]``, 1-based task ``j``.

    Accuracy right after training on task ``j`` minus the final accuracy; **positive means forgetting** (the
    opposite sign of :func:`forgetting_measure` and :func:`backward_transfer`; report them named apart).

    Returns ``{"per_task": [F_1, ..., F_T], "mean": mean of F_j over j < T}``. ``F_T`` is always 0 and is left
    out of the mean, so the mean equals ``−BWT``. The mean is ``None`` when ``T = 1``.
    """
    arr = as_matrix(R)
    T = arr.shape[1]
    per_task = [float(arr[j, j - 1] - arr[T, j - 1]) for j in range(1, T + 1)]
    return {"per_task": per_task, "mean": _mean_or_none(per_task[:-1])}


def backward_transfer(R: Any) -> float | None:
    """Backward transfer (SPEC §3; Lopez-Paz & Ranzato, used by Lai).

    ``BWT = (1/(T−1)) Σ_{j=1..T−1} ( R[T][j] − R[j][j] )``, 1-based task ``j``: final accuracy minus accuracy
    right after the task's own stage. Negative means forgetting. ``None`` when ``T = 1``.
    """
    arr = as_matrix(R)
    T = arr.shape[1]
    return _mean_or_none([float(arr[T, j - 1] - arr[j, j - 1]) for j in range(1, T)])


def forward_transfer(R: Any) -> float | None:
    """Forward transfer relative to the base model (SPEC §3; EasyCL convention).

    ``FWT = (1/(T−1)) Σ_{j=2..T} ( R[j−1][j] − R[0][j] )``, 1-based task ``j``: accuracy on task ``j`` just before
    its own stage minus the base model's accuracy on it. ``None`` when ``T = 1``.
    """
    arr = as_matrix(R)
    T = arr.shape[1]
    return _mean_or_none([float(arr[j - 1, j - 1] - arr[0, j - 1]) for j in range(2, T + 1)])


def target_gain(R: Any, j: int) -> float:
    """Gain on stage task ``j`` from its own stage: ``R[j][j] − R[0][j]``.

    ``j`` is the **1-based stage number** (``1 <= j <= T``), as in the SPEC formulas; the column read is
    ``j − 1``. With ``T = 1`` and ``j = 1`` this is the Retaining paper's gain ``R[T][target] − R[0][target]``.
    """
    arr = as_matrix(R)
    T = arr.shape[1]
    if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or not 1 <= j <= T:
        raise MetricInputError(f"target_gain: j must be a stage number in 1..{T} (1-based); got {j!r}")
    return float(arr[j, j - 1] - arr[0, j - 1])


# --------------------------------------------------------------------------------------------------------------
# single-target (Retaining) and extra-column metrics


def finite_number(value: Any, what: str) -> float:
    """``value`` as a float, or a ``MetricInputError`` naming ``what`` (not a number, NaN or infinite)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise MetricInputError(f"{what} must be a number; got {value!r}") from None
    if not math.isfinite(out):
        raise MetricInputError(f"{what} is {out!r}; values must be finite")
    return out


def gain(before: float, after: float) -> float:
    """Gain on the target task (Retaining): ``after − before``; positive means the task was learned."""
    return finite_number(after, "after") - finite_number(before, "before")


def _select(row: Any, columns: Sequence[int] | None, what: str) -> np.ndarray:
    arr = _to_float_array(row, what)
    if arr.ndim != 1:
        raise MetricInputError(f"{what} must be one row of accuracies (1-D); got {arr.ndim}-D")
    cols = list(range(len(arr))) if columns is None else list(columns)
    for c in cols:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < len(arr):
            raise MetricInputError(f"column index {c!r} is not valid for {what} of length {len(arr)}")
    for c in cols:  # only the columns used must be finite; name the cell by its index in the full row
        if not math.isfinite(arr[c]):
            raise MetricInputError(f"{what}[{c}] is {arr[c]!r}; accuracies must be finite numbers")
    return arr[cols] if cols else arr[:0]


def _paired(before: Any, after: Any, columns: Sequence[int] | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    b = _select(before, columns, "before")
    a = _select(after, columns, "after")
    if b.shape != a.shape:
        raise MetricInputError(f"{name}: before and after have different lengths ({b.size} vs {a.size})")
    if b.size == 0:
        raise MetricInputError(f"{name}: no columns to average (empty prior/OOD column list)")
    return b, a


def prior_drop(before_row: Any, after_row: Any, prior_columns: Sequence[int] | None = None) -> float:
    """Drop on prior skills (Retaining): mean over prior skills of ``(acc before − acc after)``.

    **Positive means forgetting.** ``before_row`` / ``after_row`` are rows of an evaluation table (e.g. the base
    model's and the final model's rows, including extra columns); ``prior_columns`` are the 0-based indices of the
    prior-skill columns in those rows. With ``prior_columns=None`` every entry of the rows is a prior skill.
    """
    b, a = _paired(before_row, after_row, prior_columns, "prior_drop")
    return float(np.mean(b - a))


def ood_change(before: Any, after: Any, columns: Sequence[int] | None = None) -> float:
    """Change in out-of-distribution accuracy (Chu): ``after − before``; positive means OOD improved.

    ``before`` and ``after`` are scalars, or rows (with ``columns``, the 0-based OOD column indices; without, all
    entries) — for rows the result is the mean of ``after − before`` over the OOD columns.
    """
    if np.ndim(before) == 0 and np.ndim(after) == 0 and columns is None:
        return gain(before, after)
    b, a = _paired(np.atleast_1d(before), np.atleast_1d(after), columns, "ood_change")
    return float(np.mean(a - b))


# --------------------------------------------------------------------------------------------------------------
# everything at once


def summarize(R: Any, prior_before: Any = None, prior_after: Any = None) -> dict[str, Any]:
    """All stage-matrix metrics of ``R`` in one JSON-ready dict (plain floats, lists and ``None``).

    Keys: ``num_stages`` (T), ``average_accuracy``, ``forgetting_measure`` (Lai/Chaudhry, ≤ 0 = forgetting),
    ``backward_transfer``, ``forward_transfer``, ``avalanche_forgetting`` (mean of F_j over j < T, positive =
    forgetting), ``avalanche_forgetting_per_task`` ([F_1..F_T]), ``target_gains`` ([R[j][j] − R[0][j] for
    j = 1..T]), ``final_accuracies`` (row T). ``None`` marks a value undefined for T = 1.

    When ``prior_before`` and ``prior_after`` (prior-skill accuracies before the first stage and after the last,
    same length) are given, adds ``prior_drop`` (mean of before − after, positive = forgetting) and
    ``prior_drop_per_skill``. Passing only one of them is an error.
    """
    arr = as_matrix(R)
    T = arr.shape[1]
    aval = avalanche_forgetting(arr)
    out: dict[str, Any] = {
        "num_stages": int(T),
        "average_accuracy": average_accuracy(arr),
        "forgetting_measure": forgetting_measure(arr),
        "backward_transfer": backward_transfer(arr),
        "forward_transfer": forward_transfer(arr),
        "avalanche_forgetting": aval["mean"],
        "avalanche_forgetting_per_task": aval["per_task"],
        "target_gains": [target_gain(arr, j) for j in range(1, T + 1)],
        "final_accuracies": [float(v) for v in arr[-1]],
    }
    if (prior_before is None) != (prior_after is None):
        raise MetricInputError("summarize: give both prior_before and prior_after, or neither")
    if prior_before is not None:
        b, a = _paired(np.atleast_1d(prior_before), np.atleast_1d(prior_after), None, "prior_drop")
        out["prior_drop"] = float(np.mean(b - a))
        out["prior_drop_per_skill"] = [float(v) for v in (b - a)]
    return out
