import math
import random

import pytest
import torch

from retain.data import encode_answer, encode_prompt
from retain.methods.sft import SFTObjective
from retain.train import NonFiniteLoss, TrainConfig, Trainer, lr_lambda, train

PAIRS = [(f"reverse {w}", w[::-1]) for w in ["abc", "hello", "xyz", "lemon", "kiwi", "grape", "plum", "fig"]]


def sft_objective(tokenizer, batch_size=8, micro=None, seed=0):
    encoded = [(encode_prompt(tokenizer, p), encode_answer(tokenizer, a)) for p, a in PAIRS]

    def sampler(rng: random.Random, k: int, step: int):
        return [rng.choice(encoded) for _ in range(k)]

    return SFTObjective(sampler, tokenizer.pad_token_id, batch_size, micro, seed=seed)


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_lr_schedule_by_hand():
    cfg = TrainConfig(steps=10, lr=1.0, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    at = lr_lambda(cfg)
    assert at(0) == pytest.approx(0.5) and at(1) == pytest.approx(1.0)
    assert at(2) == pytest.approx(1.0)  # start of the decay
    assert at(6) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert at(10) == pytest.approx(0.1)
    lin = lr_lambda(TrainConfig(steps=10, lr=1.0, schedule="linear", min_lr_ratio=0.0))
    assert lin(5) == pytest.approx(0.5)


def test_sft_loss_goes_down(micro_model, tokenizer):
    logs = []
    train(micro_model, sft_objective(tokenizer), TrainConfig(steps=40, lr=3e-3, log_every=10), log=logs.append)
    losses = [r["loss"] for r in logs if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]


def _first_step_gradient(model, objective) -> torch.Tensor:
    """The gradient the optimizer is handed at step 0 (captured just before it steps)."""
    trainer = Trainer(model, objective, TrainConfig(steps=1, lr=1e-3, max_grad_norm=None))
    captured = []
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        captured.append(torch.cat([p.grad.detach().flatten() for p in model.parameters()]))
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.run()
    return captured[0]


def test_gradient_accumulation_matches_full_batch(tokenizer, micro_model):
    import copy

    other = copy.deepcopy(micro_model)
    # micro-batch losses are normalised by the step's token count, so accumulation is the same computation: the
    # gradients agree to float rounding (compared before Adam, which is blind to a scale error and turns a rounding
    # difference in a near-zero gradient into a visible one)
    full = _first_step_gradient(copy.deepcopy(micro_model), sft_objective(tokenizer, 8, 8))
    accum = _first_step_gradient(copy.deepcopy(micro_model), sft_objective(tokenizer, 8, 4))
    assert torch.allclose(full, accum, rtol=1e-5, atol=1e-7)
    cfg = TrainConfig(steps=3, lr=1e-3, max_grad_norm=None)
    a = train(micro_model, sft_objective(tokenizer, 8, 8), cfg)
    b = train(other, sft_objective(tokenizer, 8, 4), cfg)
    assert torch.allclose(flat_params(a), flat_params(b), atol=1e-5)  # a scale or data error moves weights ~lr


@pytest.mark.slow
def test_compiled_training_matches_eager(tokenizer, micro_model):
    """train.compile runs the same computation through torch.compile: same losses and weights to float tolerance.
    One decoder layer (the compile's cost grows with the graph; what it proves does not) and two steps: the second
    runs the compiled graph on other shapes (dynamic) and on weights the first step changed."""
    import copy

    config = copy.deepcopy(micro_model.config)
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    one_layer = type(micro_model)(config)
    other = copy.deepcopy(one_layer)
    eager_log, compiled_log = [], []
    cfg = TrainConfig(steps=2, lr=1e-3, log_every=1)
    eager = train(one_layer, sft_objective(tokenizer), cfg, log=eager_log.append)
    compiled = train(other, sft_objective(tokenizer), cfg.model_copy(update={"compile": True}), log=compiled_log.append)
    assert len(compiled_log) == 2
    assert [r["loss"] for r in compiled_log] == pytest.approx([r["loss"] for r in eager_log], abs=1e-5)
    assert torch.allclose(flat_params(eager), flat_params(compiled), atol=1e-5)
    assert type(compiled).__name__ == type(eager).__name__  # the plain module comes back, not the compiled wrapper


class NaNAt:
    """Wraps an objective; the loss is NaN at the given steps."""

    def __init__(self, inner, bad_steps):
        self.inner, self.bad_steps, self.step = inner, set(bad_steps), 0

    def batches(self, step):
        self.step = step
        return self.inner.batches(step)

    def loss(self, model, micro):
        loss, m = self.inner.loss(model, micro)
        return (loss * float("nan") if self.step in self.bad_steps else loss), m


def test_nan_step_is_skipped_and_logged(micro_model, tokenizer):
    logs = []
    trainer = Trainer(micro_model, NaNAt(sft_objective(tokenizer), {0}), TrainConfig(steps=1, lr=1e-2), log=logs.append)
    before = flat_params(micro_model).clone()
    trainer.run()
    assert torch.equal(before, flat_params(trainer.unwrapped))  # the NaN step changed nothing
    assert trainer.skipped == 1
    assert any(r.get("event") == "nonfinite_skip" for r in logs)


def test_repeated_nan_stops_and_keeps_the_checkpoint(micro_model, tokenizer, tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = TrainConfig(steps=20, lr=1e-3, checkpoint_every=2, max_nonfinite=3)
    trainer = Trainer(micro_model, NaNAt(sft_objective(tokenizer), set(range(4, 100))), cfg, checkpoint_dir=ckpt)
    with pytest.raises(NonFiniteLoss, match="step 6 .3 consecutive.*last checkpoint kept"):
        trainer.run()
    # the skipped steps changed no weight, so the checkpoint is the model of the last good step, loadable
    from safetensors.torch import load_model

    again = type(micro_model)(micro_model.config)
    load_model(again, str(ckpt / "model.safetensors"), strict=False)
    assert torch.equal(flat_params(again), flat_params(trainer.unwrapped))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))


class Crash:
    def __init__(self, inner, at):
        self.inner, self.at = inner, at

    def batches(self, step):
        if step == self.at:
            raise KeyboardInterrupt
        return self.inner.batches(step)

    def loss(self, model, micro):
        return self.inner.loss(model, micro)


def test_resume_from_checkpoint_is_exact(tokenizer, micro_model, tmp_path):
    import copy

    fresh = copy.deepcopy(micro_model)
    cfg = TrainConfig(steps=6, lr=1e-3, schedule="cosine", warmup_steps=2, checkpoint_every=3)
    straight = train(copy.deepcopy(micro_model), sft_objective(tokenizer), cfg)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):  # the process dies during step 4, after the step-3 checkpoint
        Trainer(micro_model, Crash(sft_objective(tokenizer), at=4), cfg, checkpoint_dir=ckpt).run()
    # a new process would build a fresh model and objective, then find the checkpoint
    resumed = Trainer(fresh, sft_objective(tokenizer), cfg, checkpoint_dir=ckpt)
    assert resumed.step == 3
    resumed.run()
    assert torch.equal(flat_params(straight), flat_params(resumed.unwrapped))


def test_config_rejects_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValidationError, match="bogus"):
        TrainConfig(bogus=1)
    assert math.isfinite(TrainConfig().lr)
