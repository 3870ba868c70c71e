"""configs/real/ (GPU configs of real models) validate offline, and the model options they use — dtype, gradient
(activation) checkpointing, device — apply to the embedded model on CPU through the runner's loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retain.config import load_experiment, parse_experiment
from retain.errors import RetainError
from retain.methods.config import AdapterConfig

REAL = sorted((Path(__file__).resolve().parent.parent / "configs" / "real").glob("*.yaml"))


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _cfg(**extra):
    return parse_experiment({"model": "base", "stages": [{"task": "countdown", "steps": 1}], **extra})


VLM_CONFIGS = [p for p in REAL if "-vl-" in p.name]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache: a validation that tried to download would fail here."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("config validation opened a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_real_config_validates(path, offline):
    cfg = load_experiment(path)  # offline: validation never touches the hub
    assert cfg.gradient_checkpointing and cfg.device == "cuda"
    assert cfg.mixed_precision == "bf16" and cfg.model.count("/") == 1
    assert all(cfg.stage_method(i).train.steps >= 100 for i in range(len(cfg.stages)))
    if path in VLM_CONFIGS:  # vLLM takes no pictures: the VLM's own generate
        assert cfg.model_kind == "vlm" and cfg.kind().name == "vision" and cfg.engine in ("kv_cache", "hf")
        assert cfg.stage_tasks() == ["gpoints_vl", "vcolor"] and cfg.stage_method(0).adapter is not None
    else:
        assert cfg.model_kind == "text" and cfg.kind().name == "text" and cfg.engine == "vllm"


def test_every_real_model_has_a_config(offline):
    models = {load_experiment(p).model for p in REAL}
    assert models == {"Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct",
                      "Qwen/Qwen2.5-VL-3B-Instruct"}
    assert any(load_experiment(p).stage_method(0).adapter is not None for p in REAL)  # a LoRA one among them
    methods = {load_experiment(p).stage_method(0).data.kind for p in VLM_CONFIGS}
    assert methods == {"offline", "on_policy"}  # the VLM's SFT and GRPO twins


def tiny_qwen_vl():
    """Qwen2.5-VL's architecture at toy size (its module names are the 3B model's), randomly initialised, offline."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 256, "bos_token_id": 0, "eos_token_id": 1,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "fullatt_block_indexes": [1]},
    )
    return Qwen2_5_VLForConditionalGeneration(config)


@pytest.mark.parametrize("path", VLM_CONFIGS, ids=[p.name for p in VLM_CONFIGS])
def test_the_vlm_configs_lora_adapts_the_language_model_alone(path, offline):
    from retain.models.adapters import attach

    adapter = load_experiment(path).stage_method(0).adapter
    model = attach(tiny_qwen_vl(), adapter)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    projections = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj"}
    wanted = {f"base_model.model.model.language_model.layers.{i}.{m}" for i in range(2) for m in projections}
    assert adapted == wanted  # every projection of every language-model layer, nothing of the vision tower
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)  # the tower stays frozen
    plain = attach(tiny_qwen_vl(), adapter.model_copy(update={"target_modules": AdapterConfig().target_modules}))
    # why the config names a regex: the default name list also adapts the vision blocks' MLPs
    assert any("visual" in n and ".lora_A" in n for n, _ in plain.named_parameters())


def test_a_bad_target_modules_regex_is_one_error_naming_the_field():
    with pytest.raises(RetainError) as err:
        _cfg(method={"name": "lora", "adapter": {"target_modules": ".*(q_proj"}})
    assert "method.adapter.target_modules: not a regular expression" in str(err.value) and "\n" not in str(err.value)


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
