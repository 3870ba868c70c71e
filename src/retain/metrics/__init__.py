"""Metrics: continual-learning scores of the accuracy matrix (SPEC §3) and the forgetting predictor (§3.1).

Index convention (see :mod:`retain.metrics.matrix`): ``R`` is ``(T + 1) × T``; row ``k`` is the model after stage
``k`` (row 0 = before any stage), column ``c`` (0-based) is the task trained in stage ``c + 1``.
"""

from retain.metrics.matrix import (
    MetricInputError,
    as_matrix,
    average_accuracy,
    avalanche_forgetting,
    backward_transfer,
    forgetting_measure,
    forward_transfer,
    gain,
    ood_change,
    prior_drop,
    summarize,
    target_gain,
)
from retain.metrics.predictor import (
    CANDIDATES,
    MeanCI,
    bootstrap_ci,
    fit_quadratic,
    forgetting_predictor,
    mean_ci,
    rank_average,
    spearman,
    t_critical,
)

__all__ = [
    "MetricInputError",
    "as_matrix",
    "average_accuracy",
    "avalanche_forgetting",
    "backward_transfer",
    "forgetting_measure",
    "forward_transfer",
    "gain",
    "ood_change",
    "prior_drop",
    "summarize",
    "target_gain",
    "CANDIDATES",
    "MeanCI",
    "bootstrap_ci",
    "fit_quadratic",
    "forgetting_predictor",
    "mean_ci",
    "rank_average",
    "spearman",
    "t_critical",
]
