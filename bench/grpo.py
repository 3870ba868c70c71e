"""GRPO optimizer steps per second: retain (GRPOObjective + Trainer, as ``train_stage`` runs it) vs TRL's GRPOTrainer.

Same embedded base model (a fresh copy each), same countdown train prompts, 16 prompts × 8 completions per step,
at most 24 new tokens, temperature 1 (no top-k/top-p), β = 0, one update per rollout batch (μ = 1), the ``grpo``
loss aggregation and group-scaled advantages, lr 1e-4, grad-norm clip 1.0, CPU fp32, no logging/eval/saving.
TRL gets the prompts in conversational form and applies the same chat template retain does, so both sample from
the same token prompts. Each warms up, then times its next ``steps`` optimizer steps (rollout included).
"""

from __future__ import annotations

import tempfile

from common import StepClock, retain_trainer, trl_clock_callback, trl_cpu_args

PROMPTS_PER_STEP = 16
GROUP = 8
MAX_NEW = 24
TEMPERATURE = 1.0
LR = 1e-4


def retain_grpo(warmup: int, steps: int) -> dict:
    from retain.models.loading import load_model

    model, tok = load_model("base")
    clock = StepClock()
    method = {
        "name": "grpo",
        "data": {"group_size": GROUP, "prompts_per_step": PROMPTS_PER_STEP, "temperature": TEMPERATURE},
        "loss": {"beta": 0.0, "aggregation": "grpo", "scale": "group"},
        "max_new_tokens": MAX_NEW,
        "train": {"steps": warmup + steps, "lr": LR, "max_grad_norm": 1.0, "log_every": 10_000},
    }
    lengths: list[float] = []
    trainer, objective = retain_trainer(model, tok, "countdown", method, on_step=clock.tick)
    original = objective._rollout

    def rollout(step):  # record the mean completion length (for the report), nothing else changes
        out = original(step)
        lengths.append(out[0].metrics["completion_len"])
        return out

    objective._rollout = rollout
    clock.start = __import__("time").perf_counter()
    trainer.run()
    return {"steps_per_s": clock.rate(warmup), "completion_len": sum(lengths[warmup:]) / len(lengths[warmup:])}


def trl_grpo(warmup: int, steps: int, gradient_checkpointing: bool = False) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from retain import tasks
    from retain.models.loading import load_model

    model, tok = load_model("base")
    task = tasks.get("countdown")
    prompts = [e.prompt for e in task.examples("train", None, seed=0)]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    clock = StepClock()
    lengths: list[float] = []
    reward = task.as_reward_fn()

    def reward_fn(prompts, completions, completion_ids, **kw):  # TRL passes completion_ids: record their length
        lengths.append(sum(len(c) for c in completion_ids) / len(completion_ids))
        return reward(prompts, completions, **kw)

    reward_fn.__name__ = reward.__name__
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,
            gradient_accumulation_steps=1,
            num_generations=GROUP,
            max_completion_length=MAX_NEW,
            temperature=TEMPERATURE,
            top_k=0,
            top_p=1.0,
            beta=0.0,
            num_iterations=1,
            loss_type="grpo",
            scale_rewards="group",
            **trl_cpu_args(LR, warmup + steps, gradient_checkpointing),
        )
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward_fn, args=args, train_dataset=data, processing_class=tok,
            callbacks=[trl_clock_callback(clock)],
        )
        clock.start = __import__("time").perf_counter()
        trainer.train()
    return {"steps_per_s": clock.rate(warmup), "completion_len": sum(lengths[warmup:]) / len(lengths[warmup:])}
