"""SFT on data whose lengths vary: real target tokens per second, retain vs TRL's SFTTrainer.

Data: 2000 (prompt, answer) pairs of random printable text, each part's length log-uniform in 5-200 tokens (the
embedded tokenizer is one token per character; a right-skewed spread, as real SFT sets are: most examples short,
a tail of long ones), written as a jsonl file and trained as a dataset task through retain's ``sft`` method — the
path a user's own file takes. TRL gets the same pairs pre-tokenized the retain way (chat-templated prompt + answer +
eos, ``completion_mask`` on the answer), so both train on the same token sequences.

Both: 32 examples per optimizer step, no accumulation, lr 3e-4 constant, grad-norm clip 1.0, CPU fp32, loss =
mean −log π over the step's answer tokens (TRL's ``completion_only_loss``; retain's reduction). retain draws each
step's 32 examples uniformly, TRL walks a shuffled epoch, so single steps differ but the loss is the same in
expectation: both report the mean loss of the timed steps (evidence of equal work).

Real target tokens/s counts the answer tokens (eos included) trained on, never padding. retain runs with
``micro_batch_tokens`` (length bucketing: each step's sequences sorted by length and cut into micro-batches of at
most that many padded tokens, where padding would cost more than one more micro-batch — ``length_buckets``: 1.12
padded positions per real token on this data, 5.6 micro-batches per step; filling each micro-batch up to the
budget, the rule before, gave 1.72 and ran at half of group_by_length's rate); TRL runs at its defaults (gradient checkpointing on) and with each of its own options
that cut padding on CPU — ``train_sampling_strategy="group_by_length"`` and ``padding_free=True`` (one flattened row
per batch, position ids restarting per example) — with checkpointing off; the best of those is the reference.
``group_by_length`` sorts megabatches of 50 batches longest first, so a run shorter than ~50 timed steps times
mostly its longest (least padded) batches and overstates its tokens/s: the full bench times 50 steps, ``--quick``
only 3 (its target tokens per step, reported beside the rate, shows the bias).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path

from common import StepClock, retain_trainer, trl_clock_callback, trl_cpu_args

BATCH = 32
LR = 3e-4
EXAMPLES = 2000
MIN_LEN, MAX_LEN = 5, 200
MICRO_BATCH_TOKENS = 4096
ALPHABET = "abcdefghijklmnopqrstuvwxyz      0123456789.,"
TRL_VARIANTS = {
    "trl_defaults": {"gradient_checkpointing": True},
    "trl_group_by_length": {"train_sampling_strategy": "group_by_length"},
    "trl_padding_free": {"padding_free": True},
}


def _length(rng: random.Random) -> int:
    return round(math.exp(rng.uniform(math.log(MIN_LEN), math.log(MAX_LEN))))


def write_data(path: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(EXAMPLES):
            prompt = "".join(rng.choice(ALPHABET) for _ in range(_length(rng))).strip() or "x"
            answer = "".join(rng.choice(ALPHABET) for _ in range(_length(rng) - 1)).strip() or "y"
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    return path


def retain_sft_varlen(warmup: int, steps: int, micro_batch_tokens: int | None = MICRO_BATCH_TOKENS) -> dict:
    from retain.models.loading import load_model

    model, tok = load_model("base")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "varlen.jsonl")
        clock = StepClock()
        method = {
            "name": "sft", "batch_size": BATCH, "micro_batch_tokens": micro_batch_tokens,
            "train": {"steps": warmup + steps, "lr": LR, "max_grad_norm": 1.0, "log_every": 10_000},
        }
        trainer, objective = retain_trainer(model, tok, str(data), method, on_step=clock.tick)
        targets, losses = [], []
        original_batches, original_loss = objective.batches, objective.loss

        def batches(step):  # count the target tokens trained on; the batches themselves are unchanged
            out = original_batches(step)
            targets.append(sum(b.num_target_tokens for b in out))
            losses.append(0.0)
            return out

        def loss(model, batch):  # the step's loss is the sum of its micro-batches' shares
            value, metrics = original_loss(model, batch)
            losses[-1] += float(value.detach())
            return value, metrics

        objective.batches, objective.loss = batches, loss
        clock.start = time.perf_counter()
        trainer.run()
    seconds = clock.seconds(warmup)
    timed = losses[warmup:]
    return {"tokens_per_s": sum(targets[warmup:]) / seconds, "steps_per_s": steps / seconds,
            "loss": sum(timed) / len(timed), "target_tokens_per_step": sum(targets[warmup:]) / steps}


def trl_sft_varlen(warmup: int, steps: int, variant: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from retain.data import encode_answer, encode_prompt
    from retain.models.loading import load_model

    model, tok = load_model("base")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [json.loads(line) for line in write_data(Path(tmp) / "varlen.jsonl").read_text().splitlines()]
    pairs = [(encode_prompt(tok, r["prompt"]), encode_answer(tok, r["answer"])) for r in rows]
    data = Dataset.from_dict({
        "input_ids": [p + a for p, a in pairs],
        "completion_mask": [[0] * len(p) + [1] * len(a) for p, a in pairs],
    })
    options = dict(TRL_VARIANTS[variant])
    gradient_checkpointing = options.pop("gradient_checkpointing", False)
    clock = StepClock()
    targets: list[int] = []
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
            completion_only_loss=True, packing=False, max_length=None,
            **options, **trl_cpu_args(LR, warmup + steps, gradient_checkpointing),
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             callbacks=[trl_clock_callback(clock)])
        collate = trainer.data_collator

        def counting_collator(examples):
            targets.append(sum(sum(label != -100 for label in e["labels"]) for e in examples))  # TRL's labels
            return collate(examples)

        trainer.data_collator = counting_collator
        compute_loss = trainer.compute_loss

        def recording_loss(*args, **kwargs):
            value = compute_loss(*args, **kwargs)
            losses.append(float((value[0] if isinstance(value, tuple) else value).detach()))
            return value

        trainer.compute_loss = recording_loss
        clock.start = time.perf_counter()
        trainer.train()
    seconds = clock.seconds(warmup)
    timed = losses[warmup : warmup + steps]
    return {"tokens_per_s": sum(targets[warmup : warmup + steps]) / seconds, "steps_per_s": steps / seconds,
            "loss": sum(timed) / len(timed), "target_tokens_per_step": sum(targets[warmup : warmup + steps]) / steps}
