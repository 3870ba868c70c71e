import pytest
import torch

from retain.evaluate import pass_at_k
from retain.rollout import make_engine
from retain.errors import RetainError

PROMPTS = ["reverse abc", "3+4=", "reverse lemon", "city of ava?"]


def test_cached_sampler_matches_hf_generate_greedy(micro_model, tokenizer):
    hf = make_engine("hf", micro_model, tokenizer).generate(PROMPTS, greedy=True, max_new_tokens=12)
    ours = make_engine("cached", micro_model, tokenizer).generate(PROMPTS, greedy=True, max_new_tokens=12)
    assert ours.completion_ids == hf.completion_ids
    assert ours.texts == hf.texts


def test_sampling_is_seeded_and_grouped(micro_model, tokenizer):
    engine = make_engine("cached", micro_model, tokenizer, batch_size=3)  # batches cross prompt boundaries
    a = engine.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=7)
    b = engine.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=7)
    c = engine.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=8, seed=8)
    assert a.completion_ids == b.completion_ids and a.completion_ids != c.completion_ids
    assert a.group == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert a.prompts[5] == PROMPTS[1] and len(a) == 16


def test_completions_stop_at_eos(micro_model, tokenizer):
    # make eos the only likely token: completions are exactly [eos], texts empty, not truncated
    with torch.no_grad():
        micro_model.lm_head.weight.zero_()
        micro_model.lm_head.weight[tokenizer.eos_token_id] = 0  # tied: edits embeddings too, fine for this test
        micro_model.model.norm.weight.zero_()
    out = make_engine("cached", micro_model, tokenizer).generate(PROMPTS[:2], greedy=True, max_new_tokens=5)
    # all logits equal → argmax is token 0 (pad); check the truncation flags and cut logic instead
    assert all(len(c) == 5 for c in out.completion_ids) and all(out.truncated)


def test_unknown_engine():
    with pytest.raises(RetainError, match="unknown rollout engine 'nope'"):
        make_engine("nope", None, None)


@pytest.mark.parametrize(
    "n,c,k,expected",
    [(4, 1, 1, 0.25), (4, 1, 4, 1.0), (5, 2, 2, 0.7), (16, 0, 16, 0.0), (10, 3, 1, 0.3)],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)
