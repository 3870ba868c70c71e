"""Loading a causal LM and its tokenizer: the embedded base model, any local HF directory, or a hub name.

Weights load from safetensors only (``use_safetensors=True``): a directory holding only pickled ``.bin`` weights
is refused rather than unpickled. ``trust_remote_code`` stays off unless the caller passes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast,
)

from retain.errors import RetainError

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded" / "base"
BASE = "base"


def resolve_model_path(spec: str | Path) -> str:
    """``base`` → the embedded model's directory; an existing directory → itself (checked); else a hub name."""
    spec = str(spec)
    if spec == BASE:
        if not (EMBEDDED_DIR / "config.json").exists():
            raise RetainError(f"the embedded base model is missing at {EMBEDDED_DIR}; run `retain pretrain` to build it")
        return str(EMBEDDED_DIR)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RetainError(f"model {spec!r} is a file; give a Hugging Face model directory")
        if not (path / "config.json").exists():
            raise RetainError(f"model directory {spec!r} has no config.json")
        if not any(path.glob("*.safetensors")):
            pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            extra = f" (found {', '.join(pickled)}: pickled weights are not loaded)" if pickled else ""
            raise RetainError(f"model directory {spec!r} has no .safetensors weights{extra}")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise RetainError(f"model {spec!r}: no such directory (and not a hub name like 'Qwen/Qwen2.5-0.5B-Instruct')")
    return spec


_GENERIC_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _saved_as_generic(path: str) -> bool:
    """A tokenizer saved as a plain ``tokenizers`` backend (retain's own): AutoTokenizer would otherwise pick the
    model type's class (Qwen2Tokenizer for a qwen2 config), whose own pre-tokenizer changes the encoding."""
    config = Path(path) / "tokenizer_config.json"
    if not config.is_file() or not (Path(path) / "tokenizer.json").is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") in _GENERIC_CLASSES
    except ValueError:
        return False


def load_tokenizer(spec: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_model_path(spec)
    try:
        if _saved_as_generic(path):
            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise RetainError(f"cannot load the tokenizer of {spec!r}: {_first_line(err)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}


def load_model(
    spec: str | Path,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``spec``: ``base``, a local HF causal-LM directory, or a hub name.

    ``dtype``: a torch dtype or ``fp32`` (default) / ``bf16`` / ``fp16`` / ``auto`` (the checkpoint's own).
    ``gradient_checkpointing``: recompute each layer's activations in the backward (non-reentrant; only while
    training, so generation keeps its KV cache)."""
    dtype = torch_dtype(dtype)
    path = resolve_model_path(spec)
    tok = load_tokenizer(spec, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except (OSError, ValueError) as err:
        raise RetainError(f"cannot load model {spec!r}: {_first_line(err)}") from None
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation recomputation in the backward (transformers >= 5.x names it activation
    checkpointing; older 5.x gradient checkpointing)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """A torch dtype from ``fp32`` / ``bf16`` / ``fp16`` / ``auto`` (or a torch dtype; None: float32)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RetainError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype or torch.float32


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
