"""A stand-in ``vllm`` module for the vLLM engines' tests on CPU (no GPU and no vllm here).

It records what an engine asks of vLLM (the LLM's arguments, the requests and their SamplingParams, the weights
pushed into its worker model) and answers with canned completions. What a real vLLM does with those calls is not
tested with it.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from typing import Iterator

import torch

from retain.rollout import vllm as vllm_engine


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _Worker:
    def __init__(self, pushes):
        self.pushes = pushes

    def load_weights(self, weights):
        self.pushes.append({name: t.detach().clone() for name, t in weights})


class LLM:
    instances: list["LLM"] = []
    eos: int = -1

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.pushes: list[dict[str, torch.Tensor]] = []
        self.requests: list[tuple[list, list]] = []
        self.resets = 0
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=_Worker(self.pushes)))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))
        LLM.instances.append(self)

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, sampling_params, use_tqdm=True):
        """Sample i answers with tokens 5, 6, …: i % 3 == 0 stops at eos (reported, followed by junk), 1 runs to
        max_tokens, 2 stops at eos without reporting it."""
        self.requests.append((prompts, sampling_params))
        eos = self.eos
        outs = []
        for i, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
            if i % 3 == 0:
                ids, reason = [5, 6, eos, 7], "stop"
            elif i % 3 == 1:
                ids, reason = [5 + (i % 4)] * sp.max_tokens, "length"
            else:
                ids, reason = [6, 5], "stop"
            sample = types.SimpleNamespace(token_ids=ids, finish_reason=reason)
            outs.append(types.SimpleNamespace(prompt_token_ids=prompt.get("prompt_token_ids"), outputs=[sample]))
        return outs


@contextmanager
def stand_in_vllm(monkeypatch, eos: int) -> Iterator[types.ModuleType]:
    """``import vllm`` gives the stand-in and torch sees a GPU while inside; the process's vLLM engine is dropped
    before and after."""
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    LLM.instances = []
    LLM.eos = eos
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # the engine sets them: restore
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    vllm_engine.release()
    try:
        yield module
    finally:
        vllm_engine.release()
        forget_the_launch()


def forget_the_launch() -> None:
    """The engine's launcher variables make accelerate start a one-process torch.distributed group and keep it in its
    process-wide state: drop both, or later tests in this process would train wrapped in DDP."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
