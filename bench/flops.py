"""Training FLOP/s as a fraction of the machine's fp32 matmul peak.

Peak: the best of several large square ``torch.mm`` (fp32, the benchmark's thread count), 2·n³ FLOPs each.
Achieved: retain's training step (SFTObjective + Trainer: forward, backward, grad clip, AdamW) on the ``small``
preset (``retain.models.tiny.make_model("small", tok)``) with a full batch of 128 sequences × 64 tokens (32 prompt
tokens + 32 target tokens, no padding), estimated at 6·P·T FLOPs per step (P = every parameter, T = tokens in the
batch; the attention score/value products, 12·layers·T·seq·d ≈ 4% more here, are left out, so this slightly
understates the work). ``..._compiled``: the same step with ``TrainConfig(compile=True)`` (torch.compile), warm-up
steps (which include the compile) not timed.
"""

from __future__ import annotations

import random
import time

import torch

from common import StepClock

BATCH = 128
SEQ = 64


def matmul_peak(n: int = 4096, repeats: int = 6) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def train_flops(warmup: int, steps: int, compile: bool = False) -> dict:
    from retain.methods.sft import SFTObjective
    from retain.models.tiny import make_model
    from retain.models.tokenizer import build_tokenizer
    from retain.train import TrainConfig, Trainer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = make_model("small", tok)
    params = sum(p.numel() for p in model.parameters())
    vocab = len(tok)
    eos = tok.eos_token_id
    normal = [i for i in range(vocab) if i not in (tok.pad_token_id, eos)]
    rng = random.Random(0)
    half = SEQ // 2
    pool = [([rng.choice(normal) for _ in range(half)], [rng.choice(normal) for _ in range(half - 1)] + [eos])
            for _ in range(4 * BATCH)]

    def sampler(r, k, step):
        return [r.choice(pool) for _ in range(k)]

    objective = SFTObjective(sampler, tok.pad_token_id, BATCH)
    clock = StepClock()
    cfg = TrainConfig(steps=warmup + steps, lr=3e-4, log_every=10_000, compile=compile)
    trainer = Trainer(model, objective, cfg, on_step=clock.tick)
    clock.start = time.perf_counter()
    trainer.run()
    step_s = clock.seconds(warmup) / steps
    flops = 6 * params * BATCH * SEQ
    return {"flops_per_s": flops / step_s, "params": params, "step_s": step_s, "tokens": BATCH * SEQ}
