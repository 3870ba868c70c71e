"""Model loading refusals and the CLI's one-line errors (exit 2, nothing written)."""

import json
import os
import subprocess
import sys

import pytest

from retain.errors import RetainError
from retain.models.loading import load_model, resolve_model_path


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "retain.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_directory_without_weights_is_refused(tmp_path, micro_model):
    micro_model.config.save_pretrained(tmp_path)
    with pytest.raises(RetainError, match="has no .safetensors weights"):
        resolve_model_path(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(RetainError, match="pytorch_model.bin: pickled weights are not loaded"):
        load_model(tmp_path)


def test_directory_without_config_and_missing_paths(tmp_path):
    with pytest.raises(RetainError, match="has no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(RetainError, match="no such directory"):
        resolve_model_path(tmp_path / "nope")


def test_saved_model_round_trips(tmp_path, micro_model, tokenizer):
    micro_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path)
    assert tok.padding_side == "left"
    # a qwen2 config must not swap in Qwen2Tokenizer (whose pre-tokenizer drops the space here)
    for text in ["reverse abc", "city of mentor of ava?", "cards 2 3 5 6, j=q=k=10, make 24"]:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": "a b"}], add_generation_prompt=True, tokenize=False) \
        == tokenizer.apply_chat_template([{"role": "user", "content": "a b"}], add_generation_prompt=True, tokenize=False)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in micro_model.parameters())


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "--tasks", "nope"], "unknown task 'nope'"),
        (["eval", "--tasks", "arith", "--model", "missing_dir/x/y"], "missing_dir/x/y"),
        (["eval", "--samples", "many"], "'--samples'"),
        (["eval", "--bogus"], "No such option: --bogus"),
        (["pretrain", "--steps", "0"], "'--steps'"),
        (["eval", "--tasks", "data.jsonl"], "data.jsonl"),
        (["demo", "--quick", "--preset", "core"], "exclude each other"),
        (["demo", "--preset", "huge"], "unknown demo preset 'huge'"),
    ],
)
def test_cli_bad_input_gives_one_line_and_exit_2(tmp_path, args, needle):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("retain: error:") and needle in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_dataset_missing_column(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    result = run_cli("eval", "--tasks", str(data), cwd=tmp_path)
    assert result.returncode == 2
    assert "prompt" in result.stderr and "data.jsonl" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_cli_model_dir_without_weights(tmp_path, micro_model):
    micro_model.config.save_pretrained(tmp_path / "m")
    result = run_cli("eval", "--model", str(tmp_path / "m"), "--tasks", "arith", cwd=tmp_path)
    assert result.returncode == 2 and "no .safetensors weights" in result.stderr
