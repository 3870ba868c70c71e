"""SFT training tokens per second: retain (SFTObjective + Trainer, as ``train_stage`` runs the ``sft`` method) vs
TRL's SFTTrainer, on the identical token sequences.

Data: countdown's train split, canonical answers (what retain's ``sft`` method trains on), tokenized once the
retain way (chat-templated prompt + answer + eos); TRL gets them pre-tokenized (``input_ids`` + ``completion_mask``,
``completion_only_loss=True``), so both see exactly the same sequences, right-padded to the batch's longest.
Batch 32 sequences per optimizer step, no accumulation, lr 3e-4 constant, grad-norm clip 1.0, CPU fp32.
Tokens/s counts every non-padding token of the batches trained on (prompt and completion).
``sft_tokens_per_s_compiled``: the same run with ``train.compile: true`` (torch.compile, dynamic shapes); its one-off
compile falls in the warm-up steps, which are not timed (the compile's own cost is printed by ``bench/run.py``'s wall).
"""

from __future__ import annotations

import tempfile

from common import StepClock, retain_trainer, trl_clock_callback, trl_cpu_args

BATCH = 32
LR = 3e-4


def _pairs(tok):
    from retain import tasks
    from retain.data import encode_answer, encode_prompt

    examples = tasks.get("countdown").examples("train", None, seed=0)
    return [(encode_prompt(tok, e.prompt), encode_answer(tok, e.answer)) for e in examples]


def retain_sft(warmup: int, steps: int, compile: bool = False) -> dict:
    from retain.models.loading import load_model

    model, tok = load_model("base")
    clock = StepClock()
    method = {
        "name": "sft", "batch_size": BATCH,
        "train": {"steps": warmup + steps, "lr": LR, "max_grad_norm": 1.0, "log_every": 10_000, "compile": compile},
    }
    trainer, objective = retain_trainer(model, tok, "countdown", method, on_step=clock.tick)
    tokens: list[int] = []
    original = objective.batches

    def batches(step):  # count the tokens trained on; the batches themselves are unchanged
        out = original(step)
        tokens.append(sum(int(b.attention_mask.sum()) for b in out))
        return out

    objective.batches = batches
    clock.start = __import__("time").perf_counter()
    trainer.run()
    seconds = clock.seconds(warmup)
    return {"tokens_per_s": sum(tokens[warmup:]) / seconds, "steps_per_s": steps / seconds}


def trl_sft(warmup: int, steps: int, gradient_checkpointing: bool = False) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from retain.models.loading import load_model

    model, tok = load_model("base")
    pairs = _pairs(tok)
    data = Dataset.from_dict({
        "input_ids": [p + a for p, a in pairs],
        "completion_mask": [[0] * len(p) + [1] * len(a) for p, a in pairs],
    })
    clock = StepClock()
    tokens: list[int] = []
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            completion_only_loss=True,
            packing=False,
            padding_free=False,
            max_length=None,
            **trl_cpu_args(LR, warmup + steps, gradient_checkpointing),
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[trl_clock_callback(clock)],
        )
        collate = trainer.data_collator

        def counting_collator(examples):
            batch = collate(examples)
            tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else
                          sum(len(e["input_ids"]) for e in examples))
            return batch

        trainer.data_collator = counting_collator
        clock.start = __import__("time").perf_counter()
        trainer.train()
    seconds = clock.seconds(warmup)
    return {"tokens_per_s": sum(tokens[warmup : warmup + steps]) / seconds, "steps_per_s": steps / seconds}
