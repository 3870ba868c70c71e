"""configs/real/ (GPU configs of real models) validate offline, and the model options they use — dtype, gradient
(activation) checkpointing, device — apply to the embedded model on CPU through the runner's loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retain.config import load_experiment, parse_experiment
from retain.errors import RetainError

REAL = sorted((Path(__file__).resolve().parent.parent / "configs" / "real").glob("*.yaml"))


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _cfg(**extra):
    return parse_experiment({"model": "base", "stages": [{"task": "countdown", "steps": 1}], **extra})


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_real_config_validates(path):
    cfg = load_experiment(path)  # offline: validation never touches the hub
    assert cfg.engine == "vllm" and cfg.gradient_checkpointing and cfg.device == "cuda"
    assert cfg.mixed_precision == "bf16" and cfg.model.count("/") == 1
    assert all(cfg.stage_method(i).train.steps >= 100 for i in range(len(cfg.stages)))


def test_every_real_model_has_a_config():
    models = {load_experiment(p).model for p in REAL}
    assert models == {"Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"}
    assert any(load_experiment(p).stage_method(0).adapter is not None for p in REAL)  # a LoRA one among them


def test_defaults_are_unchanged_for_the_embedded_model():
    cfg = _cfg()
    assert (cfg.dtype, cfg.mixed_precision, cfg.gradient_checkpointing, cfg.device) == ("fp32", "no", False, "auto")
    model, _ = cfg.load_model()
    assert {p.dtype for p in model.parameters()} == {torch.float32} and not _checkpointing(model)


def test_dtype_and_checkpointing_apply():
    cfg = _cfg(dtype="bf16", gradient_checkpointing=True, device="cpu")
    model, _ = cfg.load_model()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert _checkpointing(model) and model.is_activation_checkpointing
    assert next(model.parameters()).device.type == "cpu"


def test_checkpointing_gives_the_same_gradients():
    cfg = _cfg(device="cpu")
    plain, _ = cfg.load_model()
    ckpt, _ = cfg.model_copy(update={"gradient_checkpointing": True}).load_model()
    ids = torch.tensor([[3, 5, 7, 9, 11, 13, 15, 17]])
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_model_options_are_refused():
    with pytest.raises(RetainError, match="dtype"):
        _cfg(dtype="fp8")
    with pytest.raises(RetainError, match="mixed_precision"):
        _cfg(mixed_precision="fp8")
    if not torch.cuda.is_available():
        cfg = _cfg(device="cuda")
        with pytest.raises(RetainError, match="no CUDA device"):
            cfg.load_model()
