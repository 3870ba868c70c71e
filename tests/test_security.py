"""Security of loading: weights only from safetensors, no pickle of user files, no code from a model directory unless
the user passes ``trust_remote_code``, nothing a model or a file wrote is ever evaluated.

Two kinds of check: a scan of the source (every call that could unpickle, evaluate or run code is forbidden or must
carry its safe argument), and booby-trapped files (a pickle whose loading would create a sentinel file, a model
directory whose custom code would) that retain must refuse without running them.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from retain.errors import RetainError

SRC = Path(__file__).resolve().parent.parent / "src" / "retain"
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle", "_pickle"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__", "breakpoint"}


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []

    def at(node, what):
        found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    at(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            at(node, f"imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if isinstance(node.func, ast.Name) and node.func.id in UNSAFE_BUILTINS:
                at(node, f"calls {node.func.id}()")
            if name == "torch.load":
                if not _is_true(_kw(node, "weights_only")):
                    at(node, "torch.load without weights_only=True")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                at(node, f"{name} (use yaml.safe_load)")
            if name in ("os.system", "os.popen", "os.execv", "os.execl", "os.spawnl"):
                at(node, f"calls {name}")
            if name.startswith("subprocess.") and _is_true(_kw(node, "shell")):
                at(node, f"{name}(shell=True)")
            if name.endswith(("np.load", "numpy.load")) and _is_true(_kw(node, "allow_pickle")):
                at(node, "np.load(allow_pickle=True)")
            if _is_true(_kw(node, "trust_remote_code")):
                at(node, "trust_remote_code=True hard-coded")
            if name.endswith(".from_pretrained") and "Model" in name and "Tokenizer" not in name:
                if not _is_true(_kw(node, "use_safetensors")):
                    at(node, f"{name} without use_safetensors=True")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + \
                node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if isinstance(default, ast.Call) and default.args:  # typer.Option(False, ...)
                    default = default.args[0]
                if arg.arg == "trust_remote_code" and not (isinstance(default, ast.Constant) and default.value is False):
                    at(node, f"{node.name}(trust_remote_code=...) does not default to False")
    return found


def test_source_never_unpickles_evaluates_or_trusts_remote_code():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    found = [v for f in files for v in violations(f)]
    assert not found, "\n".join(found)


def test_the_scan_catches_what_it_looks_for(tmp_path, monkeypatch):
    bad = SRC / "_scan_probe.py"  # parsed only, never imported or written: violations() reads the text we give it
    text = (
        "import pickle\nimport torch, yaml, subprocess\nfrom transformers import AutoModelForCausalLM\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\neval('1')\nexec('1')\nyaml.load('a')\n"
        "subprocess.run('ls', shell=True)\nAutoModelForCausalLM.from_pretrained('m', trust_remote_code=True)\n"
        "def load(p, trust_remote_code=True): ...\n"
    )
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: text)
    found = violations(bad)
    for needle in ("imports pickle", "torch.load without", "calls eval", "calls exec", "yaml.load", "shell=True",
                   "hard-coded", "without use_safetensors", "does not default to False"):
        assert any(needle in v for v in found), (needle, found)
    assert sum("torch.load without" in v for v in found) == 2


# ---------------------------------------------------------------------------------------------- booby traps


class Trap:
    """Unpickling this runs ``os.system('touch SENTINEL')``: the file appears only if someone unpickled it."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture()
def sentinel(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a booby-trapped file was unpickled or its code ran"


def test_pickled_weights_beside_safetensors_are_never_loaded(tmp_path, micro_model, tokenizer, sentinel):
    from retain.models.loading import load_model

    model_dir = tmp_path / "m"
    micro_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (model_dir / name).write_bytes(pickle.dumps(Trap(sentinel)))
    model, _ = load_model(model_dir)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in micro_model.parameters())
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(RetainError, match="pickled weights are not loaded"):
        load_model(model_dir)


def test_model_code_never_runs_without_trust_remote_code(tmp_path, micro_model, tokenizer, sentinel):
    from retain.models.loading import load_model

    model_dir = tmp_path / "evil"
    micro_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil_remote"
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n")
    with pytest.raises(RetainError, match="custom code"):
        load_model(model_dir)


def test_trust_remote_code_is_off_unless_asked():
    from retain.cli import eval_cmd
    from retain.config import ExperimentConfig
    from retain.models.loading import load_model, load_tokenizer

    for fn in (load_model, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    assert ExperimentConfig.model_fields["trust_remote_code"].default is False
    assert inspect.signature(eval_cmd).parameters["trust_remote_code"].default.default is False


def test_checkpoint_pickles_are_loaded_weights_only(tmp_path, micro_model, tokenizer, sentinel):
    """A checkpoint whose optimizer.pt was swapped for a booby-trapped pickle (manifest rewritten to match): the
    resume refuses it with torch's weights-only unpickler, and nothing runs."""
    from retain.files import write_manifest
    from retain.methods.sft import SFTObjective
    from retain.train import TrainConfig, Trainer

    pairs = [(tokenizer.encode("1+1="), tokenizer.encode("2") + [tokenizer.eos_token_id])]
    objective = SFTObjective(lambda rng, k, step: pairs * k, tokenizer.pad_token_id, 2)
    cfg = TrainConfig(steps=1, lr=1e-3, checkpoint_every=1)
    ckpt = tmp_path / "ckpt"
    Trainer(micro_model, objective, cfg, checkpoint_dir=ckpt).run()
    for name in ("optimizer.pt", "rng.pt"):
        (ckpt / name).write_bytes(pickle.dumps(Trap(sentinel)))
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)  # the attacker can make the checksums match; the loader must still not unpickle code
    with pytest.raises(pickle.UnpicklingError):
        Trainer(micro_model, objective, cfg, checkpoint_dir=ckpt)


def test_dataset_and_config_loaders_do_not_unpickle(tmp_path, sentinel):
    from retain.config import load_experiment
    from retain.tasks.dataset import DatasetTask

    trap = pickle.dumps(Trap(sentinel))
    for suffix in (".jsonl", ".parquet"):
        (tmp_path / f"d{suffix}").write_bytes(trap)
        with pytest.raises(RetainError):
            DatasetTask.from_path(tmp_path / f"d{suffix}")
    (tmp_path / "c.yaml").write_text(f"!!python/object/apply:os.system ['touch {sentinel}']\n")
    with pytest.raises(RetainError, match="not valid YAML"):
        load_experiment(tmp_path / "c.yaml")
