"""A/B of ``retain.models.fused``: one training step (forward + cross-entropy + backward, no optimizer) unfused vs
fused, interleaved in one process on the same model object (``fuse``/``unfuse`` swap classes, nothing else).

Workloads: the embedded ``base`` model on a batch of 32 countdown SFT sequences (built as ``bench/sft.py`` does:
chat-templated prompt + answer + eos, right-padded, labels only on the answer, forward with ``input_ids`` only as
retain's trainer does), and the ``small`` preset (random init) on 128 x 64 random tokens. Each round runs A then B
(the order alternates between rounds) for ``--steps`` steps each; medians over rounds of the wall time and of the
CPU time (``time.thread_time`` at 1 thread, which leaves out time the process spent descheduled on a loaded
machine; ``time.process_time`` at 2 threads, which also counts OpenMP spinning). Then a ``torch.profiler`` table of
both variants, sorted by self CPU time.

    HF_HUB_OFFLINE=1 python bench/fused_ab.py [--models base,small] [--threads 1,2] [--rounds 9] [--no-profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MATMUL_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
}


def base_workload():
    from retain import tasks
    from retain.data import collate, encode_answer, encode_prompt
    from retain.models.loading import load_model

    model, tok = load_model("base")
    examples = tasks.get("countdown").examples("train", None, seed=0)[:32]
    batch = collate([(encode_prompt(tok, e.prompt), encode_answer(tok, e.answer)) for e in examples], tok.pad_token_id)
    return model, batch.input_ids, batch.labels


def small_workload():
    from retain.models.tiny import make_model
    from retain.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = make_model("small", tok)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tok), (128, 64), generator=gen)
    return model, ids, ids.clone()


WORKLOADS = {"base": base_workload, "small": small_workload}


def step(model, ids, labels) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    loss.backward()


def ab(model, ids, labels, threads: int, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    from retain.models.fused import fuse, unfuse

    torch.set_num_threads(threads)
    cpu_clock = time.thread_time if threads == 1 else time.process_time
    variants = {"unfused": unfuse, "fused": fuse}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for switch in variants.values():  # warm-up both
        switch(model)
        step(model, ids, labels)
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            variants[name](model)
            w0, c0 = time.perf_counter(), cpu_clock()
            for _ in range(steps):
                step(model, ids, labels)
            wall[name].append((time.perf_counter() - w0) / steps)
            cpu[name].append((cpu_clock() - c0) / steps)
    unfuse(model)
    out = {}
    for name in variants:
        out[name] = {"wall_ms": 1e3 * statistics.median(wall[name]), "cpu_ms": 1e3 * statistics.median(cpu[name]),
                     "wall_min_ms": 1e3 * min(wall[name]), "cpu_min_ms": 1e3 * min(cpu[name])}
    return out


def profile(model, ids, labels, threads: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from retain.models.fused import fuse, unfuse

    torch.set_num_threads(threads)
    for name, switch in (("unfused", unfuse), ("fused", fuse)):
        switch(model)
        step(model, ids, labels)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step(model, ids, labels)
        averages = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in averages)
        matmul = sum(e.self_cpu_time_total for e in averages if e.key in MATMUL_OPS)
        print(f"\n--- profile: {name}, {threads} thread(s), 2 steps; matmul + SDPA kernels "
              f"{100 * matmul / total:.1f}% of self CPU time")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    unfuse(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="base,small")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=0, help="steps per variant per round (default: 5 base, 1 small)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    for name in args.models.split(","):
        model, ids, labels = WORKLOADS[name]()
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"\n=== {name}: {n_params / 1e6:.2f}M parameters, batch {tuple(ids.shape)}")
        steps = args.steps or (5 if name == "base" else 1)
        for threads in (int(t) for t in args.threads.split(",")):
            res = ab(model, ids, labels, threads, args.rounds, steps)
            u, f = res["unfused"], res["fused"]
            print(f"{threads} thread(s), {args.rounds} rounds x {steps} step(s), medians:")
            for key in ("wall_ms", "cpu_ms"):
                print(f"  {key:7s} unfused {u[key]:8.1f}  fused {f[key]:8.1f}  speedup {u[key] / f[key]:.3f}x"
                      f"   (min: {u[key.replace('_ms', '_min_ms')]:.1f} / {f[key.replace('_ms', '_min_ms')]:.1f})")
        if not args.no_profile:
            profile(model, ids, labels, 1, args.rows)


if __name__ == "__main__":
    main()
