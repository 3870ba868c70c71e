"""A whole continual experiment: ``retain run`` against the same experiment glued together from TRL by hand.

The experiment (embedded base model, CPU fp32, seed 0): stage 1 SFT on GeneralPoints (32 examples per step, lr
3e-4), stage 2 GRPO on Countdown (16 prompts × 8 samples, at most 24 new tokens, temperature 1, β = 0, lr 1e-4);
greedy evaluation of every column ``eval.tasks: [auto]`` names (the stage tasks, their OOD splits, the prior skills;
the same ``n`` prompts each) before the first stage and after each; after each stage the shift from the base — the
forward and reverse KL along samples of one model scored by both (Monte-Carlo and exact over the vocabulary) — and
from the previous model (the base again after stage 1: measured once); the model saved after each stage.

retain: ``run_experiment`` (what ``retain run`` calls) on that YAML, in this process; its time split into training
(and, within it, GRPO's sampling), evaluation, shift, the GRPO signal check before the GRPO stage (``preflight``:
32 training prompts x the group size sampled from the starting model, a check the TRL pipeline does not make),
saving (the model and the method state with their manifests, fsynced, then stage.json) and the rest (model load,
frozen copies, the run directory's small files) by timing wrappers around the runner's public calls.
TRL: ``SFTTrainer`` then ``GRPOTrainer`` on the same model object, the same batches, steps, lengths and learning
rates (gradient checkpointing off, as retain; the trainer settings of bench/sft.py and bench/grpo.py); evaluation by
a plain left-padded ``model.generate`` loop (batches of 256 prompts, as retain's engines), chat-templated by the
tokenizer, scored by the same task verifiers; the KLs by sampling with ``generate`` and two plain forward passes;
``save_pretrained`` after each stage.

Same work is checked: the base model's greedy evaluation must agree item by item (both are greedy on the same
weights); after training, each column's accuracy must agree within sampling noise (3 standard errors of the
difference of two binomial proportions, at least 2 items), and the training losses / rewards and KLs are reported
side by side. Throughput = experiments per hour, wall clock from the model load to the last stage saved; each side's
CPU seconds (``time.process_time``, every thread of the process) over the same span are reported beside it, the
measure that holds on a busy machine (run it with ``BENCH_THREADS=1`` there: waiting OpenMP threads spin, and a
descheduled one makes its partner's spin count as CPU time).
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common import trl_cpu_args

SFT_BATCH, SFT_LR = 32, 3e-4
PROMPTS_PER_STEP, GROUP, MAX_NEW, GRPO_LR = 16, 8, 24, 1e-4
GEN_BATCH = 256


def experiment_config(sft_steps: int, grpo_steps: int, n: int, shift_prompts: int) -> dict[str, Any]:
    return {
        "name": "bench-experiment", "model": "base", "seed": 0,
        "stages": [
            {"task": "gpoints", "steps": sft_steps,
             "method": {"name": "sft", "batch_size": SFT_BATCH, "train": {"lr": SFT_LR, "max_grad_norm": 1.0}}},
            {"task": "countdown", "steps": grpo_steps,
             "method": {"name": "grpo", "max_new_tokens": MAX_NEW,
                        "data": {"group_size": GROUP, "prompts_per_step": PROMPTS_PER_STEP, "temperature": 1.0},
                        "loss": {"beta": 0.0, "aggregation": "grpo", "scale": "group"},
                        "train": {"lr": GRPO_LR, "max_grad_norm": 1.0}}},
        ],
        "eval": {"tasks": ["auto"], "n": n},
        "shift": {"prompts": shift_prompts, "samples": 1},
    }


class Profile:
    """Seconds spent per part, wall clock (``seconds``) and CPU time of the process (``cpu``), by wrapping callables:
    ``wrap(module, name, part)`` replaces ``module.name``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def timing(self, part: str):
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start
            self.cpu[part] = self.cpu.get(part, 0.0) + time.process_time() - cpu_start

    def wrap(self, module, name: str, part: str) -> None:
        inner = getattr(module, name)

        def timed(*args, **kwargs):
            with self.timing(part):
                return inner(*args, **kwargs)

        setattr(module, name, timed)

    def split(self, total: float, cpu_total: float, rest: str, within: tuple[str, ...] = ()) -> tuple[dict, dict]:
        """(wall, CPU) seconds per part, with ``rest`` = the total less every part not ``within`` another."""
        wall, cpu = dict(self.seconds), dict(self.cpu)
        wall[rest] = total - sum(v for k, v in self.seconds.items() if k not in within)
        cpu[rest] = cpu_total - sum(v for k, v in self.cpu.items() if k not in within)
        return wall, cpu


def retain_experiment(sft_steps: int, grpo_steps: int, n: int, shift_prompts: int) -> dict:
    from retain import runner, stage_eval
    from retain.config import parse_experiment
    from retain.methods import grpo as grpo_module
    from retain.runner import run_experiment

    cfg = parse_experiment(experiment_config(sft_steps, grpo_steps, n, shift_prompts), "bench experiment")
    profile = Profile()
    profile.wrap(runner, "train_stage", "training")
    profile.wrap(runner, "evaluate_row", "evaluation")
    profile.wrap(stage_eval.StartingRow, "write", "evaluation")  # the row before the first stage
    profile.wrap(runner, "measure_shift", "shift")
    profile.wrap(runner, "signal_watch", "GRPO signal check (before the stage)")
    profile.wrap(runner, "finish_stage", "saving (model, state, manifests, stage.json)")
    make_engine = grpo_module.make_engine

    def timed_engine(*args, **kwargs):  # GRPO's rollouts: sampling inside training
        engine = make_engine(*args, **kwargs)
        generate = engine.generate

        def timed_generate(*a, **k):
            with profile.timing("sampling (within training)"):
                return generate(*a, **k)

        engine.generate = timed_generate
        return engine

    grpo_module.make_engine = timed_engine
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        results = run_experiment(cfg, Path(tmp) / "run")
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        steps = [__import__("json").loads(line) for line in (Path(tmp) / "run" / "steps.jsonl").read_text().splitlines()]
    parts, cpu_parts = profile.split(seconds, cpu_seconds, "the rest (model load, copies, run directory)",
                                     within=("sampling (within training)",))
    columns = results["eval_tasks"]
    return {
        "seconds": seconds, "cpu_seconds": cpu_seconds, "profile": parts, "profile_cpu": cpu_parts, "columns": columns,
        "accuracy": [dict(zip(columns, row)) for row in results["matrix"]], "n": n,
        "forward_kl": results["shift"]["forward_kl"], "forward_kl_exact": results["shift"]["forward_kl_exact"],
        "reverse_kl_exact": results["shift"]["reverse_kl_exact"],
        "sft_loss": _mean(r["loss"] for r in steps if r.get("stage") == 1 and "loss" in r),
        "grpo_reward": _mean(r["reward"] for r in steps if r.get("stage") == 2 and "reward" in r),
        "base_correct": _base_correct(results),
    }


def _base_correct(results: dict) -> dict[str, str]:
    first = results["trajectories"][0][0]["row"]
    return {column: cell["correct"] for column, cell in first.items()}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# --- the TRL pipeline, written the way a user of TRL and transformers would --------------------------------------
def _chat_batch(tok, prompts: list[str]):
    tok.padding_side = "left"
    return tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
                                   padding=True, return_tensors="pt", return_dict=True)


@torch.no_grad()
def generate_eval(model, tok, column: str, n: int) -> tuple[float, str]:
    """Greedy accuracy of one column by plain ``model.generate``, and the per-item correctness string."""
    from retain import tasks

    name, _, split = column.partition("@")
    task = tasks.get(name)
    examples = task.examples(split or "test", n, seed=0)
    max_new = getattr(task, "max_new_tokens", 24)
    model.eval()
    correct = []
    for start in range(0, len(examples), GEN_BATCH):
        chunk = examples[start : start + GEN_BATCH]
        enc = _chat_batch(tok, [e.prompt for e in chunk])
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += [task.is_correct(e.prompt, t, e.answer) for e, t in zip(chunk, texts)]
    return sum(correct) / len(correct), "".join("1" if c else "0" for c in correct)


@torch.no_grad()
def sampled_kl(sampler, other, tok, prompts: list[str], max_new: int, seed: int) -> dict[str, float]:
    """KL(sampler ‖ other) along one temperature-1 sample per prompt: Monte-Carlo and exact, per sequence."""
    torch.manual_seed(seed)
    enc = _chat_batch(tok, prompts)
    out = sampler.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    width = enc["input_ids"].shape[1]
    completion = out[:, width:]
    ended_before = (completion == tok.eos_token_id).int().cumsum(-1) - (completion == tok.eos_token_id).int()
    keep = ended_before == 0  # every completion token up to and including the first eos
    attention = torch.cat([enc["attention_mask"], keep.long()], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logp_s = torch.log_softmax(sampler(input_ids=out, attention_mask=attention, position_ids=positions).logits, -1)
    logp_o = torch.log_softmax(other(input_ids=out, attention_mask=attention, position_ids=positions).logits, -1)
    logp_s, logp_o = logp_s[:, width - 1 : -1], logp_o[:, width - 1 : -1]
    taken = completion.unsqueeze(-1)
    mc = (logp_s.gather(-1, taken) - logp_o.gather(-1, taken)).squeeze(-1) * keep
    exact = (logp_s.exp() * (logp_s - logp_o)).sum(-1) * keep
    return {"per_sequence": float(mc.sum(-1).mean()), "exact_per_sequence": float(exact.sum(-1).mean())}


def _logged(args: dict[str, Any], steps: int) -> dict[str, Any]:
    """TRL's arguments logging every 10 steps, as retain does (the losses and rewards the comparison reports)."""
    return {**args, "logging_strategy": "steps", "logging_steps": min(10, steps)}


def trl_experiment(sft_steps: int, grpo_steps: int, n: int, shift_prompts: int) -> dict:
    import copy

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from retain import tasks
    from retain.config import parse_experiment
    from retain.data import encode_answer, encode_prompt
    from retain.models.loading import load_model

    columns = parse_experiment(experiment_config(sft_steps, grpo_steps, n, shift_prompts)).eval_tasks()
    profile = Profile()
    accuracy, kl_fwd, kl_fwd_exact, kl_rev_exact, sft_losses, rewards = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as out:
        start, cpu_start = time.perf_counter(), time.process_time()
        model, tok = load_model("base")
        base = copy.deepcopy(model).eval()

        def evaluate_all() -> dict[str, tuple[float, str]]:
            with profile.timing("evaluation"):
                return {c: generate_eval(model, tok, c, n) for c in columns}

        def shift(previous, task_name: str, stage: int) -> None:
            with profile.timing("shift"):
                prompts = [e.prompt for e in tasks.get(task_name).examples("test", shift_prompts, seed=0)]
                forward = sampled_kl(base, model, tok, prompts, 24, 1000 * stage)
                reverse = sampled_kl(model, base, tok, prompts, 24, 1000 * stage + 1)
                if previous is not None:  # stage 2: the same two measurements from the model before it
                    sampled_kl(previous, model, tok, prompts, 24, 1000 * stage + 2)
                    sampled_kl(model, previous, tok, prompts, 24, 1000 * stage + 3)
            kl_fwd.append(forward["per_sequence"])
            kl_fwd_exact.append(forward["exact_per_sequence"])
            kl_rev_exact.append(reverse["exact_per_sequence"])

        row0 = evaluate_all()
        accuracy.append({c: a for c, (a, _) in row0.items()})

        # stage 1: SFTTrainer on GeneralPoints' canonical answers, pre-tokenized exactly as retain trains them
        with profile.timing("training"):
            pairs = [(encode_prompt(tok, e.prompt), encode_answer(tok, e.answer))
                     for e in tasks.get("gpoints").examples("train", None, seed=0)]
            data = Dataset.from_dict({"input_ids": [p + a for p, a in pairs],
                                      "completion_mask": [[0] * len(p) + [1] * len(a) for p, a in pairs]})
            args = SFTConfig(output_dir=f"{out}/sft", per_device_train_batch_size=SFT_BATCH,
                             gradient_accumulation_steps=1, completion_only_loss=True, packing=False, max_length=None,
                             **_logged(trl_cpu_args(SFT_LR, sft_steps), sft_steps))
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
            trainer.train()
            sft_losses += [r["loss"] for r in trainer.state.log_history if "loss" in r]
            model = trainer.model
        row = evaluate_all()
        accuracy.append({c: a for c, (a, _) in row.items()})
        shift(None, "gpoints", 1)
        with profile.timing("I/O"):
            model.save_pretrained(f"{out}/stage1", safe_serialization=True)
            tok.save_pretrained(f"{out}/stage1")
        previous = copy.deepcopy(model).eval()

        # stage 2: GRPOTrainer on Countdown, conversational prompts under the same chat template
        with profile.timing("training"):
            task = tasks.get("countdown")
            reward = task.as_reward_fn()
            prompts = [e.prompt for e in task.examples("train", None, seed=0)]
            data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
            args = GRPOConfig(output_dir=f"{out}/grpo", per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,
                              gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=MAX_NEW,
                              temperature=1.0, top_k=0, top_p=1.0, beta=0.0, num_iterations=1, loss_type="grpo",
                              scale_rewards="group", **_logged(trl_cpu_args(GRPO_LR, grpo_steps), grpo_steps))
            trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                                  processing_class=tok)
            trainer.train()
            rewards += [r["reward"] for r in trainer.state.log_history if "reward" in r]
            model = trainer.model
        row = evaluate_all()
        accuracy.append({c: a for c, (a, _) in row.items()})
        shift(previous, "countdown", 2)
        with profile.timing("I/O"):
            model.save_pretrained(f"{out}/stage2", safe_serialization=True)
            tok.save_pretrained(f"{out}/stage2")
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    parts, cpu_parts = profile.split(seconds, cpu_seconds, "model load and the rest")
    return {
        "seconds": seconds, "cpu_seconds": cpu_seconds, "profile": parts, "profile_cpu": cpu_parts, "columns": columns, "accuracy": accuracy,
        "n": n,
        "forward_kl": kl_fwd, "forward_kl_exact": kl_fwd_exact, "reverse_kl_exact": kl_rev_exact,
        "sft_loss": _mean(sft_losses), "grpo_reward": _mean(rewards),
        "base_correct": {c: s for c, (_, s) in row0.items()},
    }


def agreement(ours: dict, ref: dict) -> dict[str, Any]:
    """Whether the two pipelines did the same experiment: the base row item by item, later rows within noise."""
    n = ours["n"]
    base_disagree = {c: sum(a != b for a, b in zip(ours["base_correct"][c], ref["base_correct"][c]))
                     for c in ours["columns"]}
    worst, outside = 0.0, []
    for stage, (row_a, row_b) in enumerate(zip(ours["accuracy"], ref["accuracy"])):
        for column in ours["columns"]:
            a, b = row_a[column], row_b[column]
            p = (a + b) / 2
            tolerance = max(3 * math.sqrt(max(p * (1 - p), 1 / n) * 2 / n), 2 / n)
            worst = max(worst, abs(a - b) / tolerance)
            if abs(a - b) > tolerance:
                outside.append(f"stage {stage} {column}: {a:.3f} vs {b:.3f} (tolerance {tolerance:.3f})")
    return {"base_items_disagreeing": base_disagree, "worst_gap_over_tolerance": worst, "outside_tolerance": outside,
            "agree": not outside and sum(base_disagree.values()) <= max(1, len(ours["columns"]) * n // 100)}
