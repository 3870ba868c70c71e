"""Shared-prefix prefill (retain.rollout.prefix and the KV-cache engine's levels): the plan by hand, and greedy
completions token-identical to a single padded prefill and to ``model.generate``."""

import pytest

from retain.rollout import hf as hf_engine
from retain.rollout import make_engine
from retain.rollout.prefix import prefix_cuts, prefix_ids, prefix_levels, prefix_plan

# three prompts: all share [1, 2]; the first two share [1, 2, 3]
PROMPTS = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7]]


def test_prefix_ids_name_equal_prefixes_equally():
    ids = prefix_ids(PROMPTS, 3)
    assert [len(set(level)) for level in ids] == [1, 1, 1, 2]
    assert ids[3][0] == ids[3][1] != ids[3][2]


@pytest.mark.parametrize("level_cost, cuts", [
    # costs by hand. No cut: 3 prompts × 4 = 12 (+ one forward). Cut at 2: 1 × 2 + 3 × 2 = 8 (+ two). Cut at 3
    # alone: 2 × 3 + 3 × 1 = 9 (+ two). Cuts 2, 3: 1 × 2 + 2 × 1 + 3 × 1 = 7 (+ three). Cut 1 is never a candidate
    # (the distinct count does not grow after it), cut 4 neither (each prompt keeps its last token for the last level)
    (0, [2, 3]),  # 7 < 8 < 9 < 12
    (2, [2]),  # 8 + 4 = 12 < 7 + 6 = 13 < 12 + 2 = 14
    (32, []),  # 12 + 32 = 44 < 8 + 64
])
def test_prefix_cuts_by_hand(level_cost, cuts):
    assert prefix_cuts(PROMPTS, level_cost) == cuts


def test_prefix_cuts_single_prompt_and_distinct_starts():
    assert prefix_cuts([[1, 2, 3]], 0) == []
    assert prefix_cuts([[1, 2], [3, 4], [5, 6]], 0) == []  # nothing shared: no cut pays


def test_prefix_levels_rows():
    levels = prefix_levels(PROMPTS, [2, 3])
    assert levels == [([0], [0, 0, 0]), ([0, 2], [0, 0, 1])]


# prompts sharing long prefixes, of different lengths (the last level is padded), some repeated (sample rows)
SHARED = ["friend of mentor of ruby?", "friend of mentor of ava?", "friend of boss of ruby?", "friend of x?",
          "reverse abc", "reverse abcd", "reverse lemon", "3+4=", "friend of mentor of ruby?"]


@pytest.mark.parametrize("batch_size", [256, 4])
def test_levels_match_one_padded_prefill_and_generate(micro_model, tokenizer, monkeypatch, batch_size):
    hf = make_engine("hf", micro_model, tokenizer).generate(SHARED, n=2, greedy=True, max_new_tokens=10)
    outputs = {}
    for cost in (0, 10**9):  # every useful cut; none (one left-padded prefill, the engine before levels)
        monkeypatch.setattr(hf_engine, "PREFIX_LEVEL_COST", cost)
        engine = make_engine("kv_cache", micro_model, tokenizer, batch_size=batch_size)
        outputs[cost] = engine.generate(SHARED, n=2, greedy=True, max_new_tokens=10)
    assert outputs[0].completion_ids == outputs[10**9].completion_ids == hf.completion_ids
    assert outputs[0].texts == hf.texts and outputs[0].truncated == hf.truncated


def test_levels_are_used_on_shared_prompts(micro_model, tokenizer, monkeypatch):
    """The level path really runs (the test above would pass if it never did): one forward per level, the last
    level and the decoding steps."""
    monkeypatch.setattr(hf_engine, "PREFIX_LEVEL_COST", 0)
    calls = []
    forward = micro_model.forward
    micro_model.forward = lambda *a, **k: calls.append(k["input_ids"].shape) or forward(*a, **k)
    engine = make_engine("kv_cache", micro_model, tokenizer)
    prompts = [engine.encode(p) for p in dict.fromkeys(SHARED)]
    cuts = prefix_cuts(prompts, 0)
    assert len(cuts) >= 2
    engine.generate(SHARED, greedy=True, max_new_tokens=1)
    assert len(calls) == len(cuts) + 1  # the levels and the last level; max_new_tokens=1 decodes nothing more
    assert calls[0] == (1, cuts[0])  # every prompt starts with the chat template's opening: one row


@pytest.mark.parametrize("task_name", ["kg", "countdown"])
def test_embedded_model_greedy_evaluation_unchanged_by_levels(task_name, monkeypatch):
    """The embedded model's greedy completions of a task's test prompts, every item, with the levels the engine
    plans and with none (the engine before them): token-identical, so every verdict is unchanged."""
    from retain import tasks
    from retain.models.loading import load_model

    model, tok = load_model("base")
    prompts = [e.prompt for e in tasks.get(task_name).examples("test", 64, seed=0)]
    engine = make_engine("kv_cache", model, tok)
    assert prefix_cuts([engine.encode(p) for p in prompts], hf_engine.PREFIX_LEVEL_COST)  # levels are planned
    with_levels = engine.generate(prompts, greedy=True, max_new_tokens=24)
    monkeypatch.setattr(hf_engine, "PREFIX_LEVEL_COST", 10**9)
    without = make_engine("kv_cache", model, tok).generate(prompts, greedy=True, max_new_tokens=24)
    assert with_levels.completion_ids == without.completion_ids


def test_prefix_plan_is_the_cuts_with_their_levels_in_one_pass():
    import random

    rng = random.Random(0)
    batches = [PROMPTS, [[1, 2, 3]], [[1, 2], [3, 4], [5, 6]]]
    batches += [[[1, 2] + [rng.randint(3, 5) for _ in range(rng.randint(2, 6))] for _ in range(12)] for _ in range(5)]
    for prompts in batches:
        for cost in (0, 2, 32):
            cuts = prefix_cuts(prompts, cost)
            expected = [(c, heads, row) for c, (heads, row) in zip(cuts, prefix_levels(prompts, cuts))]
            assert prefix_plan(prompts, cost) == expected
