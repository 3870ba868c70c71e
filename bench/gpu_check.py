"""The GPU check's measurements (run by bench/gpu_check.sh): one JSON line per measurement on stdout.

``python bench/gpu_check.py [--cpu]`` runs, each precision in its own process (accelerate fixes the mixed precision
once per process): for the embedded model and a randomly initialised model of Qwen2.5-0.5B's shape (built from a
config; on ``--cpu`` a scaled-down shape, named as such), an SFT stage and a GRPO stage through retain's Trainer
with the HF engine, in fp32 and under bf16 autocast (fp32 weights): SFT's first-step losses (same weights, same
batch) within 5%, GRPO's losses finite (its first loss is 0 by construction, its rollouts sampled under each
precision), gradient norms reported; peak GPU memory;
SFT tokens/s and GRPO steps/s against TRL's SFTTrainer and GRPOTrainer on the same model and batch (bf16 on a GPU,
fp32 on ``--cpu``, where only the embedded model runs TRL's trainers, to keep the smoke test short); then ``retain run`` end to end on a two-stage config. The last line is ``{"check": "summary"}``
with ``ok`` and the failed checks; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOSS_RTOL = 0.05  # bf16 autocast against fp32: first-step losses (same weights, same batch) within 5%

# model -> Qwen2 config fields; "qwen2.5-0.5b-shape" is Qwen2.5-0.5B's architecture (494M parameters)
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True, rms_norm_eps=1e-6)
QWEN_SCALED = dict(QWEN_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)


def sizes(cpu: bool) -> dict:
    if cpu:  # a smoke test: every path once, tiny
        return {"sft_batch": 4, "sft_steps": 2, "prompts": 2, "group": 2, "max_new": 8, "grpo_steps": 1, "warmup": 1,
                "trl_steps": 2, "run_steps": 1, "run_n": 4}
    return {"sft_batch": 32, "sft_steps": 20, "prompts": 16, "group": 8, "max_new": 32, "grpo_steps": 5, "warmup": 2,
            "trl_steps": 12, "run_steps": 10, "run_n": 64}


EMITTED: list[dict] = []  # every line this process printed, for the summary


def emit(record: dict) -> None:
    EMITTED.append(record)
    print(json.dumps(record), flush=True)


def build_model(name: str, cpu: bool):
    """(model on the CPU in fp32, tokenizer, description): the embedded model, or a random Qwen2 of a fixed shape."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from retain.models.loading import load_model

    model, tok = load_model("base")
    if name == "embedded":
        return model, tok, {"model": name, "parameters": sum(p.numel() for p in model.parameters())}
    shape = QWEN_SCALED if cpu else QWEN_05B
    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    return model, tok, {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
                        "scaled_down": cpu, **({"note": "--cpu: a scaled-down Qwen2 shape, not 0.5B"} if cpu else {})}


class Clock:
    def __init__(self) -> None:
        self.ends: list[float] = []

    def tick(self, *_) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def rate(self, warmup: int) -> float:
        return (len(self.ends) - warmup) / (self.ends[-1] - self.ends[warmup - 1])


def retain_stage(model, tok, method: dict, task: str, device: str, precision: str, warmup: int) -> dict:
    """One stage through retain's Trainer (as ``train_stage`` builds it), timed per step; the first step's loss."""
    import torch

    from retain import tasks
    from retain.distributed import make_accelerator
    from retain.methods.build import build_objective
    from retain.models.adapters import frozen_copy
    from retain.methods.config import method_config
    from retain.methods.stage import MethodState, StageContext
    from retain.train import Trainer

    cfg = method_config(method)
    model.to(device)
    ctx = StageContext(model=model, reference=frozen_copy(model), tokenizer=tok, task_name=task,
                       task=tasks.get(task), stage_index=0, seen_tasks=[], seed=0, state=MethodState(), engine="hf")
    objective = build_objective(cfg, ctx)
    tokens: list[int] = []
    if hasattr(objective, "sampler"):  # SFT: count the non-padding tokens trained on
        batches = objective.batches

        def counted(step):
            out = batches(step)
            tokens.append(sum(int(b.attention_mask.sum()) for b in out))
            return out

        objective.batches = counted
    records: list[dict] = []
    clock = Clock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model, objective, cfg.train.model_copy(update={"log_every": 1}), log=records.append,
                      accelerator=make_accelerator(device, "no" if precision == "fp32" else precision),
                      on_step=clock.tick)
    clock.ends.append(time.perf_counter())
    trainer.run()
    clock.ends.pop(0)
    out = {"loss_first": records[0]["loss"], "loss_mean": sum(r["loss"] for r in records) / len(records),
           "grad_norm_first": records[0].get("grad_norm"), "finite": all(_finite(r["loss"]) for r in records),
           "steps_per_s": clock.rate(warmup) if len(clock.ends) > warmup else None}
    if tokens:
        span = clock.ends[-1] - clock.ends[warmup - 1]
        out["tokens_per_s"] = sum(tokens[warmup:]) / span
    if "reward" in records[0]:
        out["reward_mean"] = sum(r.get("reward", 0.0) for r in records) / len(records)
    if torch.cuda.is_available():
        out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def trl_args(lr: float, steps: int, cpu: bool, precision: str) -> dict:
    return dict(learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=steps, use_cpu=cpu,
                bf16=precision == "bf16", fp16=False, gradient_checkpointing=False, logging_strategy="no",
                save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                seed=0)


def trl_sft(model, tok, s: dict, cpu: bool, precision: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from retain import tasks
    from retain.data import encode_answer, encode_prompt

    pairs = [(encode_prompt(tok, e.prompt), encode_answer(tok, e.answer))
             for e in tasks.get("countdown").examples("train", None, seed=0)]
    data = Dataset.from_dict({"input_ids": [p + a for p, a in pairs],
                              "completion_mask": [[0] * len(p) + [1] * len(a) for p, a in pairs]})
    clock, tokens = Clock(), []

    class Tick(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            clock.tick()

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=s["sft_batch"], completion_only_loss=True,
                         packing=False, max_length=None, **trl_args(3e-4, s["trl_steps"], cpu, precision))
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Tick()])
        collate = trainer.data_collator

        def counting(examples):
            batch = collate(examples)
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting
        with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its summary: stdout is for JSON lines
            trainer.train()
    w = s["warmup"]
    return {"tokens_per_s": sum(tokens[w : len(clock.ends)]) / (clock.ends[-1] - clock.ends[w - 1]),
            "steps_per_s": clock.rate(w)}


def trl_grpo(model, tok, s: dict, cpu: bool, precision: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from retain import tasks

    task = tasks.get("countdown")
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": e.prompt}]
                                         for e in task.examples("train", None, seed=0)]})
    clock = Clock()

    class Tick(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            clock.tick()

    steps = s["grpo_steps"] + s["warmup"]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=s["prompts"] * s["group"],
                          num_generations=s["group"], max_completion_length=s["max_new"], temperature=1.0, top_k=0,
                          top_p=1.0, beta=0.0, num_iterations=1, loss_type="grpo", scale_rewards="group",
                          **trl_args(1e-4, steps, cpu, precision))
        trainer = GRPOTrainer(model=model, reward_funcs=task.as_reward_fn(), args=args, train_dataset=data,
                              processing_class=tok, callbacks=[Tick()])
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
    return {"steps_per_s": clock.rate(s["warmup"])}


def precision_part(precision: str, cpu: bool, trl: bool) -> None:
    """Every model through an SFT and a GRPO stage at one precision (and TRL's trainers, when ``trl``)."""
    import torch

    device = "cpu" if cpu else "cuda"
    s = sizes(cpu)
    for name in ("embedded", "qwen2.5-0.5b-shape"):
        initial, tok, about = build_model(name, cpu)
        sft = {"name": "sft", "batch_size": s["sft_batch"],
               "train": {"steps": s["sft_steps"] + s["warmup"], "lr": 3e-4, "max_grad_norm": 1.0}}
        grpo = {"name": "grpo", "max_new_tokens": s["max_new"],
                "data": {"group_size": s["group"], "prompts_per_step": s["prompts"], "temperature": 1.0},
                "loss": {"beta": 0.0}, "train": {"steps": s["grpo_steps"] + s["warmup"], "lr": 1e-4}}
        for stage, method in (("sft", sft), ("grpo", grpo)):
            model = copy.deepcopy(initial)
            emit({"check": f"retain_{stage}", **about, "precision": precision, "device": device,
                  **retain_stage(model, tok, method, "countdown", device, precision, s["warmup"])})
            del model
            if trl and not (cpu and name != "embedded"):  # the smoke test runs TRL's trainers on one model
                model = copy.deepcopy(initial).to(device)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                run = trl_sft if stage == "sft" else trl_grpo
                result = run(model, tok, s, cpu, precision)
                if torch.cuda.is_available():
                    result["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
                emit({"check": f"trl_{stage}", **about, "precision": precision, "device": device, **result})
                del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def env_part(cpu: bool) -> bool:
    import torch

    record = {"check": "torch", "torch": torch.__version__, "cuda_build": torch.version.cuda,
              "cuda_available": torch.cuda.is_available(), "mode": "cpu smoke test" if cpu else "gpu"}
    if torch.cuda.is_available():
        record["device_name"] = torch.cuda.get_device_name(0)
        record["bf16_supported"] = torch.cuda.is_bf16_supported()
    for module in ("transformers", "accelerate", "peft", "trl", "pydantic", "retain"):
        try:
            record[module] = __import__(module).__version__
        except ImportError:
            record[module] = None
    record["ok"] = cpu or torch.cuda.is_available()
    emit(record)
    return record["ok"]


RUN_CONFIG = "gpu-check.yaml"


def start_run_part(cpu: bool, tmp: str) -> tuple[subprocess.Popen, float, dict]:
    """Start ``retain run`` end to end: the CLI on a two-stage config (SFT on gpoints, GRPO on countdown), HF
    engine, in ``tmp``; ``finish_run_part`` reads its result."""
    import yaml

    s = sizes(cpu)
    config = {"name": "gpu-check", "model": "base", "seed": 0, "engine": "hf", "device": "cpu" if cpu else "cuda",
              "mixed_precision": "no" if cpu else "bf16",
              "stages": [{"task": "gpoints", "steps": s["run_steps"], "method": {"name": "sft", "batch_size": 8}},
                         {"task": "countdown", "steps": s["run_steps"],
                          "method": {"name": "grpo", "data": {"prompts_per_step": 4, "group_size": 4}}}],
              "eval": {"tasks": ["gpoints", "countdown"], "n": s["run_n"]}, "shift": {"prompts": s["run_n"]}}
    path = Path(tmp) / RUN_CONFIG
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "retain.cli", "run", str(path), "--out", f"{tmp}/run", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, time.perf_counter(), config


def finish_run_part(started: tuple[subprocess.Popen, float, dict], tmp: str) -> dict:
    proc, start, config = started
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    results = Path(tmp) / "run" / "results.json"
    ok = proc.returncode == 0 and results.exists()
    record = {"check": "retain_run", "ok": ok, "seconds": round(seconds, 2), "device": config["device"],
              "mixed_precision": config["mixed_precision"]}
    if ok:
        data = json.loads(results.read_text())
        record["matrix"] = data["matrix"]
        record["forward_kl"] = data["shift"]["forward_kl"]
    else:
        record["error"] = (stderr or stdout)[-2000:]
    return record


def summarize(lines: list[dict], cpu: bool) -> list[dict]:
    """The comparisons across processes: bf16 against fp32 losses, retain against TRL."""
    out = []
    by = {(r["check"], r.get("model"), r.get("precision")): r for r in lines}
    trl_precision = "fp32" if cpu else "bf16"
    for model in ("embedded", "qwen2.5-0.5b-shape"):
        for stage in ("sft", "grpo"):
            fp32, bf16 = by.get((f"retain_{stage}", model, "fp32")), by.get((f"retain_{stage}", model, "bf16"))
            if fp32 and bf16:
                a, b = fp32["loss_first"], bf16["loss_first"]
                record = {"check": f"{stage}_bf16_vs_fp32", "model": model, "loss_fp32": a, "loss_bf16": b,
                          "grad_norm_fp32": fp32["grad_norm_first"], "grad_norm_bf16": bf16["grad_norm_first"]}
                if stage == "sft":  # the same weights and batch: the first losses differ by bf16 rounding only
                    record["rel_diff"] = abs(a - b) / max(abs(a), 1e-12)
                    record["ok"] = record["rel_diff"] <= LOSS_RTOL and fp32["finite"] and bf16["finite"]
                else:  # GRPO's first loss is 0 by construction (ratio 1, zero-mean advantages) and its rollouts are
                    # sampled under each precision: what must hold is that it trains without non-finite values
                    record["ok"] = fp32["finite"] and bf16["finite"]
                out.append(record)
            ours, ref = by.get((f"retain_{stage}", model, trl_precision)), by.get((f"trl_{stage}", model, trl_precision))
            if ours and ref:
                key = "tokens_per_s" if stage == "sft" else "steps_per_s"
                if ours.get(key) and ref.get(key):
                    out.append({"check": f"{stage}_vs_trl", "model": model, "precision": trl_precision, "unit": key,
                                "retain": ours[key], "trl": ref[key], "ratio": ours[key] / ref[key], "ok": True})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="smoke test on the CPU, tiny sizes")
    parser.add_argument("--part", default="", help="(internal) one precision in this process: fp32 or bf16")
    parser.add_argument("--trl", action="store_true", help="(internal) also TRL's trainers in this part")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu:  # one thread: a smoke test on a shared machine must not stall on thread barriers
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(HERE))
    from common import quiet

    quiet()
    if args.part:
        precision_part(args.part, args.cpu, args.trl)
        return
    if not env_part(args.cpu):
        emit({"check": "summary", "ok": False, "failed": ["torch: no CUDA device (use --cpu for the smoke test)"]})
        sys.exit(1)
    failed: list[str] = []
    trl_precision = "fp32" if args.cpu else "bf16"
    # fp32 in this process (one interpreter start less: the CPU smoke test stays short), bf16 in its own process
    # (accelerate fixes the mixed precision once per process). On --cpu the bf16 part and ``retain run`` start first
    # and run beside the fp32 part (one thread each: the smoke test's time is the longest part's); on a GPU one after
    # the other, so no part's timings share the device
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "bf16"] + (["--cpu"] if args.cpu else [])
    cmd += ["--trl"] if trl_precision == "bf16" else []
    start_bf16 = lambda: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = start_bf16() if args.cpu else None
        run = start_run_part(args.cpu, tmp) if args.cpu else None
        try:
            precision_part("fp32", args.cpu, trl=trl_precision == "fp32")
        except Exception as err:  # reported as a failed check; the other checks still run
            failed.append(f"fp32 part: {type(err).__name__}: {err}")
            emit({"check": "fp32_part", "ok": False, "error": f"{type(err).__name__}: {err}"})
        bf16 = bf16 or start_bf16()
        stdout, stderr = bf16.communicate()
        for line in stdout.splitlines():
            if line.startswith('{"check"'):
                emit(json.loads(line))
        if bf16.returncode != 0:
            failed.append(f"bf16 part (exit {bf16.returncode}): {stderr.strip().splitlines()[-1:]}")
            emit({"check": "bf16_part", "ok": False, "error": stderr[-2000:]})
        lines = list(EMITTED)
        for record in summarize(lines, args.cpu):
            emit(record)
            if not record["ok"]:
                failed.append(f"{record['check']} {record['model']}")
        record = finish_run_part(run or start_run_part(args.cpu, tmp), tmp)
    emit(record)
    if not record["ok"]:
        failed.append("retain_run")
    emit({"check": "summary", "ok": not failed, "failed": failed})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
