import pytest
import torch

from retain.evaluate import pass_at_k
from retain.rollout import make_engine
from retain.errors import RetainError

PROMPTS = ["reverse abc", "3+4=", "reverse lemon", "city of ava?"]


def test_kv_cache_sampler_matches_hf_generate_greedy(micro_model, tokenizer):
    hf = make_engine("hf", micro_model, tokenizer).generate(PROMPTS, greedy=True, max_new_tokens=12)
    ours = make_engine("kv_cache", micro_model, tokenizer).generate(PROMPTS, greedy=True, max_new_tokens=12)
    assert ours.completion_ids == hf.completion_ids
    assert ours.texts == hf.texts


# prompts of very different lengths (left padding in a batch) and repeats of one prompt (shared prefill)
MIXED = ["a", "reverse a much longer prompt here", "3+4=", "city of ava?", "reverse abc", "a", "x" * 40, "12*3="]


@pytest.mark.parametrize("batch_size", [256, 3, 1])
def test_kv_cache_sampler_greedy_matches_hf_on_mixed_lengths(micro_model, tokenizer, batch_size):
    # batch_size below the request: batches are cut from length-sorted rows, results come back in request order
    hf = make_engine("hf", micro_model, tokenizer).generate(MIXED, n=2, greedy=True, max_new_tokens=10)
    ours = make_engine("kv_cache", micro_model, tokenizer, batch_size=batch_size)
    out = ours.generate(MIXED, n=2, greedy=True, max_new_tokens=10)
    assert out.completion_ids == hf.completion_ids
    assert out.texts == hf.texts and out.truncated == hf.truncated
    assert out.prompts == [p for p in MIXED for _ in range(2)] and out.prompt_ids == hf.prompt_ids


def _eos_biased(model, tokenizer, bias: float, gain: float = 1.0) -> None:
    """Untie the output head (weights × ``gain``) and raise eos's logit by ``bias``, so completions end at very
    different lengths."""
    with torch.no_grad():
        head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
        head.weight.copy_(model.lm_head.weight * gain)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = bias
    model.lm_head = head


def test_kv_cache_sampler_early_finishing_rows_match_hf_greedy(micro_model, tokenizer):
    # greedy completions ending anywhere from step 3 to never (16 tokens): rows leave the batch as they finish.
    # Sharpened logits (gain 20) keep every greedy choice here > 5e-3 away from a tie, far above float noise.
    _eos_biased(micro_model, tokenizer, 5.6, gain=20.0)
    prompts = [f"q{i} " + "z" * (i % 7) for i in range(24)]
    hf = make_engine("hf", micro_model, tokenizer).generate(prompts, greedy=True, max_new_tokens=16)
    lengths = {len(c) for c in hf.completion_ids}
    assert len(lengths) >= 8, lengths  # the test needs rows that finish at different steps
    for batch_size in (256, 5):
        out = make_engine("kv_cache", micro_model, tokenizer, batch_size=batch_size).generate(
            prompts, greedy=True, max_new_tokens=16
        )
        assert out.completion_ids == hf.completion_ids and out.truncated == hf.truncated


def test_kv_cache_sampling_reproducible_and_stops_at_eos(micro_model, tokenizer):
    _eos_biased(micro_model, tokenizer, 3.0)  # eos likely: samples of one prompt end at different steps
    engine = make_engine("kv_cache", micro_model, tokenizer, batch_size=16)  # 3 batches, cut inside prompt groups
    a = engine.generate(MIXED, n=5, temperature=1.0, max_new_tokens=12, seed=3)
    b = engine.generate(MIXED, n=5, temperature=1.0, max_new_tokens=12, seed=3)
    c = engine.generate(MIXED, n=5, temperature=1.0, max_new_tokens=12, seed=4)
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    assert a.completion_ids != c.completion_ids
    eos = tokenizer.eos_token_id
    assert len({len(x) for x in a.completion_ids}) >= 3
    for ids, truncated in zip(a.completion_ids, a.truncated):
        assert ids.count(eos) == (0 if truncated else 1)  # cut at the first eos, which ends the completion
        assert truncated == (ids[-1] != eos) and (not truncated or len(ids) == 12)
    assert a.group == [i for i in range(len(MIXED)) for _ in range(5)]


def test_kv_cache_sampling_follows_the_tempered_distribution(tokenizer):
    """One sampled token per row from a model whose next-token distribution is known: the empirical frequencies
    match softmax(logits / T) (T = 0.5 here), which is what GRPO's log-probabilities assume."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.full((len(tokenizer),), -1e4))
        model.lm_head.bias[[5, 6, 7]] = torch.tensor([0.0, 0.5, 1.0])
    out = make_engine("kv_cache", model, tokenizer).generate(["p"], n=4000, temperature=0.5, max_new_tokens=1, seed=0)
    first = torch.tensor([c[0] for c in out.completion_ids])
    freq = torch.stack([(first == t).float().mean() for t in (5, 6, 7)])
    expected = torch.softmax(torch.tensor([0.0, 0.5, 1.0]) / 0.5, dim=0)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_sampling_is_seeded_and_grouped(micro_model, tokenizer):
    engine = make_engine("kv_cache", micro_model, tokenizer, batch_size=3)  # batches cross prompt boundaries
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
    out = make_engine("kv_cache", micro_model, tokenizer).generate(PROMPTS[:2], greedy=True, max_new_tokens=5)
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


def test_old_engine_name_cached_is_still_the_kv_cache_loop(micro_model, tokenizer, tmp_path):
    """``cached`` (the KV-cache loop's old name) is accepted: by make_engine, by a config (read as kv_cache), and by a
    run directory whose config.yaml was written under the old name (it resumes instead of being refused)."""
    import yaml

    from retain.config import parse_experiment
    from retain.rollout.hf import KVCacheSamplerEngine
    from retain.rundir import prepare_run_dir

    assert type(make_engine("cached", micro_model, tokenizer)) is KVCacheSamplerEngine
    old = {"name": "old", "model": "base", "stages": [{"task": "arith", "steps": 1}], "engine": "cached"}
    cfg = parse_experiment(old)
    assert cfg.engine == "kv_cache" and cfg == parse_experiment({**old, "engine": "kv_cache"})
    written = {**cfg.model_dump(mode="json"), "engine": "cached"}  # what a run before the rename wrote
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=True))
    assert prepare_run_dir(cfg, tmp_path) == 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**written, "engine": "hf"}, sort_keys=True))
    with pytest.raises(RetainError, match="different config"):
        prepare_run_dir(cfg, tmp_path)
    with pytest.raises(RetainError, match="unknown rollout engine 'nope'"):
        make_engine("nope", micro_model, tokenizer)
