"""Length bucketing of SFT steps (``micro_batch_tokens``, what bench/sft_varlen.py measures): the grouping rule by
hand, and one step's loss and gradients against the same examples as one right-padded batch."""

from __future__ import annotations

import pytest
import torch

from retain.data import collate, encode_answer, encode_prompt, length_buckets
from retain.errors import RetainError
from retain.methods.config import method_config
from retain.methods.sft import SFTObjective

# answers of very different lengths: one padded batch wastes most of its rows
PAIRS = [("say", "a"), ("say it", "x" * 60), ("hi", "ok"), ("long one", "y" * 35), ("q", "z" * 3), ("two", "ab")]


def test_buckets_are_sorted_and_stay_within_the_token_budget():
    # sorted: 5 (i0), 30 (i2), 32 (i3), 200 (i4), 400 (i1); 200 and 400 alone (two rows of either exceed 100).
    # Costs of the first three (padded positions + group_cost per group), by hand:
    #   {5,30,32} 96 + c;  {5},{30,32} 69 + 2c;  {5},{30},{32} 67 + 3c;  {5,30},{32} 92 + 2c
    assert length_buckets([5, 400, 30, 32, 200], 100) == [[0, 2, 3], [4], [1]]  # c = 128: 224 < 325
    assert length_buckets([5, 400, 30, 32, 200], 100, group_cost=10) == [[0], [2, 3], [4], [1]]  # 89 < 97 < 106
    assert length_buckets([5, 400, 30, 32, 200], 100, group_cost=0) == [[0], [2], [3], [4], [1]]  # 67
    # two rows at most: {5},{30,32} 325 < {5,30},{32} 348
    assert length_buckets([5, 400, 30, 32, 200], 100, max_rows=2) == [[0], [2, 3], [4], [1]]
    assert length_buckets([7, 7, 7], 1000) == [[0, 1, 2]]
    assert length_buckets([], 10) == []


def test_buckets_split_long_from_short_within_a_large_budget():
    # the rule before filled each group up to the budget: 31 short sequences and one of 400 became one group of
    # 32 × 400 = 12800 padded positions for 1330 real ones; the cheapest split keeps the long one apart
    lengths = [30] * 31 + [400]
    assert length_buckets(lengths, 16384) == [list(range(31)), [31]]


def _loss_and_grads(objective, model):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for micro in objective.batches(0):
        loss, _ = objective.loss(model, micro)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_bucketed_step_has_the_padded_batchs_examples_loss_and_gradients(micro_model, tokenizer):
    enc = [(encode_prompt(tokenizer, p), encode_answer(tokenizer, a)) for p, a in PAIRS]
    padded = SFTObjective(lambda rng, k, step: enc[:k], tokenizer.pad_token_id, len(enc))
    bucketed = SFTObjective(lambda rng, k, step: enc[:k], tokenizer.pad_token_id, len(enc), micro_batch_tokens=64)
    [whole] = padded.batches(0)
    chunks = bucketed.batches(0)
    assert len(chunks) > 1 and [c.first for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert all(c.step_tokens == whole.num_target_tokens for c in chunks)
    # the same examples, each once; less padding; each chunk within the budget unless it is one long sequence
    rows = sorted(tuple(r[m.bool()].tolist()) for c in chunks for r, m in zip(c.input_ids, c.attention_mask))
    assert rows == sorted(tuple(p + a) for p, a in enc)
    assert sum(c.input_ids.numel() for c in chunks) < whole.input_ids.numel()
    assert all(c.input_ids.numel() <= 64 or len(c.input_ids) == 1 for c in chunks)
    loss_padded, grads_padded = _loss_and_grads(padded, micro_model)
    loss_bucketed, grads_bucketed = _loss_and_grads(bucketed, micro_model)
    assert loss_bucketed == pytest.approx(loss_padded, rel=1e-6)
    assert grads_bucketed.keys() == grads_padded.keys()
    for name, g in grads_padded.items():
        torch.testing.assert_close(grads_bucketed[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # and the reference really is the plain padded batch of those pairs
    assert torch.equal(whole.input_ids, collate(enc, tokenizer.pad_token_id).input_ids)


def test_micro_batch_tokens_is_an_sft_family_option():
    assert method_config({"name": "sft", "micro_batch_tokens": 4096}).micro_batch_tokens == 4096
    with pytest.raises(RetainError, match="micro_batch_tokens"):
        method_config({"name": "grpo", "micro_batch_tokens": 4096})
    with pytest.raises(RetainError, match="micro_batch_tokens"):
        method_config({"name": "sft", "micro_batch_tokens": 0})
