"""Batched evaluation of a model on tasks: greedy accuracy and pass@K.

- accuracy: the share of prompts whose greedy completion is correct (``task.is_correct``).
- pass@K: with K samples per prompt at temperature 1.0 (no top-k/top-p), the share of prompts with at least one
  correct sample — the unbiased estimator 1 − C(n−c, k)/C(n, k) with n = k samples (Chen et al. 2021).
Prompts come from the task's ``test`` split unless another split is named; ``n`` caps their number (None: every
prompt of the split — a fixed full split, the same prompts for every run when the seed is fixed too, SPEC §3.2).

Per item: ``correct`` is a string of '0'/'1', one per prompt in evaluation order, so two rows of the same run (or of
runs with the same evaluation seed) can be compared item by item (flips, SPEC §3.2). The items are divided into a
**selection half** (even positions) and a **test half** (odd positions) of the seeded order: a checkpoint is chosen
on the selection half and its gain is reported on the test half (SPEC §2.4).
- answer NLL: the mean over items of −Σ_t log π(answer_t) teacher-forced (one forward per item, deterministic), and
  per answer token; a continuous readout of a skill that greedy accuracy shows only once it breaks.
"""

from __future__ import annotations

from math import comb
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from retain import tasks as task_registry
from retain.errors import RetainError
from retain.rollout import RolloutEngine, make_engine

DEFAULT_MAX_NEW_TOKENS = 24


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from ``num_samples`` samples of which ``num_correct`` are correct."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def evaluate_task(
    engine: RolloutEngine,
    task_name: str,
    n: int | None = 200,
    samples: int = 0,
    split: str = "test",
    seed: int = 0,
) -> dict[str, Any]:
    """``{"accuracy", "n"}`` plus ``{"pass_at_k", "k"}`` when ``samples`` > 0, for one task and split; ``score``, the
    mean reward, for a task that gives partial credit per item (``cards``: the share of cards named right)."""
    task = task_registry.get(task_name)
    if getattr(task, "modality", "text") != "text" and not engine.takes_pictures:  # its prompts mean nothing alone
        raise RetainError(f"task {task_name!r} shows pictures: evaluate it on a vision-language model "
                          "(model: vlm, or a VLM directory with its processor)")
    examples = task.examples(split, n, seed=seed)
    prompts = [e.prompt for e in examples]
    max_new = getattr(task, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    greedy = engine.generate(prompts, n=1, greedy=True, max_new_tokens=max_new)
    correct = [task.is_correct(e.prompt, text, e.answer) for e, text in zip(examples, greedy.texts)]
    result: dict[str, Any] = {"accuracy": sum(correct) / max(1, len(correct)), "n": len(correct), "split": split,
                              **halves(correct), "correct": "".join("1" if c else "0" for c in correct)}
    if getattr(task, "partial_credit", False):
        rewards = [task.reward(e.prompt, text, e.answer) for e, text in zip(examples, greedy.texts)]
        result["score"] = sum(rewards) / max(1, len(rewards))
    if samples > 0:
        sampled = engine.generate(prompts, n=samples, temperature=1.0, max_new_tokens=max_new, seed=seed + 1)
        result.update(sampled_scores(task, examples, sampled, samples))
    return result


def sampled_scores(task, examples: Sequence[Any], sampled, samples: int) -> dict[str, Any]:
    """pass@K, K and the mean sample accuracy of ``samples`` completions per example (``sampled.group`` indexes
    ``examples``), each judged by the task's verifier against the example's answer."""
    per_prompt = [0] * len(examples)
    for i, text in zip(sampled.group, sampled.texts):
        per_prompt[i] += task.is_correct(examples[i].prompt, text, examples[i].answer)
    return {"pass_at_k": sum(pass_at_k(samples, c, samples) for c in per_prompt) / max(1, len(examples)),
            "k": samples, "sample_accuracy": sum(per_prompt) / max(1, len(examples) * samples)}


def halves(correct: Sequence[bool]) -> dict[str, float | None]:
    """Accuracy on the selection half (even positions) and the test half (odd positions) of the items."""
    sel, test = correct[0::2], correct[1::2]
    return {"selection": sum(sel) / len(sel) if sel else None, "test": sum(test) / len(test) if test else None}


def answer_nll(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task_name: str,
    n: int | None = None,
    split: str = "test",
    seed: int = 0,
    encode: Any = None,
) -> dict[str, Any]:
    """``{"nll", "nll_per_token", "n"}``: teacher-forced NLL of each item's reference answer (eos included).
    ``encode``: the model kind's item encoder (``retain.kind``; default: text)."""
    from retain.data import encode_text
    from retain.logprobs import answer_logprobs

    examples = task_registry.get(task_name).examples(split, n, seed=seed)
    per_item = answer_logprobs(model, tokenizer, [(e.prompt, e.answer) for e in examples], encode=encode or encode_text)
    tokens = sum(len(row) for row in per_item)
    total = -sum(sum(row) for row in per_item)
    return {"nll": total / max(1, len(per_item)), "nll_per_token": total / max(1, tokens), "n": len(per_item)}


def flips(before: str, after: str) -> dict[str, int]:
    """Per-item transitions between two evaluations of the same items (their ``correct`` strings): ``forgotten``
    (correct before, wrong after) and ``learned`` (wrong before, correct after)."""
    if len(before) != len(after):
        raise ValueError(f"flips compare the same items: {len(before)} against {len(after)} answers")
    return {"forgotten": sum(b == "1" and a == "0" for b, a in zip(before, after)),
            "learned": sum(b == "0" and a == "1" for b, a in zip(before, after)), "n": len(before)}


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task_names: Sequence[str] | str,
    n: int | None = 200,
    samples: int = 0,
    split: str = "test",
    seed: int = 0,
    engine: str = "kv_cache",
    batch_size: int = 256,
) -> dict[str, dict[str, Any]]:
    """Evaluate every task (names or groups); returns ``{task: {"accuracy", "n", ["pass_at_k", "k"]}}``."""
    rollout = make_engine(engine, model, tokenizer, batch_size)
    return {
        name: evaluate_task(rollout, name, n=n, samples=samples, split=_split_for(name, split), seed=seed)
        for name in task_registry.resolve(task_names)
    }


def _split_for(task_name: str, split: str) -> str:
    """Tasks without the asked split (facts has no ``ood``) fall back to ``test``."""
    splits = task_registry.get(task_name).splits
    return split if split in splits else "test"
