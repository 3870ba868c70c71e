"""Rollout tokens per second: retain's default engine (KVCacheSamplerEngine) vs plain ``model.generate``
(HFGenerateEngine), on the embedded base model.

Prompt mix: the test prompts of the sequence tasks (gpoints, kg, countdown; ``per_task`` of each), n = 8 samples per
prompt, temperature 1, at most 24 new tokens (the tasks' default), the engines' default batch of 256 rows. Tokens/s
counts the completion tokens each engine returned (eos included), over the best of ``repeats`` timed runs after a
warm-up; both engines get the same seeds.
"""

from __future__ import annotations

import time

N = 8
MAX_NEW = 24
TASKS = ("gpoints", "kg", "countdown")


def prompt_mix(per_task: int) -> list[str]:
    from retain import tasks

    out: list[str] = []
    for name in TASKS:
        out += [e.prompt for e in tasks.get(name).examples("test", per_task, seed=0)]
    return out


def rollout_rate(engine_name: str, per_task: int, repeats: int) -> dict:
    from retain.models.loading import load_model
    from retain.rollout import make_engine

    model, tok = load_model("base")
    engine = make_engine(engine_name, model, tok)
    prompts = prompt_mix(per_task)
    engine.generate(prompts[:: max(1, len(prompts) // 16)], n=N, max_new_tokens=MAX_NEW, seed=0)  # warm-up
    best = None
    for r in range(repeats):
        start = time.perf_counter()
        out = engine.generate(prompts, n=N, temperature=1.0, max_new_tokens=MAX_NEW, seed=1 + r)
        seconds = time.perf_counter() - start
        tokens = sum(len(c) for c in out.completion_ids)
        rate = tokens / seconds
        if best is None or rate > best["tokens_per_s"]:
            best = {"tokens_per_s": rate, "tokens": tokens, "seconds": seconds, "samples": len(out)}
    return best
