"""Numerics under faults: NaN/inf rewards, all-equal rewards in every group, empty completions, completions cut at
the length limit, NaN/inf losses and gradients, extreme log-probabilities in the KL estimators — each handled (a
finite loss, or a skipped and logged step) and visible in the logged metrics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retain.losses import group_advantages, grpo_token_loss, kl_estimate
from retain.models.adapters import frozen_copy
from retain.methods.config import method_config
from retain.methods.grpo import GRPOObjective
from retain.methods.stage import MethodState, StageContext
from retain.rollout.base import Rollout
from retain.tasks import get
from retain.train import TrainConfig, Trainer

F32 = torch.finfo(torch.float32)


# ---------------------------------------------------------------------------------------------- rewards → advantages


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_unscorable_rewards_get_advantage_zero_and_spare_their_group(bad):
    for scale in ("group", "batch", "none"):
        adv = group_advantages([bad, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], 4, scale)
        assert torch.isfinite(adv).all()
        assert adv[0] == 0.0 and adv[3] > 0 > adv[1]  # the rest of the group still learns
        assert (adv[4:] == 0).all()  # an all-equal group: exactly 0


def test_all_equal_rewards_in_every_group_give_zero_advantages():
    for value in (0.0, 0.2, 1.0, 1e30):
        for scale in ("group", "batch", "none"):
            assert (group_advantages([value] * 12, 4, scale) == 0).all()


# ---------------------------------------------------------------------------------------------- the GRPO objective


class Rewarding:
    """A task whose reward is whatever the test says (the real task's prompts)."""

    def __init__(self, rewards):
        self.inner, self.rewards, self.calls = get("arith"), rewards, 0
        self.name, self.splits = "arith", self.inner.splits

    def examples(self, *args, **kwargs):
        return self.inner.examples(*args, **kwargs)

    def reward(self, prompt, completion, answer=None):
        value = self.rewards[self.calls % len(self.rewards)]
        self.calls += 1
        return value


def grpo(model, tokenizer, task, **data):
    cfg = method_config({"name": "grpo", "data": {"prompts_per_step": 3, "group_size": 4, **data},
                         "loss": {"beta": 0.05}, "max_new_tokens": 6})
    model.config._attn_implementation = "sdpa"
    ctx = StageContext(model=model, reference=frozen_copy(model), tokenizer=tokenizer, task_name="arith", task=task,
                       stage_index=0, seen_tasks=[], seed=0, state=MethodState())
    return GRPOObjective(cfg, ctx)


def one_step(objective, model, steps=1):
    logs = []
    trainer = Trainer(model, objective, TrainConfig(steps=steps, lr=1e-3, log_every=1), log=logs.append)
    trainer.run()
    return trainer, logs


@pytest.mark.parametrize("rewards", [
    [math.nan, 1.0, 0.0, 0.5], [math.inf, 0.0, -math.inf, 1.0], [None, "x", 1.0, 0.0], [math.nan] * 4,
])
def test_nan_and_inf_rewards_train_and_are_logged(micro_model, tokenizer, rewards):
    objective = grpo(micro_model, tokenizer, Rewarding(rewards))
    trainer, logs = one_step(objective, micro_model)
    assert trainer.skipped == 0  # the step trained; it was not thrown away as non-finite
    [record] = [r for r in logs if r.get("step") == 1]
    bad = sum(not (isinstance(r, float) and math.isfinite(r)) for r in rewards) / len(rewards)
    assert record["unscorable"] == pytest.approx(bad)
    assert all(math.isfinite(v) for v in record.values() if isinstance(v, float)), record


def test_all_equal_rewards_in_every_group(micro_model, tokenizer):
    before = [p.detach().clone() for p in micro_model.parameters()]
    objective = grpo(micro_model, tokenizer, Rewarding([0.2]))
    trainer, logs = one_step(objective, micro_model)
    [record] = [r for r in logs if r.get("step") == 1]
    assert record["flat_groups"] == 1.0 and record["unscorable"] == 0.0 and trainer.skipped == 0
    assert math.isfinite(record["loss"])
    # no advantage anywhere: only the β·KL term, which is 0 at the reference, so the weights stay put
    assert all(torch.equal(a, b) for a, b in zip(before, micro_model.parameters()))


def test_empty_completions(micro_model, tokenizer):
    objective = grpo(micro_model, tokenizer, Rewarding([1.0, 0.0]))
    generate = objective.engine.generate

    def emptied(*args, **kwargs):  # an engine that returns some completions without a single token
        roll = generate(*args, **kwargs)
        for i in range(0, len(roll), 2):
            roll.completion_ids[i], roll.texts[i], roll.truncated[i] = [], "", False
        return roll

    objective.engine.generate = emptied
    trainer, logs = one_step(objective, micro_model)
    [record] = [r for r in logs if r.get("step") == 1]
    assert trainer.skipped == 0 and math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])

    def all_empty(*args, **kwargs):
        roll = generate(*args, **kwargs)
        return Rollout(roll.prompts, roll.prompt_ids, [[] for _ in roll.texts], [""] * len(roll), roll.group,
                       [False] * len(roll))

    objective = grpo(micro_model, tokenizer, Rewarding([1.0, 0.0]))  # a fresh objective: no rollout kept from above
    objective.engine.generate = all_empty
    trainer, logs = one_step(objective, micro_model)
    assert trainer.skipped == 0 and [r for r in logs if r.get("step") == 1][0]["completion_len"] == 0.0


def test_completions_at_the_length_limit(micro_model, tokenizer):
    """A random micro model never says eos: every completion is cut at max_new_tokens, and that is logged."""
    objective = grpo(micro_model, tokenizer, get("arith"))
    trainer, logs = one_step(objective, micro_model, steps=2)
    records = [r for r in logs if "truncated" in r]
    assert records and all(r["truncated"] == 1.0 and r["completion_len"] == 6 for r in records)
    assert trainer.skipped == 0 and all(math.isfinite(r["loss"]) for r in records)


# ---------------------------------------------------------------------------------------------- the training loop


class Poisoned:
    """An objective whose loss (or, through a hook, whose gradient) turns non-finite at chosen steps."""

    def __init__(self, inner, model, bad_steps, where="loss", value=math.inf):
        self.inner, self.bad, self.where, self.value, self.step = inner, set(bad_steps), where, value, 0
        if where == "grad":
            for p in model.parameters():
                p.register_hook(lambda g: g * self.value if self.step in self.bad else g)

    def batches(self, step):
        self.step = step
        return self.inner.batches(step)

    def loss(self, model, micro):
        loss, metrics = self.inner.loss(model, micro)
        return (loss * self.value if self.where == "loss" and self.step in self.bad else loss), metrics


@pytest.mark.parametrize("where,value", [("loss", math.inf), ("loss", -math.inf), ("grad", math.nan),
                                         ("grad", math.inf)])
def test_nonfinite_loss_or_gradient_skips_the_step_and_logs_it(micro_model, tokenizer, where, value):
    from retain.methods.sft import SFTObjective

    pairs = [(tokenizer.encode("1+1="), tokenizer.encode("2") + [tokenizer.eos_token_id])]
    inner = SFTObjective(lambda rng, k, step: pairs * k, tokenizer.pad_token_id, 2)
    logs = []
    trainer = Trainer(micro_model, Poisoned(inner, micro_model, {1}, where, value),
                      TrainConfig(steps=3, lr=1e-3, log_every=1), log=logs.append)
    before = None

    def snapshot(step, model):
        nonlocal before
        if step == 1:
            before = [p.detach().clone() for p in model.parameters()]

    trainer.on_step = snapshot
    trainer.run()
    assert trainer.skipped == 1
    assert [r["step"] for r in logs if r.get("event") == "nonfinite_skip"] == [1]
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped.parameters())
    assert before is not None


# ---------------------------------------------------------------------------------------------- KL estimators


EXTREMES = [0.0, -1e-30, -F32.tiny, -1.0, -20.0, -21.0, -88.0, -104.0, -1e4, -1e30, -F32.max, 1e30, F32.max]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(EXTREMES) | st.floats(-F32.max, F32.max, width=32), min_size=2, max_size=16))
def test_kl_estimators_never_overflow(values):
    half = len(values) // 2
    logp = torch.tensor(values[:half], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor(values[half : 2 * half], dtype=torch.float32)
    for kind in ("k1", "k2", "k3"):
        k = kl_estimate(logp, ref, kind=kind)
        assert torch.isfinite(k).all(), (kind, values)
        k.sum().backward()
        assert torch.isfinite(logp.grad).all()
        logp.grad = None
    loss, stats = grpo_token_loss(logp.view(1, -1), logp.detach().view(1, -1) + 50, torch.tensor([1.0]),
                                  ref.view(1, -1), beta=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in stats.values())
