"""Token analysis: per-token entropy and p(target) along the answers, and the conflict share at stated thresholds."""

import numpy as np
from retain.analysis.tokens import token_stats
from retain.logprobs import answer_logprobs

PAIRS = [("reverse abc", "cba"), ("3+4=", "7"), ("city of ava?", "rome")]


def test_one_entry_per_answer_token_with_positions(micro_model, tokenizer):
    stats = token_stats(micro_model, tokenizer, PAIRS, batch_size=2)  # batches cross pairs
    assert len(stats.entropy) == 4 + 2 + 5  # answer characters + eos
    assert stats.example.tolist() == [0] * 4 + [1] * 2 + [2] * 5
    assert stats.position.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4]
    assert stats.token[-1] == tokenizer.eos_token_id
    # p(target) agrees with retain.logprobs' log-probabilities
    logp = np.concatenate([np.array(r) for r in answer_logprobs(micro_model, tokenizer, PAIRS)])
    assert np.allclose(np.log(stats.prob), logp, atol=1e-5)
    assert (stats.entropy >= 0).all() and (stats.entropy <= np.log(len(tokenizer)) + 1e-4).all()


def test_conflict_share_follows_the_thresholds(micro_model, tokenizer):
    # make the model certain of one token ('z'): low entropy everywhere, targets other than 'z' get p ≈ 0
    z = tokenizer.convert_tokens_to_ids("z")
    def certain_of_z(module, inputs, logits):
        logits = logits.clone()
        logits[..., z] += 100.0
        return logits

    micro_model.lm_head.register_forward_hook(certain_of_z)
    stats = token_stats(micro_model, tokenizer, PAIRS)
    summary = stats.summary(entropy_max=0.5, prob_max=0.1)
    assert summary["conflict_share"] == 1.0 and summary["entropy_max"] == 0.5
    assert stats.summary(entropy_max=0.0)["conflict_share"] == 0.0  # strict: H < 0 never holds
    assert len(stats.to_rows()) == summary["tokens"]
