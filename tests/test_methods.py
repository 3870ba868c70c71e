"""Methods (SPEC §2): the SFT objective and its token weightings, regularisers, GRPO's objective, data sources, and
``train_stage`` end to end on the micro model. Expected numbers are computed here directly with torch (log-softmax,
autograd), not with the functions under test."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

import retain.tasks as task_registry
from retain.data import IGNORE, collate, encode_answer, encode_prompt
from retain.errors import RetainError
from retain.models import adapters
from retain.methods.build import train_stage
from retain.models.adapters import frozen_copy
from retain.methods.config import method_config
from retain.methods.grpo import GRPOObjective
from retain.methods.regularizers import EWC, L2SP, Distillation, KLToReference, update_fisher
from retain.methods.sft import SFTObjective, conflict_masking, eaft_weighting
from retain.methods.sources import (
    FixedPairs, MultiTaskPairs, WithReplay, build_source, reference_pairs, sample_correct,
)
from retain.methods.stage import MethodState, StageContext
from retain.rollout import make_engine
from retain.tasks import Example, Task

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")

# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

PAIRS = [
    ("reverse abc", "cba"), ("reverse hello", "olleh"), ("add 2 3", "5"), ("copy xy", "xy"), ("say", "hello world"),
]
N_PAIRS_TOKENS = sum(len(a) + 1 for _, a in PAIRS)  # character tokenizer: one token a character, plus eos = 27


class StubTask(Task):
    """``n`` prompts, each with several correct answers; ``reward_fn(prompt, completion)`` decides the reward."""

    splits = ("train", "test")

    def __init__(self, name="stub", n=6, reward_fn=None, max_new_tokens=4):
        self.name, self.n, self.max_new_tokens = name, n, max_new_tokens
        self.reward_fn = reward_fn or (lambda p, c: 1.0 if c == "" else 0.0)

    def examples(self, split, n=None, seed=0):
        out = [
            Example(prompt=f"{self.name} q{i}", answer=f"{i}a", answers=(f"{i}a", f"x{i}", f"{i}bc", "zz"))
            for i in range(self.n)
        ]
        return out if n is None else out[:n]

    def reward(self, prompt, completion, answer=None):
        return float(self.reward_fn(prompt, completion))


def varied_reward(prompt, completion):
    """Rewards in {0, 0.5, 1} from the first character: groups of a random model are rarely flat."""
    return (ord(completion[0]) % 3) / 2 if completion else 0.0


@pytest.fixture()
def registry(monkeypatch):
    """Tasks registered by name for the duration of a test (``reference_pairs`` and ``train_stage`` look tasks up)."""
    table: dict[str, Task] = {}
    original = task_registry.get
    monkeypatch.setattr(task_registry, "get", lambda name: table[name] if name in table else original(name))
    return table


def bias_token(model, token_id, bias):
    """Add ``bias`` to one token's logit (a forward hook on the LM head), e.g. to make a random model stop early."""
    vec = torch.zeros(model.config.vocab_size)
    vec[token_id] = bias
    return model.lm_head.register_forward_hook(lambda module, inputs, output: output + vec.to(output.dtype))


def make_ctx(model, tokenizer, task, seed=0, reference=None, state=None, seen=()):
    return StageContext(
        model=model, reference=reference if reference is not None else frozen_copy(model), tokenizer=tokenizer,
        task_name=task.name, task=task, stage_index=len(seen), seen_tasks=list(seen), seed=seed,
        state=state if state is not None else MethodState(),
    )


def encoded(tokenizer, pairs=PAIRS):
    return [(encode_prompt(tokenizer, p), encode_answer(tokenizer, a)) for p, a in pairs]


def fixed_objective(tokenizer, micro=None, **kw):
    """An SFT objective whose every step is exactly PAIRS, in order."""
    enc = encoded(tokenizer)
    return SFTObjective(lambda rng, k, step: enc[:k], tokenizer.pad_token_id, len(enc), micro, **kw)


def direct_logp(model, batch):
    """(log p of each next token [B, T-1], answer-token mask, logits [B, T-1, V]) by plain log-softmax."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp, mask, logits


def grads(model):
    out = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def assert_close_scaled(a, b, rel=1e-4):
    """|a − b| ≤ rel × max|b| elementwise: for squared gradients, whose tiny entries carry no relative precision."""
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-30


def assert_grads_close(a, b, atol=1e-6, rtol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


def objective_loss_and_grads(objective, model, step=0):
    """Σ of the micro-batch losses of one step (each backpropagated, as the trainer does) and the summed grads."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for micro in objective.batches(step):
        loss, _ = objective.loss(model, micro)
        loss.backward()
        total += float(loss)
    return total, grads(model)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    after = dict(model.named_parameters())
    return any(not torch.equal(before[n], after[n].detach()) for n in before)


# ----------------------------------------------------------------------------------------------------------------
# 2. the SFT objective
# ----------------------------------------------------------------------------------------------------------------


def test_sft_loss_is_summed_nll_over_answer_tokens(micro_model, tokenizer):
    obj = fixed_objective(tokenizer)
    [batch] = obj.batches(0)
    assert batch.step_tokens == N_PAIRS_TOKENS == 27 and batch.first
    loss, metrics = obj.loss(micro_model, batch)
    with torch.no_grad():
        logp, mask, _ = direct_logp(micro_model, batch)
    assert int(mask.sum()) == 27
    # the answer tokens are exactly the answers' characters and eos
    for i, (_, a) in enumerate(PAIRS):
        assert batch.labels[i, 1:][mask[i]].tolist() == encode_answer(tokenizer, a)
    expected = float(-logp[mask].sum() / 27)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(math.log(len(tokenizer)), rel=0.05)  # a random model: ≈ ln V per token
    assert metrics["tokens"] == 27 and metrics["token_loss"] == pytest.approx(expected, rel=1e-6)


def test_sft_micro_batching_gives_the_same_loss_and_gradients(micro_model, tokenizer):
    full, full_grads = objective_loss_and_grads(fixed_objective(tokenizer), micro_model)
    micro_obj = fixed_objective(tokenizer, micro=2)
    chunks = micro_obj.batches(0)
    assert [len(c.input_ids) for c in chunks] == [2, 2, 1]
    assert [c.first for c in chunks] == [True, False, False]
    assert all(c.step_tokens == 27 for c in chunks)
    acc, acc_grads = objective_loss_and_grads(micro_obj, micro_model)
    assert acc == pytest.approx(full, rel=1e-6)
    assert_grads_close(acc_grads, full_grads)


def test_sft_batches_are_seeded_by_step(tokenizer):
    enc = encoded(tokenizer)
    obj = SFTObjective(lambda rng, k, step: [rng.choice(enc) for _ in range(k)], tokenizer.pad_token_id, 4, seed=3)
    a, b, c = obj.batches(5)[0], obj.batches(5)[0], obj.batches(6)[0]
    assert torch.equal(a.input_ids, b.input_ids)
    other = SFTObjective(lambda rng, k, step: [rng.choice(enc) for _ in range(k)], tokenizer.pad_token_id, 4, seed=4)
    ids = {tuple(x.input_ids.flatten().tolist()) for x in (a, c, other.batches(5)[0])}
    assert len(ids) == 3


def test_eaft_loss_is_nll_times_topk_entropy_weight(micro_model, tokenizer):
    k, alpha = 5, 2.0
    obj = fixed_objective(tokenizer, micro=3, weighting=eaft_weighting(k, alpha))
    total, got_grads = objective_loss_and_grads(obj, micro_model)
    # by hand: w = (H(softmax over the top-k logits) / ln k)^alpha, detached; loss = Σ w·(−log p) / N
    [batch] = fixed_objective(tokenizer).batches(0)
    logp, mask, logits = direct_logp(micro_model, batch)
    top = logits.detach().topk(k, dim=-1).values
    p = torch.softmax(top, -1)
    w = ((-(p * torch.log(p)).sum(-1)) / math.log(k)) ** alpha
    assert float(w[mask].min()) > 0.5 and float(w[mask].max()) <= 1.0  # near-uniform logits: weights near 1
    expected = (w * -logp)[mask].sum() / 27
    expected.backward()
    assert total == pytest.approx(float(expected), rel=1e-5)
    assert total < float(-logp[mask].sum() / 27)  # weighting lowers the loss, never renormalises
    assert_grads_close(got_grads, grads(micro_model))


def test_conflict_masking_drops_exactly_the_flagged_tokens(micro_model, tokenizer):
    [batch] = fixed_objective(tokenizer).batches(0)
    with torch.no_grad():
        logp, mask, logits = direct_logp(micro_model, batch)
        probs = torch.softmax(logits, -1)
        entropy = -(probs * torch.log(probs)).sum(-1)
    # a random model is never confident at the default 0.5 nats: pick thresholds between medians so ~1/4 are flagged
    def midpoint(values):
        s = values.sort().values
        i = len(s) // 2
        return float(s[i - 1] + s[i]) / 2

    h_max, p_max = midpoint(entropy[mask]), midpoint(logp.exp()[mask])
    flagged = (entropy < h_max) & (logp.exp() < p_max) & mask
    assert 0 < int(flagged.sum()) < 27

    from retain.losses import confident_conflict_mask

    assert torch.equal(confident_conflict_mask(logits, batch.labels[:, 1:], h_max, p_max) & mask, flagged)
    obj = fixed_objective(tokenizer, micro=2, weighting=conflict_masking(h_max, p_max))
    total, got_grads = objective_loss_and_grads(obj, micro_model)
    logp, _, _ = direct_logp(micro_model, batch)
    expected = -logp[mask & ~flagged].sum() / 27  # divided by every answer token, dropped ones included
    expected.backward()
    assert total == pytest.approx(float(expected), rel=1e-6)
    assert_grads_close(got_grads, grads(micro_model))
    _, metrics = fixed_objective(tokenizer, weighting=conflict_masking(h_max, p_max)).loss(micro_model, batch)
    assert metrics["kept_share"] == pytest.approx(1 - int(flagged.sum()) / 27)


# ----------------------------------------------------------------------------------------------------------------
# 3. regularisers
# ----------------------------------------------------------------------------------------------------------------


def nll_only(tokenizer, model, micro=None):
    obj = fixed_objective(tokenizer, micro)
    return [float(obj.loss(model, c)[0]) for c in obj.batches(0)]


def test_l2sp_penalty_by_hand_and_only_on_the_first_micro_batch(micro_model, tokenizer):
    reference = frozen_copy(micro_model)
    weight = 0.3
    with torch.no_grad():
        micro_model.model.norm.weight[3] += 0.5
        micro_model.model.layers[1].mlp.up_proj.weight[0, :4] -= torch.tensor([0.1, 0.2, 0.0, 0.3])
    expected = weight * (0.5**2 + 0.1**2 + 0.2**2 + 0.3**2)  # 0.3 × 0.39 = 0.117
    obj = fixed_objective(tokenizer, micro=2, regularizers=[L2SP(reference, weight)])
    base = nll_only(tokenizer, micro_model, micro=2)
    chunks = obj.batches(0)
    got = [obj.loss(micro_model, c) for c in chunks]
    assert float(got[0][0]) - base[0] == pytest.approx(expected, rel=1e-4)
    assert got[0][1]["l2sp"] == pytest.approx(0.39, rel=1e-4)
    for (loss, m), b in zip(got[1:], base[1:]):
        assert float(loss) == pytest.approx(b, rel=1e-6) and "l2sp" not in m
    # its gradient is 2λ(θ − θ_ref)
    micro_model.zero_grad()
    penalty, _ = L2SP(reference, weight).penalty(micro_model, chunks[0], torch.zeros(()), True)
    penalty.backward()
    assert float(micro_model.model.norm.weight.grad[3]) == pytest.approx(2 * weight * 0.5, rel=1e-4)
    assert float(micro_model.model.norm.weight.grad[2]) == 0.0


def test_kl_to_reference_is_zero_unperturbed_then_matches_by_hand(micro_model, tokenizer):
    reference = frozen_copy(micro_model)
    weight = 0.7
    obj = fixed_objective(tokenizer, regularizers=[KLToReference(reference, weight)])
    [batch] = obj.batches(0)
    loss, metrics = obj.loss(micro_model, batch)
    assert metrics["kl_ref"] == pytest.approx(0.0, abs=1e-7)
    assert float(loss) == pytest.approx(nll_only(tokenizer, micro_model)[0], rel=1e-6)
    with torch.no_grad():
        micro_model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
        micro_model.model.norm.weight.add_(0.5)
    loss, metrics = obj.loss(micro_model, batch)
    with torch.no_grad():
        _, mask, logits = direct_logp(micro_model, batch)
        _, _, ref_logits = direct_logp(reference, batch)
        lp, lq = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)  # KL(π_ref ‖ π) per position
        expected = float(kl[mask].sum() / 27)
    assert expected > 1e-4
    assert metrics["kl_ref"] == pytest.approx(expected, rel=1e-4)
    assert float(loss) == pytest.approx(nll_only(tokenizer, micro_model)[0] + weight * expected, rel=1e-5)


def test_kl_to_reference_micro_batches_add_up(micro_model, tokenizer):
    reference = frozen_copy(micro_model)
    with torch.no_grad():
        micro_model.model.norm.weight.add_(0.5)
    full = [float(fixed_objective(tokenizer).loss(micro_model, c)[0]) for c in fixed_objective(tokenizer).batches(0)]
    obj_full = fixed_objective(tokenizer, regularizers=[KLToReference(reference, 1.0)])
    obj_micro = fixed_objective(tokenizer, micro=2, regularizers=[KLToReference(reference, 1.0)])
    a = sum(float(obj_full.loss(micro_model, c)[0]) for c in obj_full.batches(0))
    b = sum(float(obj_micro.loss(micro_model, c)[0]) for c in obj_micro.batches(0))
    assert a > full[0] and b == pytest.approx(a, rel=1e-6)


def test_distillation_micro_batches_add_up(micro_model, tokenizer):
    previous = frozen_copy(micro_model)
    with torch.no_grad():
        micro_model.model.norm.weight.add_(0.5)
    make = lambda micro: fixed_objective(tokenizer, micro, regularizers=[Distillation(previous, 0.5, 2.0)])
    a = sum(float(make(None).loss(micro_model, c)[0]) for c in make(None).batches(0))
    b = sum(float(make(2).loss(micro_model, c)[0]) for c in make(2).batches(0))
    assert a > nll_only(tokenizer, micro_model)[0]
    assert b == pytest.approx(a, rel=1e-6)


def test_distillation_is_the_mean_kl_over_predicted_positions(micro_model, tokenizer):
    previous = frozen_copy(micro_model)
    with torch.no_grad():
        micro_model.model.norm.weight.add_(0.5)
    weight, temp = 0.5, 2.0
    obj = fixed_objective(tokenizer, regularizers=[Distillation(previous, weight, temp)])
    [batch] = obj.batches(0)
    _, metrics = obj.loss(micro_model, batch)
    with torch.no_grad():
        _, _, logits = direct_logp(micro_model, batch)
        _, _, prev_logits = direct_logp(previous, batch)
        lp, lq = torch.log_softmax(prev_logits / temp, -1), torch.log_softmax(logits / temp, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        attended = batch.attention_mask[:, 1:].bool()  # positions whose next token is real
        expected = float(kl[attended].sum() / attended.sum())
    assert metrics["distill_kl"] == pytest.approx(expected, rel=1e-5)


def test_ewc_penalty_by_hand(micro_model, tokenizer):
    norm = micro_model.model.norm.weight
    fisher = torch.linspace(0.0, 3.1, norm.numel())
    delta = torch.linspace(-0.5, 0.5, norm.numel())
    state = MethodState(
        fisher={"model.norm.weight": fisher}, anchor={"model.norm.weight": norm.detach().clone() - delta}
    )
    weight = 4.0
    expected = 0.5 * weight * float((fisher * delta**2).sum())
    obj = fixed_objective(tokenizer, micro=2, regularizers=[EWC(state, weight)])
    base = nll_only(tokenizer, micro_model, micro=2)
    got = [obj.loss(micro_model, c) for c in obj.batches(0)]
    assert float(got[0][0]) - base[0] == pytest.approx(expected, rel=1e-4)
    assert got[0][1]["ewc"] == pytest.approx(2 * expected / weight, rel=1e-4)
    assert float(got[1][0]) == pytest.approx(base[1], rel=1e-6)  # once per step
    # no Fisher yet (the first stage): no penalty
    assert float(EWC(MethodState(), weight).penalty(micro_model, None, torch.zeros(()), True)[0]) == 0.0


def answer_loglik_grads(model, tokenizer, prompt, answer):
    """∇ Σ_t log π(answer_t | …) (answer tokens and eos), by autograd on a plain log-softmax."""
    model.zero_grad(set_to_none=True)
    batch = collate([(encode_prompt(tokenizer, prompt), encode_answer(tokenizer, answer))], tokenizer.pad_token_id)
    logp, mask, _ = direct_logp(model, batch)
    assert int(mask.sum()) == len(answer) + 1
    logp[mask].sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_update_fisher_is_squared_gradient_and_accumulates(micro_model, tokenizer):
    g1 = answer_loglik_grads(micro_model, tokenizer, "reverse abc", "cba")
    g2 = answer_loglik_grads(micro_model, tokenizer, "add 2 3", "5")
    state = MethodState()
    micro_model.train()
    update_fisher(state, micro_model, tokenizer, [("reverse abc", "cba")], samples=8)
    assert micro_model.training  # the mode is restored
    assert set(state.fisher) == set(g1) == set(state.anchor)
    for n, g in g1.items():
        assert_close_scaled(state.fisher[n], g**2)
        assert torch.equal(state.anchor[n], dict(micro_model.named_parameters())[n].detach())
    assert all(p.grad is None for p in micro_model.parameters())
    # a second call adds its Fisher to the running sum
    update_fisher(state, micro_model, tokenizer, [("add 2 3", "5")], samples=8)
    for n in g1:
        assert_close_scaled(state.fisher[n], g1[n] ** 2 + g2[n] ** 2)
    # one call over two examples is their mean; ``samples`` caps the examples used
    both = MethodState()
    update_fisher(both, micro_model, tokenizer, [("reverse abc", "cba"), ("add 2 3", "5")], samples=8)
    capped = MethodState()
    update_fisher(capped, micro_model, tokenizer, [("reverse abc", "cba"), ("add 2 3", "5")], samples=1)
    for n in g1:
        assert_close_scaled(both.fisher[n], (g1[n] ** 2 + g2[n] ** 2) / 2)
        assert_close_scaled(capped.fisher[n], g1[n] ** 2)


# ----------------------------------------------------------------------------------------------------------------
# 4. GRPO
# ----------------------------------------------------------------------------------------------------------------


def grpo_objective(model, tokenizer, task, reference=None, seed=0, **over):
    spec = {
        "name": "grpo",
        "data": {"group_size": 4, "prompts_per_step": 2, "temperature": 0.7, **over.pop("data", {})},
        "loss": over.pop("loss", {}),
        "max_new_tokens": 6,
        **over,
    }
    return GRPOObjective(method_config(spec), make_ctx(model, tokenizer, task, seed=seed, reference=reference))


def cat_batches(batches):
    return {
        k: torch.cat([getattr(b, k) for b in batches])
        for k in ("input_ids", "attention_mask", "completion_mask", "advantages")
    }


def test_grpo_rollout_batch_and_completion_mask(micro_model, tokenizer):
    task = StubTask(n=5, reward_fn=varied_reward)
    hook = bias_token(micro_model, tokenizer.eos_token_id, 2.0)  # some completions stop, some are truncated
    obj = grpo_objective(micro_model, tokenizer, task, micro_batch_size=3)
    batches = obj.batches(0)
    assert [len(b.advantages) for b in batches] == [3, 3, 2]
    assert all(b.total_sequences == 8 for b in batches)
    full = cat_batches(batches)
    ids, att, comp = full["input_ids"], full["attention_mask"], full["completion_mask"]
    assert comp.shape == (8, ids.shape[1] - 1)
    assert all(b.total_tokens == int(comp.sum()) for b in batches)
    # the same rollout, regenerated: prompts chosen by random.Random(seed·1_000_003 + step), sampled with that seed
    prompts = random.Random(0).sample([e.prompt for e in task.examples("train")], 2)
    roll = make_engine("kv_cache", micro_model, tokenizer).generate(
        prompts, n=4, temperature=0.7, max_new_tokens=6, seed=0
    )
    stopped = 0
    for i in range(8):
        p, c = roll.prompt_ids[i], roll.completion_ids[i]
        assert p == encode_prompt(tokenizer, roll.prompts[i])
        length = len(p) + len(c)
        assert ids[i, :length].tolist() == p + c and int(att[i].sum()) == length
        # logits[:, :-1] at t predicts token t+1: the completion tokens are targets len(p)-1 … length-2
        assert torch.nonzero(comp[i]).flatten().tolist() == list(range(len(p) - 1, length - 1))
        assert ids[i, 1:][comp[i]].tolist() == c
        if not roll.truncated[i]:
            stopped += 1
            assert c[-1] == tokenizer.eos_token_id  # eos is a trained completion token
        else:
            assert len(c) == 6
    assert 0 < stopped < 8  # both kinds were checked
    rewards = [varied_reward(p, t) for p, t in zip(roll.prompts, roll.texts)]
    from retain.losses import group_advantages

    torch.testing.assert_close(full["advantages"], group_advantages(rewards, 4, "group", 1e-4))
    assert batches[0].metrics["reward"] == pytest.approx(sum(rewards) / 8)
    assert all(b.old_logp is None and b.ref_logp is None for b in batches)  # μ = 1, β = 0
    hook.remove()


def test_grpo_flat_rewards_give_zero_loss_and_gradient(micro_model, tokenizer):
    obj = grpo_objective(micro_model, tokenizer, StubTask(reward_fn=lambda p, c: 0.5))
    batches = obj.batches(0)
    assert float(torch.cat([b.advantages for b in batches]).abs().max()) == 0.0
    assert batches[0].metrics["flat_groups"] == 1.0
    total, g = objective_loss_and_grads(obj, micro_model)
    assert total == 0.0
    assert all(float(x.abs().max()) == 0.0 for x in g)


def by_hand_policy_gradient(model, full, mode, temperature, max_new):
    """−Σ A·log π(y_t) aggregated per mode, from logits / temperature: its gradient is GRPO's at ratio 1; its value
    with log π replaced by 1 (ratio 1) is GRPO's loss value."""
    logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, full["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    m, adv = full["completion_mask"].float(), full["advantages"].unsqueeze(1)
    B = len(adv)

    def reduce(x):
        if mode == "grpo":
            return ((x * m).sum(1) / m.sum(1)).mean()
        if mode == "dr_grpo":
            return (x * m).sum() / (B * max_new)
        return (x * m).sum() / m.sum()  # bnpo, dapo

    return reduce(-adv * logp), float(reduce(-adv * torch.ones_like(logp)))


@pytest.mark.parametrize("mode", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_gradient_and_micro_batching(micro_model, tokenizer, mode):
    task = StubTask(n=5, reward_fn=varied_reward)
    full_obj = grpo_objective(micro_model, tokenizer, task, loss={"aggregation": mode})
    full_batches = full_obj.batches(0)
    assert len(full_batches) == 1
    full = cat_batches(full_batches)
    assert float(full["advantages"].abs().max()) > 0  # a non-trivial signal
    total, full_grads = objective_loss_and_grads(full_obj, micro_model)
    surrogate, value = by_hand_policy_gradient(micro_model, full, mode, 0.7, 6)
    surrogate.backward()
    assert total == pytest.approx(value, abs=1e-6)
    assert_grads_close(full_grads, grads(micro_model))
    # micro-batches of 3 (3 + 3 + 2 sequences): same rollout, same summed loss and gradient
    micro_obj = grpo_objective(micro_model, tokenizer, task, loss={"aggregation": mode}, micro_batch_size=3)
    micro = cat_batches(micro_obj.batches(0))
    assert all(torch.equal(micro[k], full[k]) for k in full)
    micro_total, micro_grads = objective_loss_and_grads(micro_obj, micro_model)
    assert micro_total == pytest.approx(total, abs=1e-6)
    assert_grads_close(micro_grads, full_grads)


def test_grpo_reuses_the_rollout_for_updates_per_batch_steps(micro_model, tokenizer):
    task = StubTask(n=5, reward_fn=varied_reward)
    obj = grpo_objective(micro_model, tokenizer, task, data={"updates_per_batch": 2})
    b0 = obj.batches(0)
    # old log-probs are the sampling policy's, from logits / temperature
    with torch.no_grad():
        logits = micro_model(input_ids=b0[0].input_ids, attention_mask=b0[0].attention_mask).logits[:, :-1]
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, b0[0].input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = b0[0].completion_mask
    torch.testing.assert_close(b0[0].old_logp[m], expected[m], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an update between the two steps must not refresh the rollout
        micro_model.model.norm.weight.add_(0.3)
    b1 = obj.batches(1)
    assert b1 is b0
    loss, stats = obj.loss(micro_model, b1[0])
    assert stats["ratio_mean"] != pytest.approx(1.0, abs=1e-4)  # π moved away from π_old
    b2 = obj.batches(2)  # a fresh rollout (new seed, updated policy)
    assert b2 is not b0 and not torch.equal(b2[0].input_ids, b0[0].input_ids)
    assert obj.batches(3) is b2
    # with μ = 1 every step samples afresh
    obj1 = grpo_objective(micro_model, tokenizer, task)
    assert obj1.batches(1) is not obj1.batches(0)


def test_grpo_beta_uses_the_reference(micro_model, tokenizer):
    task = StubTask(n=5, reward_fn=varied_reward)
    reference = frozen_copy(micro_model)
    with torch.no_grad():
        micro_model.model.norm.weight.add_(0.4)
    beta = 0.5
    obj = grpo_objective(micro_model, tokenizer, task, reference=reference, loss={"beta": beta, "aggregation": "bnpo"})
    [batch] = obj.batches(0)
    assert batch.ref_logp is not None and batch.old_logp is None
    ids, att, m = batch.input_ids, batch.attention_mask, batch.completion_mask
    with torch.no_grad():
        def logp_of(model):
            z = model(input_ids=ids, attention_mask=att).logits[:, :-1] / 0.7
            return torch.log_softmax(z, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)

        ref, cur = logp_of(reference), logp_of(micro_model)
    torch.testing.assert_close(batch.ref_logp[m], ref[m], rtol=1e-5, atol=1e-5)
    assert float((ref - cur)[m].abs().max()) > 1e-3  # the policy is not the reference
    loss, stats = obj.loss(micro_model, batch)
    x = ref - cur
    k3 = torch.exp(x) - x - 1
    adv = batch.advantages.unsqueeze(1).expand_as(k3)
    expected = float(((-adv + beta * k3)[m]).sum() / m.sum())
    assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert stats["kl_mean"] == pytest.approx(float(k3[m].mean()), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# 5. data sources
# ----------------------------------------------------------------------------------------------------------------


def answer_logprob_by_hand(model, tokenizer, prompt, answer):
    batch = collate([(encode_prompt(tokenizer, prompt), encode_answer(tokenizer, answer))], tokenizer.pad_token_id)
    with torch.no_grad():
        logp, mask, _ = direct_logp(model, batch)
    return float(logp[mask].sum())


def test_reference_pairs_targets(micro_model, tokenizer, registry):
    task = registry["stub"] = StubTask(n=4)
    ctx = make_ctx(micro_model, tokenizer, task)
    examples = task.examples("train")
    assert reference_pairs(ctx, "stub", "canonical", 0) == [(e.prompt, e.answer) for e in examples]
    rand = reference_pairs(ctx, "stub", "random", 0)
    assert rand == reference_pairs(ctx, "stub", "random", 0)  # seeded
    assert all(a in e.answers for (_, a), e in zip(rand, examples))
    assert len({tuple(reference_pairs(ctx, "stub", "random", s)) for s in range(6)}) > 1
    # scored under the reference (the stage's start), not the model being trained
    with torch.no_grad():
        micro_model.model.norm.weight.mul_(-5.0)
    likely = reference_pairs(ctx, "stub", "likely", 0)
    unlikely = reference_pairs(ctx, "stub", "unlikely", 0)
    for e, (p1, a1), (p2, a2) in zip(examples, likely, unlikely):
        scores = {a: answer_logprob_by_hand(ctx.reference, tokenizer, e.prompt, a) for a in e.answers}
        assert p1 == p2 == e.prompt
        assert a1 == max(scores, key=scores.get) and a2 == min(scores, key=scores.get)
        assert a1 != a2


class UnevenAnswers(StubTask):
    """Two prompts: one with a single answer, one with five."""

    def examples(self, split, n=None, seed=0):
        return [Example(prompt="one q", answer="a", answers=("a",)),
                Example(prompt="five q", answer="b0", answers=tuple(f"b{i}" for i in range(5)))]


def test_target_every_draws_prompts_uniformly_then_every_answer(micro_model, tokenizer, registry):
    task = registry["stub"] = UnevenAnswers()
    cfg = method_config({"name": "sft", "data": {"kind": "offline", "target": "every"}})
    src = build_source(cfg, make_ctx(micro_model, tokenizer, task), None)
    assert src.groups == [[("one q", "a")], [("five q", f"b{i}") for i in range(5)]]
    batch = src.sample(random.Random(0), 2000, 0)
    assert batch == src.sample(random.Random(0), 2000, 0)  # seeded
    ones = sum(p == "one q" for p, _ in batch)
    assert 900 < ones < 1100, ones  # prompt-uniform: pair-uniform would give ~333
    fives = [a for p, a in batch if p == "five q"]
    assert set(fives) == {f"b{i}" for i in range(5)}
    assert all(120 < fives.count(f"b{i}") < 280 for i in range(5))
    # with the task's templates, each group holds every (template, answer) pair of its prompt
    varied = method_config({"name": "sft", "data": {"kind": "offline", "target": "every", "prompts": "varied"}})
    task.prompt_variants = lambda prompt: [prompt, prompt.upper()]
    src = build_source(varied, make_ctx(micro_model, tokenizer, task), None)
    assert src.groups[0] == [("one q", "a"), ("ONE Q", "a")] and len(src.groups[1]) == 10


def test_with_replay_mixes_round_ratio_k():
    new = FixedPairs([("new q", "a")], "t")
    buffers = {"old1": [("old1 q", "b")], "old2": [("old2 q", "c")], "empty": []}
    for ratio, k, n_replay in [(0.25, 8, 2), (0.3, 10, 3), (0.5, 5, 2), (0.1, 4, 0)]:  # round(2.5) = 2
        src = WithReplay(new, buffers, ratio)
        assert src.names == ["old1", "old2"]
        batch = src.sample(random.Random(1), k, 0)
        assert len(batch) == k
        assert sum(p != "new q" for p, _ in batch) == n_replay == round(ratio * k)
    # both earlier tasks are drawn
    batch = WithReplay(new, buffers, 0.5).sample(random.Random(0), 200, 0)
    assert {p for p, _ in batch} == {"new q", "old1 q", "old2 q"}
    # the first stage has no buffer: nothing is replayed
    assert WithReplay(new, {}, 0.5).sample(random.Random(0), 6, 0) == [("new q", "a")] * 6


def test_multitask_draws_from_every_task():
    src = MultiTaskPairs({"a": [("a1", "x"), ("a2", "x")], "b": [("b1", "y")], "c": [("c1", "z")], "none": []})
    batch = src.sample(random.Random(0), 300, 0)
    tasks = [p[0] for p, _ in batch]
    counts = {t: tasks.count(t) for t in "abc"}
    assert set(tasks) == {"a", "b", "c"}
    assert all(70 < c < 130 for c in counts.values()), counts  # task-uniform, not pair-uniform


def test_build_source_multitask_covers_seen_tasks(micro_model, tokenizer, registry):
    registry["stub"] = StubTask("stub", n=3)
    registry["older"] = StubTask("older", n=2)
    ctx = make_ctx(micro_model, tokenizer, registry["stub"], seen=["older"])
    src = build_source(method_config("multitask"), ctx, None)
    assert sorted(src.per_task) == ["older", "stub"]
    assert src.per_task["older"] == [(f"older q{i}", f"{i}a") for i in range(2)]
    state = MethodState(replay={"older": [("older q0", "0a")]})
    src = build_source(method_config("replay"), make_ctx(micro_model, tokenizer, registry["stub"], state=state), None)
    assert isinstance(src, WithReplay) and src.buffers == state.replay


def test_sample_correct_keeps_correct_finished_distinct(micro_model, tokenizer):
    # correct: an even first character, or an empty completion; the model stops often but not always
    reward = lambda p, c: 1.0 if c == "" or ord(c[0]) % 2 == 0 else 0.0
    task = StubTask(n=3, reward_fn=reward, max_new_tokens=3)
    bias_token(micro_model, tokenizer.eos_token_id, 3.0)
    ctx = make_ctx(micro_model, tokenizer, task)
    kept = sample_correct(micro_model, ctx, samples_per_prompt=12, temperature=1.0, seed=5)
    roll = make_engine("kv_cache", micro_model, tokenizer).generate(
        [e.prompt for e in task.examples("train")], n=12, temperature=1.0, max_new_tokens=3, seed=5
    )
    raw = list(zip(roll.prompts, roll.texts, roll.truncated))
    # the rollout has every case the filter must handle
    assert any(tr and reward(p, t) for p, t, tr in raw), "a correct but truncated sample"
    assert any(not tr and not reward(p, t) for p, t, tr in raw), "a finished wrong sample"
    finished_correct = [(p, t) for p, t, tr in raw if not tr and reward(p, t)]
    assert len(set(finished_correct)) < len(finished_correct), "a repeated sample"
    assert kept == list(dict.fromkeys(finished_correct))
    assert len(set(kept)) == len(kept)


# ----------------------------------------------------------------------------------------------------------------
# 6. train_stage end to end
# ----------------------------------------------------------------------------------------------------------------

SMALL = {"train": {"steps": 2, "lr": 1e-2}, "batch_size": 4}
E2E = {
    "sft": {},
    "eaft": {},
    "conflict_sft": {},
    "kl_sft": {},
    "lwf": {},
    "l2sp": {},
    "ewc": {"regularizers": [{"kind": "ewc", "fisher_samples": 3}]},
    "replay": {"replay": {"size": 3}},
    "lora": {},
    "multitask": {},
    "grpo": {"data": {"group_size": 4, "prompts_per_step": 2}, "max_new_tokens": 4},
}


def method(name, **extra):
    return {"name": name, **copy.deepcopy(SMALL), **copy.deepcopy(E2E.get(name, {})), **extra}


@pytest.mark.parametrize("name", sorted(E2E))
def test_train_stage_every_preset(micro_model, tokenizer, registry, name):
    registry["stub"] = StubTask("stub", n=4, reward_fn=varied_reward)
    registry["older"] = StubTask("older", n=3)
    before = params(micro_model)
    state = MethodState(replay={"older": [("older q0", "0a")]})
    logs = []
    out = train_stage(
        micro_model, tokenizer, "stub", method(name), seen_tasks=["older"], state=state, log=logs.append
    )
    assert not adapters.is_adapted(out) and not out.training
    assert set(dict(out.named_parameters())) == set(before)
    assert changed(before, out)
    assert all(torch.isfinite(p).all() for p in out.parameters())
    assert logs and logs[-1]["step"] == 2 and math.isfinite(logs[-1]["loss"])
    if name == "grpo":
        assert "reward" in logs[-1] and "clip_fraction" in logs[-1]
    if name in ("kl_sft", "lwf", "l2sp"):
        assert {"kl_sft": "kl_ref", "lwf": "distill_kl", "l2sp": "l2sp"}[name] in logs[-1]


def test_lora_trains_only_the_adapter_then_merges(micro_model, tokenizer, registry):
    registry["stub"] = StubTask("stub", n=4)
    before = params(micro_model)
    out = train_stage(micro_model, tokenizer, "stub", method("lora"))
    assert type(out).__name__ == "Qwen2ForCausalLM" and not adapters.is_adapted(out)
    after = dict(out.named_parameters())
    # LoRA targets the attention and MLP projections: norms and embeddings are untouched
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], before[q])


def test_per_stage_lora_then_sft_trains_all_weights(micro_model, tokenizer, registry):
    registry["stub"] = StubTask("stub", n=4)
    out = train_stage(micro_model, tokenizer, "stub", method("lora"))
    assert all(p.requires_grad for p in out.parameters())
    before = params(out)
    out = train_stage(out, tokenizer, "stub", method("sft"), stage_index=1)
    assert not torch.equal(dict(out.named_parameters())["model.norm.weight"], before["model.norm.weight"])


def test_shared_lora_stays_attached_across_stages(micro_model, tokenizer, registry):
    registry["stub"] = StubTask("stub", n=4)
    registry["next"] = StubTask("next", n=4)
    cfg = method("lora", adapter={"per_stage": False})
    base = params(micro_model)
    one = train_stage(micro_model, tokenizer, "stub", cfg)
    assert adapters.is_adapted(one)
    lora_1 = {n: p.detach().clone() for n, p in one.named_parameters() if "lora_" in n}
    assert lora_1 and any(float(p.abs().max()) > 0 for n, p in lora_1.items() if "lora_B" in n)
    two = train_stage(one, tokenizer, "next", cfg, stage_index=1, seen_tasks=["stub"])
    assert two is one and adapters.is_adapted(two)
    lora_2 = {n: p.detach() for n, p in two.named_parameters() if "lora_" in n}
    assert set(lora_2) == set(lora_1)  # the same adapter, not a second one
    assert any(not torch.equal(lora_1[n], lora_2[n]) for n in lora_1)  # and it trained on
    # the base weights never change; merged_copy gives plain weights without touching the model
    plain = adapters.merged_copy(two)
    assert not adapters.is_adapted(plain) and adapters.is_adapted(two)
    assert torch.equal(dict(plain.named_parameters())["model.norm.weight"], base["model.norm.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(plain.named_parameters())[q], base[q])
    bases = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in two.named_parameters()}
    assert torch.equal(bases[q], base[q])


def test_replay_fills_the_buffer_and_the_next_stage_replays_it(micro_model, tokenizer, registry):
    registry["stub"] = StubTask("stub", n=5)
    registry["next"] = StubTask("next", n=5)
    state = MethodState()
    model = train_stage(micro_model, tokenizer, "stub", method("replay"), state=state)
    assert list(state.replay) == ["stub"]
    canonical = [(e.prompt, e.answer) for e in registry["stub"].examples("train")]
    assert len(state.replay["stub"]) == 3 and set(state.replay["stub"]) <= set(canonical)
    assert len(set(state.replay["stub"])) == 3
    ctx = make_ctx(model, tokenizer, registry["next"], state=state, seen=["stub"])
    batch = build_source(method_config(method("replay", batch_size=8)), ctx, None).sample(random.Random(0), 8, 0)
    assert sum(p.startswith("stub") for p, _ in batch) == 2  # round(0.25 × 8)
    train_stage(model, tokenizer, "next", method("replay"), state=state, stage_index=1, seen_tasks=["stub"])
    assert sorted(state.replay) == ["next", "stub"]


def test_ewc_fills_the_fisher_and_anchor(micro_model, tokenizer, registry):
    registry["stub"] = StubTask("stub", n=4)
    registry["next"] = StubTask("next", n=4)
    state = MethodState()
    cfg = method("ewc")
    model = train_stage(micro_model, tokenizer, "stub", cfg, state=state)
    names = {n for n, p in model.named_parameters()}
    assert set(state.fisher) == names == set(state.anchor)
    assert all(float(f.min()) >= 0 for f in state.fisher.values())
    assert sum(float(f.sum()) for f in state.fisher.values()) > 0
    assert all(torch.equal(state.anchor[n], p.detach()) for n, p in model.named_parameters())
    first = {n: f.clone() for n, f in state.fisher.items()}
    logs = []
    model = train_stage(model, tokenizer, "next", cfg, state=state, stage_index=1, seen_tasks=["stub"], log=logs.append)
    assert logs[-1]["ewc"] > 0  # the second stage is pulled toward the first's end weights
    assert all(torch.all(state.fisher[n] >= first[n]) for n in first)
    assert any(not torch.equal(state.fisher[n], first[n]) for n in first)


@pytest.mark.parametrize("name", ["self_sft", "iterative_sft", "rl_sample_sft"])
def test_sampled_sft_on_a_model_that_solves_nothing_raises(micro_model, tokenizer, registry, name):
    registry["stub"] = StubTask("stub", n=2, reward_fn=lambda p, c: 0.0, max_new_tokens=3)
    data = {"samples_per_prompt": 2}
    with pytest.raises(RetainError, match=r"solved none of the train prompts") as err:
        train_stage(micro_model, tokenizer, "stub", method(name, data=data))
    assert "'stub'" in str(err.value) and "2 samples" in str(err.value)


@pytest.mark.parametrize("name", ["self_sft", "iterative_sft", "rl_sample_sft"])
def test_sampled_sft_trains_on_a_solvable_task(micro_model, tokenizer, registry, name):
    registry["stub"] = StubTask("stub", n=3, reward_fn=lambda p, c: 1.0, max_new_tokens=4)
    bias_token(micro_model, tokenizer.eos_token_id, 5.0)
    before = params(micro_model)
    data = {"samples_per_prompt": 2, **({"epoch_steps": 1} if name == "iterative_sft" else {})}
    out = train_stage(micro_model, tokenizer, "stub", method(name, data=data))
    assert changed(before, out)


def test_iterative_sft_resamples_every_epoch(micro_model, tokenizer, registry):
    registry["stub"] = StubTask("stub", n=3, reward_fn=lambda p, c: 1.0, max_new_tokens=4)
    bias_token(micro_model, tokenizer.eos_token_id, 5.0)
    cfg = method_config(method("iterative_sft", data={"samples_per_prompt": 2, "epoch_steps": 2}))
    ctx = make_ctx(micro_model, tokenizer, registry["stub"], seed=3)
    source = build_source(cfg, ctx, None)
    first = source.sample(random.Random(0), 4, 0)
    pairs_0 = list(source.pairs)
    assert set(first) <= set(pairs_0)
    source.sample(random.Random(1), 4, 1)
    assert source.pairs == pairs_0 and len(source.kept_history) == 1  # same epoch: no resampling
    with torch.no_grad():  # the policy moves: the next epoch samples the current model, not the stage's start
        micro_model.model.norm.weight.mul_(-3.0)
    batch = source.sample(random.Random(2), 4, 2)
    assert len(source.kept_history) == 2 and set(batch) <= set(source.pairs)
    assert source.pairs == sample_correct(micro_model, ctx, 2, 1.0, seed=3 * 7919 + 1)
    assert source.pairs != sample_correct(ctx.reference, ctx, 2, 1.0, seed=3 * 7919 + 1)
    source.sample(random.Random(4), 4, 4)
    assert len(source.kept_history) == 3  # steps 0, 2, 4


# ----------------------------------------------------------------------------------------------------------------
# 7. determinism
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft", "grpo"])
def test_same_seed_same_weights_other_seed_differs(micro_model, tokenizer, registry, name):
    registry["stub"] = StubTask("stub", n=6, reward_fn=varied_reward)
    cfg = method(name, train={"steps": 3, "lr": 1e-2})
    models = [copy.deepcopy(micro_model) for _ in range(3)]
    outs = [train_stage(m, tokenizer, "stub", cfg, seed=s) for m, s in zip(models, (0, 0, 1))]
    a, b, c = (torch.cat([p.detach().flatten() for p in o.parameters()]) for o in outs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def grpo_resume_runs(model, tokenizer, tmp_path, mu):
    """(weights after 2 straight steps, weights after 1 step + checkpoint + a fresh process resuming to step 2)."""
    def cfg(steps):
        return method("grpo", train={"steps": steps, "lr": 1e-2, "checkpoint_every": 1}, data={
            "group_size": 4, "prompts_per_step": 2, "updates_per_batch": mu})

    straight = train_stage(copy.deepcopy(model), tokenizer, "stub", cfg(2))
    ckpt = tmp_path / f"ckpt{mu}"
    train_stage(copy.deepcopy(model), tokenizer, "stub", cfg(1), checkpoint_dir=ckpt)
    resumed = train_stage(copy.deepcopy(model), tokenizer, "stub", cfg(2), checkpoint_dir=ckpt)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
    return flat(straight), flat(resumed)


def test_grpo_resume_is_exact(micro_model, tokenizer, registry, tmp_path):
    registry["stub"] = StubTask("stub", n=6, reward_fn=varied_reward)
    straight, resumed = grpo_resume_runs(micro_model, tokenizer, tmp_path, mu=1)
    assert torch.equal(straight, resumed)


def test_grpo_checkpoint_inside_a_rollout_batch_is_rejected():
    """A checkpoint inside a rollout batch (μ = 2, checkpoint every step) could not resume exactly: the sampled
    batch and its old log-probs are not saved. The config refuses it, naming both fields."""
    with pytest.raises(RetainError, match="checkpoint_every.*updates_per_batch"):
        method_config(method("grpo", train={"steps": 2, "checkpoint_every": 1}, data={"updates_per_batch": 2}))


# --- parts own their lifecycle (retain.methods.parts) -------------------------------------------------------------


def test_build_stage_lists_the_parts_with_an_end_of_stage_and_each_acts(micro_model, tokenizer, registry):
    from retain.methods.build import build_stage
    from retain.methods.parts import StagePart

    registry["stub"] = StubTask("stub", n=5)
    cfg = method_config({"name": "replay", "batch_size": 4, "regularizers": [{"kind": "ewc", "fisher_samples": 2}],
                         "replay": {"size": 3}})
    state = MethodState()
    ctx = make_ctx(micro_model, tokenizer, registry["stub"], state=state)
    stage = build_stage(cfg, ctx)
    [ewc, replay] = stage.parts  # regularisers first, then the data source
    assert isinstance(ewc, EWC) and isinstance(replay, WithReplay) and all(isinstance(p, StagePart) for p in stage.parts)
    assert stage.end_stage(micro_model, ctx) is micro_model
    assert set(state.fisher) == {n for n, _ in micro_model.named_parameters()}  # EWC's Fisher, from its own part
    assert len(state.replay["stub"]) == 3  # replay's buffer, from its own part
    assert build_stage(method_config("sft"), ctx).parts == []  # nothing to do at the stage's end


def test_parts_say_what_a_stream_cannot_run():
    from retain.methods.build import streaming_refusals

    cfg = method_config({"name": "replay", "regularizers": [{"kind": "l2sp"}, {"kind": "ewc"}]})
    assert streaming_refusals(cfg, "method") == [
        "method.replay needs task boundaries", "method.regularizers[1] (ewc) needs task boundaries"]
    assert streaming_refusals(method_config("lora"), "stages[2].method") == [
        "stages[2].method.adapter.per_stage: a per-stage adapter needs task boundaries"]
    assert streaming_refusals(method_config({"name": "kl_sft"}), "method") == []
