"""Rollouts through vLLM (NVIDIA GPU, ``pip install 'retain[vllm]'``): a vLLM engine in this process, colocated with
training, holding its own copy of the policy's weights.

- One ``vllm.LLM`` per process, built once from the model's directory or hub name (``config._name_or_path``) and
  shared by every engine made for a model of the same architecture (the policy, the stage's reference, the base
  model of the shift measurement): before sampling, an engine pushes its model's current weights when they are not
  the ones vLLM holds. "Current" is checked through the parameters' in-place version counters, which every optimizer
  step bumps, so an update is never missed and unchanged weights are not pushed twice. ``sync_weights(model)``
  pushes explicitly (GRPO calls it before each rollout).
- Weights go in as TRL's GRPOTrainer (``vllm_mode="colocate"``) does it: ``load_weights`` of the model object that
  vLLM's in-process worker runs (``distributed_executor_backend="external_launcher"``, which keeps the engine in
  this process), with Hugging Face parameter names; then the prefix cache is reset (its KV entries were computed
  with the old weights). A LoRA adapter (peft) is merged into the pushed tensors without touching the model.
- Requests are token ids (retain's chat template; ``skip_tokenizer_init``), one per sample with its own seed —
  ``seed × 1_000_003 + sample index`` — so samples of one prompt differ and the same request reproduces;
  prefix caching makes the repeated prompts cheap. Sampling is plain softmax(logits / temperature) (no top-k/top-p),
  stopped at the tokenizer's eos or ``max_new_tokens``; greedy is temperature 0. The result is the same ``Rollout``
  as the Hugging Face engines': completions end with eos when the model stopped, and are cut at the first eos.

A vision-language model's engine (``retain.vision.vllm_engine``) is this one with its own LLM arguments, weight names
and requests (``VLLMEngine``'s hooks).

Environment: ``RETAIN_VLLM_GPU_MEMORY_UTILIZATION`` (share of the GPU vLLM may take, default 0.3: the rest trains),
``RETAIN_VLLM_MAX_MODEL_LEN`` (default: the model's), ``RETAIN_VLLM_DTYPE`` (default ``auto``: the checkpoint's).
Not executed in this repository's CI (no GPU there); the logic is tested against a stand-in ``vllm`` module.
"""

from __future__ import annotations

import gc
import os
import socket
import weakref
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator

import torch
from transformers import PreTrainedTokenizerBase

from retain.errors import RetainError
from retain.rollout.base import RolloutEngine, SamplingRequest

INSTALL = "pip install 'retain[vllm]'"
SEED_STRIDE = 1_000_003

# The process's one vLLM engine: its architecture key, and whose weights it holds (weak ref, version counters).
_SLOT: dict[str, Any] = {"key": None, "llm": None, "loaded": None}


def require_vllm() -> Any:
    """The ``vllm`` module, or one RetainError saying what is missing (the package, or a CUDA GPU)."""
    try:
        import vllm
    except ImportError:
        raise RetainError(
            f"rollout engine 'vllm' needs the vllm package and an NVIDIA GPU with CUDA: {INSTALL} on a GPU machine "
            "(or use engine: kv_cache)"
        ) from None
    if not torch.cuda.is_available():
        raise RetainError(
            "rollout engine 'vllm' needs an NVIDIA GPU with CUDA, and torch sees none (use engine: kv_cache on CPU)"
        )
    return vllm


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter under its Hugging Face checkpoint name — what vLLM's ``load_weights``
    takes. Tied weights come once (as ``named_parameters`` gives them). A peft LoRA model yields its base weights
    with each adapter's delta added (the model is not modified) and no adapter tensors."""
    from retain.models.adapters import is_adapted

    if not is_adapted(model):
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    deltas: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and not getattr(module, "merged", False):
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    delta = module.get_delta_weight(adapter).detach()
                    key = f"{module_name}.base_layer.weight"
                    deltas[key] = deltas[key] + delta if key in deltas else delta
    prefix = getattr(model, "prefix", "lora_")
    for name, param in model.named_parameters():
        if prefix in name or "original_module" in name:
            continue
        tensor = param.detach()
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.", "")
        yield name, tensor


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    from retain.models.adapters import is_adapted

    return model.get_base_model() if is_adapted(model) else model


def _versions(model: torch.nn.Module) -> tuple[int, ...]:
    """The parameters' in-place version counters: every optimizer step (any in-place write) bumps them."""
    return tuple(p._version for p in model.parameters())


def _holds(model: torch.nn.Module) -> bool:
    """Whether the process's vLLM engine holds ``model``'s current weights. The model is held by weak reference,
    so a new model that happens to reuse a dead one's address is never taken for it."""
    loaded = _SLOT["loaded"]
    return loaded is not None and loaded[0]() is model and loaded[1] == _versions(model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_llm(vllm: Any, model: torch.nn.Module, **overrides: Any) -> Any:
    """The process's vLLM engine for ``model``'s architecture, built on first use (a different architecture
    replaces it). ``overrides`` replace ``vllm.LLM`` arguments (a VLM's engine needs the tokenizer and a picture
    limit: ``retain.vision.vllm_engine``)."""
    base = _base_model(model)
    config = base.config
    path = getattr(config, "_name_or_path", "") or getattr(base, "name_or_path", "")
    if not path:
        raise RetainError("rollout engine 'vllm' needs a model loaded from a directory or hub name (vLLM builds its "
                          "own copy of the architecture from it)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    key = (type(base).__name__, getattr(text, "vocab_size", None), getattr(text, "hidden_size", None),
           getattr(text, "num_hidden_layers", None))
    if _SLOT["llm"] is not None and _SLOT["key"] == key:
        return _SLOT["llm"]
    release()
    # external_launcher keeps vLLM's worker in this process (its model object is reachable for load_weights) and
    # takes the torch.distributed rendezvous from the environment, as torchrun / accelerate launch set it.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    kwargs: dict[str, Any] = {
        "model": path,
        "skip_tokenizer_init": True,
        "dtype": os.environ.get("RETAIN_VLLM_DTYPE", "auto"),
        "gpu_memory_utilization": float(os.environ.get("RETAIN_VLLM_GPU_MEMORY_UTILIZATION", "0.3")),
        "enable_prefix_caching": True,
        "distributed_executor_backend": "external_launcher",
        "seed": 0,
        "trust_remote_code": False,
        "load_format": "safetensors",  # its first copy of the weights: never unpickled (the policy's are pushed after)
    }
    if os.environ.get("RETAIN_VLLM_MAX_MODEL_LEN"):
        kwargs["max_model_len"] = int(os.environ["RETAIN_VLLM_MAX_MODEL_LEN"])
    kwargs.update(overrides)
    _SLOT.update(key=key, llm=vllm.LLM(**kwargs), loaded=None)
    return _SLOT["llm"]


def release() -> None:
    """Drop the process's vLLM engine (and its GPU memory)."""
    llm = _SLOT["llm"]
    _SLOT.update(key=None, llm=None, loaded=None)
    if llm is not None:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _worker_model(llm: Any) -> Any:
    """The model object vLLM's in-process worker runs (the path TRL's colocate mode uses)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError:
        return None


class VLLMEngine(RolloutEngine):
    """Text prompts as token ids. A subclass changes what differs for its model through three hooks: the ``vllm.LLM``
    arguments (``llm_overrides``), the names its weights go in under (``weights``) and the requests (``requests``)."""

    seeds_torch = False  # each sample carries its own seed into vLLM
    llm_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256) -> None:
        super().__init__(model, tokenizer, batch_size)  # vLLM schedules its own batches; batch_size is unused
        self.vllm = require_vllm()
        self.llm = shared_llm(self.vllm, model, **self.llm_overrides)

    def weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs as the vLLM model's ``load_weights`` takes them."""
        return policy_weights(model)

    def sync_weights(self, model: torch.nn.Module | None = None) -> None:
        """Push ``model``'s (default: this engine's model's) current weights into the vLLM engine."""
        model = self.model if model is None else model
        weights = self.weights(model)
        target = _worker_model(self.llm)
        with torch.no_grad():
            if target is not None:
                target.load_weights(weights)
            else:  # vLLM versions without the in-process path
                materialised = list(weights)
                self.llm.apply_model(lambda m: m.load_weights(materialised))
        self.llm.reset_prefix_cache()
        _SLOT["loaded"] = (weakref.ref(model), _versions(model))

    def sampling_params(self, count: int, temperature: float, max_new_tokens: int, greedy: bool, seed: int | None,
                        **extra: Any) -> list:
        """One ``SamplingParams`` per sample (``count`` samples: ``n`` per prompt, prompt-major); ``extra`` are
        further ``SamplingParams`` arguments, the same for every sample."""
        eos = self.tok.eos_token_id
        return [
            self.vllm.SamplingParams(
                n=1,
                temperature=0.0 if greedy else temperature,
                max_tokens=max_new_tokens,
                stop_token_ids=[eos],
                seed=None if seed is None else (seed * SEED_STRIDE + i) % 2**63,
                detokenize=False,
                **extra,
            )
            for i in range(count)
        ]

    @contextmanager
    def sampling_mode(self) -> Iterator[None]:
        """vLLM samples from its own copy of the weights: the training model's mode is left as it is."""
        yield

    def requests(self, request: SamplingRequest) -> tuple[list[list[int]], list[dict[str, Any]]]:
        """The prompt ids the training forward sees and the vLLM request of every row of ``request.flat``."""
        prompt_ids = [self.encode(p) for p in request.flat]
        return prompt_ids, [{"prompt_token_ids": ids} for ids in prompt_ids]

    def complete(self, request: SamplingRequest) -> tuple[list[list[int]], list[list[int]]]:
        if _SLOT["llm"] is not self.llm:  # another architecture took the process's engine meanwhile
            self.llm = shared_llm(self.vllm, self.model, **self.llm_overrides)
        if not _holds(self.model):
            self.sync_weights(self.model)
        prompt_ids, inputs = self.requests(request)
        params = self.sampling_params(len(prompt_ids), request.temperature, request.max_new_tokens, request.greedy,
                                      request.seed)
        outputs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        eos = self.tok.eos_token_id
        completions: list[list[int]] = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            if eos not in ids and getattr(sample, "finish_reason", None) == "stop":  # stopped at eos, token unreported
                ids.append(eos)
            completions.append(ids)
        return prompt_ids, completions
