"""retain.losses: SPEC §2.1 worked values, hand-worked values, clamping, and agreement with TRL 1.16's real code.

The TRL comparisons call TRL itself wherever it can run on CPU:
  * advantages — ``GRPOTrainer._generate_and_score_completions`` on a tiny random Qwen2 (real generation, a reward
    function that returns chosen rewards, ``None`` included), for scale_rewards group / batch / none;
  * the per-token GRPO loss with clipping, ρ ≠ 1 and β > 0, and each ``loss_type`` (grpo, bnpo, dr_grpo, dapo) —
    ``GRPOTrainer._compute_loss`` on hand-built inputs; values, parameter gradients and the logged clip / KL metrics;
  * the SFT loss (nll, and dft for the weights-over-token-count convention) — ``SFTTrainer.compute_loss``;
  * ``selective_log_softmax``, ``entropy_from_logits``, ``nanstd`` — the helpers themselves.
Nothing is a transcription of TRL: every TRL number below comes from TRL's own code.
"""

from __future__ import annotations

import importlib.util
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retain.losses import (
    aggregate,
    confident_conflict_mask,
    dft_weights,
    distill_kl,
    eaft_weights,
    linear_weight,
    proximal_sft_loss,
    grpo_token_loss,
    group_advantages,
    kl_estimate,
    sft_loss,
    token_entropy,
    token_logprobs,
    topk_entropy,
)

ATOL = 1e-6
HAS_TRL = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(not HAS_TRL, reason="trl (the test extra, 1.16.*) is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notes inside TRL


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# (1) SPEC §2.1 worked values
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logp", "ref", "expected"),
    [(-1.0, -1.5, 0.106531), (-2.0, -1.0, 0.718282), (-0.5, -3.0, 1.582085)],
)
def test_k3_worked_values(logp, ref, expected):
    got = kl_estimate(t(logp), t(ref), kind="k3")
    assert got.item() == pytest.approx(expected, abs=ATOL)
    assert kl_estimate(t(logp), t(ref), kind="k3", clamp=False).item() == pytest.approx(expected, abs=ATOL)


def test_k1_k2_by_hand():
    # x = ref - logp = -0.5
    assert kl_estimate(t(-1.0), t(-1.5), kind="k1").item() == pytest.approx(0.5, abs=ATOL)
    assert kl_estimate(t(-1.0), t(-1.5), kind="k2").item() == pytest.approx(0.125, abs=ATOL)
    with pytest.raises(ValueError):
        kl_estimate(t(-1.0), t(-1.5), kind="k4")


@pytest.mark.parametrize(
    ("logp", "old", "ref", "adv", "expected", "kl"),
    [
        (-1.0, -1.3, -1.2, +1.0, -1.199251, 0.018731),
        (-1.0, -1.3, -1.2, -1.0, 1.350608, 0.018731),
        (-2.0, -1.5, -2.1, -1.0, 0.800193, math.exp(-0.1) + 0.1 - 1),
    ],
)
def test_grpo_worked_values(logp, old, ref, adv, expected, kl):
    loss, stats = grpo_token_loss(
        t(logp).view(1, 1), t(old).view(1, 1), t(adv), t(ref).view(1, 1), beta=0.04, eps_low=0.2, eps_high=0.2
    )
    assert loss.item() == pytest.approx(expected, abs=ATOL)
    assert stats["kl_mean"] == pytest.approx(kl, abs=ATOL)
    # policy term alone
    policy, _ = grpo_token_loss(t(logp).view(1, 1), t(old).view(1, 1), t(adv))
    assert policy.item() == pytest.approx(expected - 0.04 * kl, abs=ATOL)


def test_grpo_worked_policy_term_is_clipped():
    _, stats = grpo_token_loss(t(-1.0).view(1, 1), t(-1.3).view(1, 1), t(1.0))
    assert stats["clip_fraction"] == 1.0 and stats["clip_high_fraction"] == 1.0  # ρ = e^0.3 = 1.35 > 1.2, A > 0
    _, stats = grpo_token_loss(t(-1.0).view(1, 1), t(-1.3).view(1, 1), t(-1.0))
    assert stats["clip_fraction"] == 0.0  # A < 0: the unclipped term is the min, the clip is inactive
    _, stats = grpo_token_loss(t(-2.0).view(1, 1), t(-1.5).view(1, 1), t(-1.0))
    assert stats["clip_low_fraction"] == 1.0  # ρ = e^-0.5 = 0.61 < 0.8, A < 0


@pytest.mark.parametrize(("eps", "expected"), [(1e-4, 0.865875), (1e-6, 0.866024)])
def test_advantage_worked_values(eps, expected):
    adv = group_advantages(t(1, 0, 0, 1), group_size=4, eps=eps)
    assert adv.dtype == torch.float32
    assert torch.allclose(adv, t(expected, -expected, -expected, expected), atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# (2) hand-worked values
# ---------------------------------------------------------------------------------------------------------------


def test_advantages_by_hand():
    # Two groups of 2: [1, 0] and a constant [3, 3].
    r = t(1, 0, 3, 3)
    a_group = group_advantages(r, 2, "group", eps=1e-4)
    s = math.sqrt(0.5)  # Bessel: ((0.5² + 0.5²) / 1) ** 0.5
    assert torch.allclose(a_group, t(0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0, 0), atol=ATOL)
    # batch: the group mean is subtracted, the std is over all 4 rewards: mean 1.75, Σdev² = 6.75, /3 → std 1.5
    a_batch = group_advantages(r, 2, "batch", eps=1e-4)
    assert torch.allclose(a_batch, t(0.5 / 1.5001, -0.5 / 1.5001, 0, 0), atol=ATOL)
    assert torch.equal(group_advantages(r, 2, "none"), t(0.5, -0.5, 0, 0))
    # NaN / None rewards are left out of mean and std and get 0
    a = group_advantages([1.0, None, 0.0, 1.0], 4, eps=0.0)
    m, sd = 2 / 3, math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
    assert torch.allclose(a, t((1 - m) / sd, 0, -m / sd, (1 - m) / sd), atol=ATOL)
    # a group with one scorable reward, and group_size 1, give 0 (std undefined)
    assert torch.equal(group_advantages([None, 2.0, None], 3), t(0, 0, 0))
    assert torch.equal(group_advantages(t(1, 2, 3), 1), t(0, 0, 0))
    # constant groups give exactly 0 in every mode, whatever the rounding of the mean
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(t(0.1, 0.1, 0.1, 0.7, 0.7, 0.7), 3, scale), torch.zeros(6))
    with pytest.raises(ValueError):
        group_advantages(t(1, 2, 3), 2)


def test_aggregate_by_hand():
    x = t(1, 2, 3, 4, 5, 6, 0, 0).view(2, 4)
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert aggregate(x, m, "grpo").item() == pytest.approx((2 + 5) / 2, abs=ATOL)  # seq means 2 and 5
    assert aggregate(x, m, "bnpo").item() == pytest.approx(11 / 4, abs=ATOL)
    assert aggregate(x, m, "dr_grpo", max_completion_length=5).item() == pytest.approx(11 / 10, abs=ATOL)
    assert aggregate(x, m, "dapo").item() == pytest.approx(11 / 4, abs=ATOL)
    assert aggregate(x, m, "dapo", num_items=22).item() == pytest.approx(0.5, abs=ATOL)
    with pytest.raises(ValueError):
        aggregate(x, m, "dr_grpo")
    # a sequence with no tokens (holding NaN / inf) gives no NaN and counts in the B of grpo
    y = torch.tensor([[1.0, 2.0], [math.nan, math.inf]])
    mm = torch.tensor([[1, 1], [0, 0]])
    assert aggregate(y, mm, "grpo").item() == pytest.approx(0.75, abs=ATOL)
    for mode in ("bnpo", "dapo"):
        assert aggregate(y, mm, mode).item() == pytest.approx(1.5, abs=ATOL)
    for mode in ("grpo", "bnpo", "dapo"):
        assert aggregate(y, torch.zeros_like(mm), mode).item() == 0.0
    assert aggregate(y, torch.zeros_like(mm), "dr_grpo", max_completion_length=4).item() == 0.0


def test_token_logprobs_and_sft_by_hand():
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # p = [.75, .25], [.5, .5]
    targets = torch.tensor([[0, 1]])
    lp = token_logprobs(logits, targets)
    assert torch.allclose(lp, t(math.log(0.75), math.log(0.5)).view(1, 2), atol=ATOL)
    # temperature 2: logits/2 → p0 = √3 / (√3 + 1)
    lp2 = token_logprobs(logits, targets, temperature=2.0)
    assert lp2[0, 0].item() == pytest.approx(math.log(math.sqrt(3) / (math.sqrt(3) + 1)), abs=ATOL)
    mask = torch.tensor([[1, 1]])
    nll = (-math.log(0.75) - math.log(0.5)) / 2
    assert sft_loss(lp, mask).item() == pytest.approx(nll, abs=ATOL)
    assert sft_loss(logits, mask, targets=targets).item() == pytest.approx(nll, abs=ATOL)
    # weights: divided by the token count (2), not the weight sum (0.5)
    w = t(0.5, 0.0).view(1, 2)
    assert sft_loss(lp, mask, w).item() == pytest.approx(0.5 * -math.log(0.75) / 2, abs=ATOL)
    assert sft_loss(lp, mask, num_items=4).item() == pytest.approx(nll / 2, abs=ATOL)
    assert sft_loss(lp, torch.zeros_like(mask)).item() == 0.0
    # bf16 logits go through the row-at-a-time path and come back float32
    out = token_logprobs(logits.to(torch.bfloat16).expand(3, 2, 2), targets.expand(3, 2))
    assert out.dtype == torch.float32 and out.shape == (3, 2)


def test_entropy_by_hand():
    assert token_entropy(torch.zeros(7)).item() == pytest.approx(math.log(7), abs=ATOL)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.562335
    assert token_entropy(t(math.log(3.0), 0.0)).item() == pytest.approx(h, abs=ATOL)
    assert token_entropy(t(100.0, 0.0, 0.0)).item() == pytest.approx(0.0, abs=ATOL)
    # -inf logits: value and gradient finite
    z = torch.tensor([0.0, 0.0, -math.inf], requires_grad=True)
    hz = token_entropy(z)
    hz.backward()
    assert hz.item() == pytest.approx(math.log(2), abs=ATOL)
    assert torch.isfinite(z.grad).all()
    # top-K entropy: only the K largest logits, renormalised
    logits = torch.tensor([math.log(3.0), 0.0, -1.0, -2.0])
    assert topk_entropy(logits, k=2).item() == pytest.approx(h, abs=ATOL)
    assert topk_entropy(logits, k=100).item() == pytest.approx(token_entropy(logits).item(), abs=ATOL)


def test_eaft_weights_by_hand():
    # uniform over the top 20 (and much lower elsewhere) → weight 1
    logits = torch.cat([torch.full((20,), 3.0), torch.full((30,), -5.0)])
    assert eaft_weights(logits).item() == pytest.approx(1.0, abs=ATOL)
    # one-hot → 0
    assert eaft_weights(torch.tensor([100.0] + [0.0] * 49)).item() == pytest.approx(0.0, abs=ATOL)
    # K = 2, p = [.75, .25]: H / ln 2 = 0.811278; alpha = 2 squares it
    two = torch.tensor([math.log(3.0), 0.0, -3.0])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert eaft_weights(two, k=2).item() == pytest.approx(h / math.log(2), abs=ATOL)
    assert eaft_weights(two, k=2, alpha=2.0).item() == pytest.approx((h / math.log(2)) ** 2, abs=ATOL)
    # K larger than the vocabulary: K = V, so uniform still gives 1
    assert eaft_weights(torch.zeros(5), k=20).item() == pytest.approx(1.0, abs=ATOL)
    # detached
    z = torch.randn(2, 3, 50, requires_grad=True)
    w = eaft_weights(z)
    assert w.shape == (2, 3) and not w.requires_grad and ((w >= 0) & (w <= 1)).all()
    with pytest.raises(ValueError):
        eaft_weights(z, k=1)


def test_eaft_loss_composes_with_sft_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 30, requires_grad=True)
    targets = torch.randint(0, 30, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = eaft_weights(logits)
    loss = sft_loss(logits, mask, w, targets=targets)
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    expected = (w * -lp * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=ATOL)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_confident_conflict_mask_by_hand():
    logits = torch.tensor([[[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    # row 0/1: p = [.9867, .0066, .0066], H = 0.0799 (confident); row 2: uniform, H = ln 3; row 3: H = 1.04
    targets = torch.tensor([[1, 0, 1, 1]])
    got = confident_conflict_mask(logits, targets)
    assert got.tolist() == [[True, False, False, False]]
    # thresholds are parameters: a loose entropy threshold and p < 0.34 flags the uniform row too
    assert confident_conflict_mask(logits, targets, entropy_max=2.0, prob_max=0.34).tolist() == [
        [True, False, True, True]
    ]
    assert got.dtype == torch.bool


def test_distill_kl_by_hand():
    student = torch.tensor([[[0.0, 0.0]]])  # q = [.5, .5]
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])  # p = [.75, .25]
    mask = torch.ones(1, 1, dtype=torch.bool)
    fwd = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p‖q) = 0.130812
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(q‖p) = 0.143841
    assert distill_kl(student, teacher, mask, "forward").item() == pytest.approx(fwd, abs=ATOL)
    assert distill_kl(student, teacher, mask, "reverse").item() == pytest.approx(rev, abs=ATOL)
    # temperature 2 on both: p = [√3, 1] / (√3 + 1), q uniform
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    fwd2 = p0 * math.log(p0 / 0.5) + (1 - p0) * math.log((1 - p0) / 0.5)
    assert distill_kl(student, teacher, mask, "forward", temperature=2.0).item() == pytest.approx(fwd2, abs=ATOL)
    # identical → 0; masked → 0; a -inf teacher logit (zero mass) is fine
    torch.manual_seed(0)
    z = torch.randn(2, 3, 11)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert distill_kl(z, z, m).abs().max().item() < ATOL
    kl = distill_kl(torch.randn(2, 3, 11), z, m)
    assert (kl[~m.bool()] == 0).all() and (kl[m.bool()] > 0).all()
    tz = torch.tensor([[[0.0, -math.inf]]])
    assert distill_kl(student, tz, mask).item() == pytest.approx(math.log(2), abs=ATOL)
    # against torch's own kl_div on random logits, and gradient reaches the student only
    s = torch.randn(2, 3, 11, requires_grad=True)
    te = torch.randn(2, 3, 11, requires_grad=True)
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), te.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(distill_kl(s, te, torch.ones(2, 3)), ref, atol=ATOL)
    aggregate(distill_kl(s, te, m, "reverse"), m, "bnpo").backward()
    assert s.grad is not None and te.grad is None


# ---------------------------------------------------------------------------------------------------------------
# (3) clamping and finiteness
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gap", [1000.0, -1000.0, 50.0, -50.0])
def test_kl_clamp_extreme_gaps(gap):
    logp = torch.tensor([0.0, -3.0], requires_grad=True)
    ref = (logp.detach() + gap).requires_grad_(True)
    for kind in ("k1", "k2", "k3"):
        k = kl_estimate(logp, ref, kind=kind)
        assert torch.isfinite(k).all()
        k.sum().backward()
        assert torch.isfinite(logp.grad).all() and torch.isfinite(ref.grad).all()
        logp.grad = ref.grad = None
    k3 = kl_estimate(logp, ref)
    assert ((k3 >= 0) & (k3 <= 10)).all()
    # the full GRPO loss too, with an extreme importance ratio
    loss, stats = grpo_token_loss(
        logp.view(1, 2), (logp.detach() - gap).view(1, 2), t(1.0), ref.detach().view(1, 2), beta=0.1
    )
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in stats.values())


def test_unclamped_k3_overflows_like_trl():
    # TRL's unclamped exp(x) - x - 1 overflows for large gaps (trl#3015); clamp=False reproduces it on purpose.
    assert torch.isinf(kl_estimate(t(0.0), t(1000.0), clamp=False)).all()
    assert kl_estimate(t(0.0), t(1000.0)).item() == 10.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=8),
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=8),
)
def test_kl_always_finite(a, b):
    n = min(len(a), len(b))
    for kind in ("k1", "k2", "k3"):
        k = kl_estimate(torch.tensor(a[:n]), torch.tensor(b[:n]), kind=kind)
        assert torch.isfinite(k).all()
        if kind != "k1":
            assert (k >= 0).all()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])), min_size=1, max_size=4),
    st.integers(1, 4),
)
def test_advantages_properties(group, n_groups):
    rewards = group * n_groups
    for scale in ("group", "batch", "none"):
        a = group_advantages(rewards, len(group), scale)
        assert torch.isfinite(a).all()
        assert all(a[i] == 0 for i, r in enumerate(rewards) if r is None)
        # advantages of a group sum to 0 over its scorable members
        assert abs(a.view(n_groups, -1).sum(1)).max().item() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# (4) against TRL 1.16's real code
# ---------------------------------------------------------------------------------------------------------------

MAX_COMPLETION = 8
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 (hidden 32, 2 layers, the character tokenizer's ~100-token vocabulary), saved with its
    tokenizer so TRL loads policy and reference from the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from retain.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(1234)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # larger weights → peakier, more varied distributions than the 0.02-std init
        model.lm_head.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _grpo_trainer(model_dir, out_dir, **overrides):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from retain.models.tokenizer import build_tokenizer

    def reward_from_column(completions, reward, **kwargs):
        return reward  # the dataset column: lets the test choose every reward, None included

    kwargs = dict(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE,
        beta=0.0,
    )
    kwargs.update(overrides)
    ds = Dataset.from_list([{"prompt": "ab", "reward": 1.0}, {"prompt": "cd", "reward": 0.0}])
    return GRPOTrainer(
        model=model_dir,
        reward_funcs=reward_from_column,
        args=GRPOConfig(**kwargs),
        train_dataset=ds,
        processing_class=build_tokenizer(),
    )


# Three groups of 4: mixed with a None, constant, one scorable + three None; a fourth with two None.
TRL_REWARDS = [1.0, 0.0, None, 0.5, 2.0, 2.0, 2.0, 2.0, None, None, 3.0, None, -1.0, None, 0.25, None]


@needs_trl
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(tiny_model_dir, tmp_path, scale):
    """TRL's advantages come out of its real rollout step (`_generate_and_score_completions`: generation with the
    tiny model, reward function, None → NaN, nanmean/nanstd scaling, NaN → 0)."""
    tr = _grpo_trainer(tiny_model_dir, tmp_path, scale_rewards=scale, per_device_train_batch_size=16)
    prompts = ["ab", "cd", "ef", "gh"]
    inputs = [{"prompt": prompts[i // 4], "reward": r} for i, r in enumerate(TRL_REWARDS)]
    with torch.no_grad():
        theirs = tr._generate_and_score_completions(inputs)["advantages"]
    ours = group_advantages(TRL_REWARDS, 4, scale=scale, eps=1e-4)
    assert (theirs - ours).abs().max().item() < ATOL
    assert ours[[2, 8, 9, 11, 13, 15]].eq(0).all()  # unscorable → 0
    assert ours[4:8].eq(0).all() and ours[10].item() == 0  # constant group, single scorable reward


@needs_trl
def test_advantage_std_matches_trl_nanstd():
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    r = torch.randn(6, 5)
    r[0, 1] = r[3, 0] = r[3, 4] = math.nan
    a = group_advantages(r.reshape(-1), 5, "group", eps=0.0).view(6, 5)
    expected = (r - torch.nanmean(r, 1, keepdim=True)) / nanstd(r, dim=1, keepdim=True)
    expected = torch.nan_to_num(expected, nan=0.0)
    assert (a - expected).abs().max().item() < ATOL


def _hand_inputs(tr, seed=0):
    """A hand-built batch of 4 sequences: left-padded prompts, right-padded completions of lengths 8, 5, 2, 0."""
    g = torch.Generator().manual_seed(seed)
    vocab = tr.model.config.vocab_size
    prompt_ids = torch.randint(6, vocab, (4, 5), generator=g)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[3, :1] = 0
    prompt_ids[prompt_mask == 0] = tr.processing_class.pad_token_id
    completion_ids = torch.randint(6, vocab, (4, MAX_COMPLETION - 1), generator=g)  # padded T < configured max
    completion_ids = torch.cat([completion_ids, completion_ids[:, :1]], 1)
    lengths = torch.tensor([8, 5, 2, 0])
    completion_mask = (torch.arange(MAX_COMPLETION)[None] < lengths[:, None]).long()
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _our_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits  # the unpatched (non-fused) forward
    p = prompt_ids.size(1)
    return token_logprobs(logits[:, p - 1 : -1], completion_ids, temperature=TEMPERATURE)


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _assert_grads_close(theirs, ours):
    """Same parameters got gradients, equal to 1e-6 relative to the largest gradient entry (float32 accumulation
    through the model's backward; the loss values themselves agree to 1e-6 absolute)."""
    assert len(theirs) == len(ours) > 0
    scale = max(1.0, max(g.abs().max().item() for g in theirs))
    assert max((a - b).abs().max().item() for a, b in zip(theirs, ours, strict=True)) <= ATOL * scale


@needs_trl
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train_ga2"])
def test_grpo_loss_matches_trl(tiny_model_dir, tmp_path, loss_type, train_mode):
    """TRL's `_compute_loss` (KL on with use_bias_correction_kl=False, asymmetric clip, ρ ≠ 1, sampling temperature)
    against grpo_token_loss + aggregate on the same model's logits: loss value, parameter gradients, and TRL's logged
    clip-region fraction and mean KL. In train mode with gradient_accumulation_steps=2, TRL divides grpo/bnpo/dr_grpo by
    2 inside the loss, and dapo by num_items_in_batch·GA/steps_per_generation (= num_items_in_batch here)."""
    beta, eps_low, eps_high, ga = 0.04, 0.2, 0.28, 2
    tr = _grpo_trainer(
        tiny_model_dir,
        tmp_path,
        loss_type=loss_type,
        beta=beta,
        epsilon=eps_low,
        epsilon_high=eps_high,
        use_bias_correction_kl=False,
        gradient_accumulation_steps=ga,
    )
    model = tr.model
    model.train(train_mode)
    tr.current_gradient_accumulation_steps = ga  # set by Trainer's training loop, which we do not run
    prompt_ids, prompt_mask, completion_ids, completion_mask = _hand_inputs(tr)

    with torch.no_grad():
        base = _our_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    g = torch.Generator().manual_seed(1)
    # ρ ≠ 1 with clipping on both sides: log ρ = −offset, beyond ln 1.28 and ln 0.8 for some tokens of every row
    pattern = torch.tensor([0.5, -0.5, 0.1, -0.3, 0.35, 0.05, -0.4, 0.2])
    offsets = torch.stack([pattern.roll(i) for i in range(base.size(0))])
    old = base + offsets + 0.05 * torch.randn(base.shape, generator=g)
    ref = base + 0.5 * torch.randn(base.shape, generator=g)
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1])
    num_items = torch.tensor(float(completion_mask.sum() * 3))  # the generation batch spans other micro-batches

    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": num_items,
    }
    model.zero_grad()
    theirs = tr._compute_loss(model, inputs)
    theirs.backward()
    their_grads = _grads(model)
    mode = "train" if train_mode else "eval"
    their_clip = tr._metrics[mode]["clip_ratio/region_mean"][-1]
    their_kl = tr._metrics[mode]["kl"][-1]

    model.zero_grad()
    logp = _our_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    per_token, stats = grpo_token_loss(
        logp, old, advantages, ref, beta=beta, eps_low=eps_low, eps_high=eps_high, mask=completion_mask
    )
    ours = aggregate(per_token, completion_mask, loss_type, max_completion_length=MAX_COMPLETION, num_items=num_items)
    if train_mode and loss_type != "dapo":
        ours = ours / ga  # TRL's in-loss gradient-accumulation division
    ours.backward()
    our_grads = _grads(model)

    assert 0 < stats["clip_low_fraction"] and 0 < stats["clip_high_fraction"]  # both clip sides exercised
    assert abs(theirs.item() - ours.item()) < ATOL
    _assert_grads_close(their_grads, our_grads)
    assert stats["clip_fraction"] == pytest.approx(their_clip, abs=ATOL)
    assert stats["kl_mean"] == pytest.approx(their_kl, abs=ATOL)


@needs_trl
def test_grpo_loss_trl_bias_corrected_kl(tiny_model_dir, tmp_path):
    """TRL's default use_bias_correction_kl=True multiplies KL_t by ρ_t. retain does not; the TRL number is
    reproduced by composing retain's pieces: policy term + β·ρ·k3."""
    beta = 0.1
    tr = _grpo_trainer(tiny_model_dir, tmp_path, loss_type="bnpo", beta=beta)
    assert tr.args.use_bias_correction_kl
    prompt_ids, prompt_mask, completion_ids, completion_mask = _hand_inputs(tr, seed=3)
    with torch.no_grad():
        logp = _our_logps(tr.model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        old = logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(4))
        ref = logp - 0.5
        adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
        inputs = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": adv,
            "old_per_token_logps": old,
            "ref_per_token_logps": ref,
        }
        theirs = tr._compute_loss(tr.model, inputs).item()
        policy, _ = grpo_token_loss(logp, old, adv)
        ratio = torch.exp(logp - old)
        composed = aggregate(policy + beta * ratio * kl_estimate(logp, ref), completion_mask, "bnpo").item()
        retain_value = aggregate(grpo_token_loss(logp, old, adv, ref, beta=beta)[0], completion_mask, "bnpo").item()
    assert abs(theirs - composed) < ATOL
    assert abs(theirs - retain_value) > 1e-4  # the conventions really differ off-policy


@needs_trl
def test_token_logprobs_and_entropy_match_trl_helpers():
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    torch.manual_seed(0)
    logits = 4 * torch.randn(3, 7, 101)
    idx = torch.randint(0, 101, (3, 7))
    for temp in (1.0, 0.7):
        assert (token_logprobs(logits, idx, temp) - selective_log_softmax(logits, idx, temp)).abs().max() < ATOL
    assert (token_entropy(logits) - entropy_from_logits(logits)).abs().max() < ATOL
    bf = logits.to(torch.bfloat16)
    assert (token_logprobs(bf, idx) - selective_log_softmax(bf, idx).float()).abs().max() < 0.1  # TRL returns bf16
    assert (token_logprobs(bf, idx) - token_logprobs(bf.float(), idx)).abs().max() < ATOL


def _sft_trainer(model_dir, out_dir, loss_type):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from retain.models.tokenizer import build_tokenizer

    args = SFTConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, report_to=[], save_strategy="no", loss_type=loss_type
    )
    return SFTTrainer(
        model=model_dir,
        args=args,
        train_dataset=Dataset.from_list([{"text": "hello"}]),
        processing_class=build_tokenizer(),
    )


@needs_trl
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("num_items", [None, 40])
def test_sft_loss_matches_trl(tiny_model_dir, tmp_path, loss_type, num_items):
    """SFTTrainer.compute_loss: Σ −log p over label tokens / token count (or num_items_in_batch); dft weights each
    token by p.detach() and still divides by the token count — retain's sft_loss with weights=p.detach()."""
    tr = _sft_trainer(tiny_model_dir, tmp_path, loss_type)
    model = tr.model
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(6, model.config.vocab_size, (3, 10), generator=g)
    attention = torch.ones_like(input_ids)
    attention[2, 7:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[attention == 0] = -100
    inputs = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    model.zero_grad()
    theirs = tr.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
    theirs.backward()
    their_grads = _grads(model)

    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    targets, mask = labels[:, 1:], labels[:, 1:] != -100
    logp = token_logprobs(logits[:, :-1], targets)
    weights = dft_weights(logits[:, :-1], targets) if loss_type == "dft" else None
    ours = sft_loss(logp, mask, weights, num_items=num_items)
    ours.backward()
    our_grads = _grads(model)

    assert abs(theirs.item() - ours.item()) < ATOL
    _assert_grads_close(their_grads, our_grads)


# ---------------------------------------------------------------------------------------------------------------
# (5) later methods: DFT, PSFT, CHORD's schedule, SDFT / on-policy distillation divergences
# ---------------------------------------------------------------------------------------------------------------


def test_dft_weight_and_loss_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], requires_grad=True)  # p(target 0) = 0.5, 0.75
    targets = torch.tensor([[0, 0]])
    w = dft_weights(logits, targets)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.75]]))
    assert not w.requires_grad
    mask = torch.tensor([[True, True]])
    loss = sft_loss(logits, mask, w, targets=targets)
    # (0.5·ln 2 + 0.75·ln(4/3)) / 2 tokens — the token count, not the weight sum 1.25
    assert loss.item() == pytest.approx((0.5 * math.log(2) + 0.75 * math.log(4 / 3)) / 2, abs=1e-6)
    assert sft_loss(logits[:, :1], mask[:, :1], w[:, :1], targets=targets[:, :1]).item() == pytest.approx(0.346574,
                                                                                                          abs=1e-6)


def test_proximal_sft_loss_worked_values_and_gradient():
    logp = torch.tensor([[-1.0, -1.5]], requires_grad=True)
    old = torch.tensor([[-1.3, -1.3]])
    mask = torch.tensor([[True, True]])
    loss = proximal_sft_loss(logp, old, mask, eps=0.2)
    # token 1: ρ = e^0.3 = 1.349859 > 1.2 → −1.2, clipped; token 2: ρ = e^−0.2 = 0.818731 → −0.818731
    assert loss.item() == pytest.approx((-1.2 - 0.818731) / 2, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.818731 / 2]]), atol=1e-6, rtol=0)
    # on the pre-update policy itself (ρ = 1) it is SFT: value −1 per token, gradient −1/N per token of log π
    lp = torch.tensor([[-0.7, -2.0, -0.1]], requires_grad=True)
    m = torch.tensor([[True, False, True]])
    v = proximal_sft_loss(lp, lp.detach(), m, num_items=4)
    v.backward()
    assert v.item() == pytest.approx(-2 / 4)
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.25, 0.0, -0.25]]))


def test_linear_weight_schedule_by_hand():
    assert [round(linear_weight(s, 5, 0.9, 0.1), 6) for s in range(5)] == [0.9, 0.7, 0.5, 0.3, 0.1]
    assert linear_weight(3, 5, 0.4) == 0.4  # fixed
    assert linear_weight(99, 5, 0.9, 0.1) == pytest.approx(0.1)  # past the end it stays at the end


def test_distill_kl_directions_by_hand():
    student = torch.log(torch.tensor([[[0.5, 0.5]]]))
    teacher = torch.log(torch.tensor([[[0.9, 0.1]]]))
    mask = torch.tensor([[True]])
    # reverse KL(S ‖ T) = 0.5·ln(0.5/0.9) + 0.5·ln(0.5/0.1) = 0.510826; forward KL(T ‖ S) = 0.9·ln 1.8 + 0.1·ln 0.2
    assert distill_kl(student, teacher, mask, "reverse").item() == pytest.approx(0.510826, abs=1e-6)
    assert distill_kl(student, teacher, mask, "forward").item() == pytest.approx(0.368064, abs=1e-6)


@needs_trl
@pytest.mark.parametrize("direction, alpha", [("forward", 0.0), ("reverse", 1.0)])
def test_distill_kl_matches_trl_sdft_full_logit_divergence(direction, alpha):
    """TRL's SDFT (trl.experimental.sdft) full-logit divergence: alpha 0 is KL(teacher ‖ student), alpha 1 is
    KL(student ‖ teacher) — retain's distill_kl directions, value and student gradient."""
    sdft = pytest.importorskip("trl.experimental.sdft.loss_utils")
    g = torch.Generator().manual_seed(3)
    student = (torch.randn(2, 5, 11, generator=g) * 3).requires_grad_(True)
    teacher = torch.randn(2, 5, 11, generator=g) * 3
    mask = torch.ones(2, 5, dtype=torch.bool)
    theirs = sdft.compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=alpha)
    (their_grad,) = torch.autograd.grad(theirs.sum(), student)
    ours = distill_kl(student, teacher, mask, direction)
    (our_grad,) = torch.autograd.grad(ours.sum(), student)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(our_grad, their_grad, atol=ATOL, rtol=1e-5)
