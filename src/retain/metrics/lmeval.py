"""General skills through EleutherAI's lm-evaluation-harness (optional: ``pip install 'retain[lmeval]'``).

``evaluate_general(model, tokenizer, ["arc_easy", "hellaswag"], limit=500)`` wraps the model *in memory* — as
trained, a LoRA adapter merged into a copy — with lm_eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` and runs
``lm_eval.simple_evaluate`` on the named tasks (or task dicts / YAML-style configs lm_eval accepts), seeded. Returns
``{task: {metric: value}}``: lm_eval's ``results`` with the default filter's ``,none`` suffix dropped (other filters
keep theirs) and non-numeric entries (aliases) left out.

For real models: the embedded character-level model knows none of these benchmarks. lm_eval fetches each task's data
set from the Hugging Face hub on first use (then from its cache), so this needs network once per task. Call it on the
main process only under a multi-process launch (lm_eval itself warns against accelerate launch with a model object).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from retain.errors import RetainError

if TYPE_CHECKING:
    from retain.config import LMEvalConfig

INSTALL = "pip install 'retain[lmeval]'"


def require_lm_eval() -> tuple[Any, Any]:
    """(the ``lm_eval`` module, its ``HFLM`` class), or one RetainError saying what to install."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise RetainError(
            f"general-skill evaluation needs lm-evaluation-harness with its Hugging Face backend: {INSTALL} "
            f"({err})"
        ) from None
    return lm_eval, HFLM


def evaluate_general(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str | dict[str, Any]],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    seed: int = 0,
    apply_chat_template: bool = False,
) -> dict[str, dict[str, float]]:
    """Scores of ``model`` on lm_eval ``tasks``: ``{task: {metric: value}}`` (see the module docstring)."""
    return summarize(run_lm_eval(model, tokenizer, tasks, num_fewshot=num_fewshot, limit=limit,
                                 batch_size=batch_size, seed=seed, apply_chat_template=apply_chat_template))


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str | dict[str, Any]],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    seed: int = 0,
    apply_chat_template: bool = False,
) -> dict[str, Any] | None:
    """``lm_eval.simple_evaluate``'s whole result for ``model`` (``None`` on a non-main rank)."""
    if not tasks:
        raise RetainError("evaluate_general: no lm-eval tasks given")
    lm_eval, HFLM = require_lm_eval()
    from retain.models.adapters import merged_copy

    model = merged_copy(model)  # lm_eval sees plain weights; the caller's model (and adapter) is left as it is
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, log_samples=False,
            apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    return out


def summarize(out: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``simple_evaluate``'s result (``None`` on a non-main rank → ``{}``)."""
    if not out:
        return {}
    table: dict[str, dict[str, float]] = {}
    for task, metrics in out.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            row[key.removesuffix(",none")] = float(value)
        table[task] = row
    return table


PREFERRED_METRICS = ("acc", "exact_match", "acc_norm")


def lm_eval_cells(model, tokenizer, cfg: LMEvalConfig, columns: Sequence[str], seed: int) -> dict[str, dict[str, Any]]:
    """The ``eval.lm_eval`` columns among ``columns`` as cells of an evaluation row: ``accuracy`` (the configured
    metric, else the first of ``PREFERRED_METRICS`` the task reports), ``metric``, ``n`` (documents scored) and every
    ``scores`` lm_eval reported. One lm_eval call scores them all."""
    named = [(task, column) for task, column in zip(cfg.tasks, cfg.columns()) if column in columns]
    if not named:
        return {}
    out = run_lm_eval(model, tokenizer, [task for task, _ in named], num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                      batch_size=cfg.batch_size, seed=seed, apply_chat_template=cfg.apply_chat_template)
    scores, samples = summarize(out), (out or {}).get("n-samples", {})
    cells = {}
    for _, column in named:
        name = column.partition(":")[2]
        if name not in scores:
            raise RetainError(f"eval.lm_eval: lm_eval returned no scores for task {name!r}")
        wanted = [cfg.metric] if cfg.metric else [m for m in PREFERRED_METRICS if m in scores[name]]
        if not wanted or wanted[0] not in scores[name]:
            raise RetainError(f"eval.lm_eval: task {name!r} reports no {cfg.metric or ' / '.join(PREFERRED_METRICS)} "
                              f"(it reports {', '.join(scores[name]) or 'nothing'}; set eval.lm_eval.metric)")
        n = (samples.get(name) or {}).get("effective", cfg.limit or 0)
        cells[column] = {"accuracy": scores[name][wanted[0]], "metric": wanted[0], "n": int(n), "split": "lm_eval",
                         "scores": scores[name]}
    return cells
