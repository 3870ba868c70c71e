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

from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from retain.errors import RetainError

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
    return summarize(out)


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
