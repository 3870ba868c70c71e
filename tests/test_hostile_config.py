"""Hostile configs and data files: fuzzed YAML (random values at every field, garbage text and bytes, YAML bombs,
huge values, unicode) and dataset files (missing columns, wrong types, empty, unicode, huge, binary) give one clear
``RetainError`` each — exit code 2 and one line from the CLI — and a run writes nothing outside its directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retain.config import ExperimentConfig, load_experiment, parse_experiment
from retain.errors import RetainError
from retain.tasks.dataset import DatasetTask

VALID = {
    "name": "fuzz", "model": "base", "seed": 0, "mode": "batch",
    "method": {"name": "sft", "batch_size": 8, "train": {"lr": 1e-3, "steps": 2}},
    "stages": [{"task": "arith", "steps": 1}, {"task": "countdown", "steps": 1}],
    "eval": {"tasks": ["auto"], "n": 4, "samples": 0}, "shift": {"prompts": 2, "samples": 1},
    "streaming": {"eval_every": 2}, "engine": "kv_cache", "trust_remote_code": False,
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**15), st.integers(max_value=-(10**15)),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", "base", "sft", "grpo", "auto", "arith", "arith@ood", "../../etc/passwd", "/dev/zero", "[/x]",
                     "x" * 5000, "\x00", "é∂ƒ😀", "custom", "on_policy", "1e999", "NaN", "-1", "kg@ood", "prior"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(list(VALID) + ["task", "kind", "lr", "k"]),
                                  st.integers(), st.none()), children, max_size=4),
    ),
    max_leaves=12,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(VALID) if p]


def _mutated(changes: list[tuple[int, object, bool]]) -> dict:
    data = json.loads(json.dumps(VALID))
    for index, value, delete in changes:
        *parent_path, key = ALL_PATHS[index % len(ALL_PATHS)]
        parent = data
        try:
            for part in parent_path:
                parent = parent[part]
            if delete and isinstance(parent, dict):
                parent.pop(key, None)
            else:
                parent[key] = value
        except (KeyError, IndexError, TypeError):
            continue
    return data


def _one_clear_line(err: RetainError, source: str) -> None:
    message = str(err)
    assert message and "\n" not in message and message.startswith(source), message
    assert len(message) < 1000, message[:200]


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(changes=st.lists(st.tuples(st.integers(0, 10**6), values, st.booleans()), min_size=1, max_size=4))
def test_fuzzed_config_values_give_a_config_or_one_clear_error(changes):
    data = _mutated(changes)
    try:
        cfg = parse_experiment(data, "fuzz.yaml")
    except RetainError as err:
        _one_clear_line(err, "fuzz.yaml")
        return
    assert isinstance(cfg, ExperimentConfig)
    assert 0 <= cfg.seed < 2**32 and cfg.stages
    assert all(isinstance(t, str) for t in cfg.eval_tasks())


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(top=values)
def test_fuzzed_whole_configs(top):
    try:
        parse_experiment(top, "fuzz.yaml")
    except RetainError as err:
        _one_clear_line(err, "fuzz.yaml")


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                     st.text(alphabet="{}[]:,-&*!|>'\" \n\tabc123.#?%@`", max_size=200).map(str.encode)))
def test_fuzzed_yaml_files(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_bytes(raw)
    try:
        load_experiment(path)
    except RetainError as err:
        _one_clear_line(err, str(path))


BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
               for p, c in zip(["", *"abcdefg"], "abcdefgh")) + "stages: [{task: arith}]\neval: {tasks: *h}\n"

NASTY_YAML = {
    "billion laughs": (BOMB, "more than 100,000 values"),
    "deep flow nesting": ("[" * 5000 + "]" * 5000, "nested too deeply"),
    "python object tag": ("!!python/object/apply:os.system ['touch pwned']", "not valid YAML"),
    "python name tag": ("stages: [{task: arith}]\nseed: !!python/name:os.system\n", "not valid YAML"),
    "number key": ("stages: [{task: arith}]\n1: 2\n", "Keys should be strings"),
    "method name list": ("stages: [{task: arith}]\nmethod: {name: [sft]}\n", "method.name: expected a method name"),
    "huge seed": ("stages: [{task: arith}]\nseed: 99999999999999999999999\n", "seed"),
    "infinite seed": ("stages: [{task: arith}]\nseed: .inf\n", "seed"),
    "huge group": ("stages: [{task: arith}]\nmethod: {name: grpo, data: {group_size: 1000000000}}\n", "group_size"),
    "huge batch": ("stages: [{task: arith}]\nmethod: {name: sft, batch_size: 100000000000}\n", "batch_size"),
    "nan lr": ("stages: [{task: arith}]\nmethod: {name: sft, train: {lr: .nan}}\n", "lr"),
    "long task name": ("stages: [{task: " + "x" * 5000 + "}]\n", "5000 characters"),
    "nul in task": ('stages: [{task: "arith\\0"}]\n', "unknown task"),
    "traversal task": ("stages: [{task: ../../../../etc/passwd}]\n", "unsupported file type"),
    "device file task": ("stages: [{task: /dev/zero}]\n", "unsupported file type"),
    "a list": ("- a\n- b\n", "expected a mapping"),
    "empty": ("", "expected a mapping"),
    "not utf-8": (b"stages: \xff\xfe\n", "not UTF-8"),
}


@pytest.mark.parametrize("name", list(NASTY_YAML))
def test_nasty_yaml(tmp_path, name):
    text, needle = NASTY_YAML[name]
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RetainError) as err:
        load_experiment(path)
    _one_clear_line(err.value, str(path))
    assert needle in str(err.value)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


# ---------------------------------------------------------------------------------------------- dataset files


cells = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40),
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                  st.sampled_from(["", "x" * 100_000, "é∂ƒ😀\u202e", "1e999", "NaN"]))
rows = st.lists(st.one_of(
    st.fixed_dictionaries({"prompt": cells, "answer": cells}),
    st.fixed_dictionaries({"prompt": st.text(max_size=20), "answer": st.text(max_size=20)},
                          optional={"split": cells}),
    st.dictionaries(st.sampled_from(["prompt", "answer", "split", "question", "x"]), cells, max_size=4),
    cells,
), max_size=6)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(rows=rows, verifier=st.sampled_from(["exact", "numeric", "regex"]), junk=st.binary(max_size=20))
def test_fuzzed_jsonl_files(tmp_path_factory, rows, verifier, junk):
    path = tmp_path_factory.mktemp("d") / "d.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + (junk if len(rows) % 2 else b""))
    try:
        task = DatasetTask.from_path(path, verifier=verifier)
    except RetainError as err:
        _one_clear_line(err, str(path))
        return
    for split in task.splits:
        for e in task.examples(split, 5):
            assert isinstance(e.prompt, str) and isinstance(e.answer, str)
            reachable = verifier == "exact" and "\n" not in e.answer and len(e.answer) <= 256
            assert task.reward(e.prompt, e.answer) == 1.0 if reachable else task.reward(e.prompt, e.answer) in (0.0, 1.0)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(rows=st.lists(st.fixed_dictionaries({"prompt": cells, "answer": cells}), min_size=0, max_size=5))
def test_fuzzed_parquet_files(tmp_path_factory, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("p") / "d.parquet"
    try:  # one type per column, as parquet has it: what parquet cannot hold becomes JSON strings
        columns = {k: [r[k] for r in rows] for k in ("prompt", "answer")}
        pq.write_table(pa.table(columns) if rows else pa.table({"prompt": pa.array([], pa.string())}), path)
    except (pa.ArrowException, OverflowError):
        pq.write_table(pa.table({k: [json.dumps(r[k]) for r in rows] for k in ("prompt", "answer")}), path)
    try:
        DatasetTask.from_path(path)
    except RetainError as err:
        _one_clear_line(err, str(path))


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"), (b"\n\n  \n", "is empty"), (b"\xff\xfe\x00garbage", "cannot read as UTF-8"),
    (b'{"prompt": "q"}\n', "no column 'answer'"), (b'{"prompt": 1, "answer": "2"}\n', "column 'prompt' is int"),
    (b'[1, 2]\n', "expected a JSON object"), (b'{"prompt": "q", "answer": "a"', "malformed JSON"),
    (b'{"prompt": "q", "answer": null}\n', "missing or null"),
    (b'{"prompt": "q", "answer": "' + b"9" * 1_000_000 + b'"}\n', None),  # huge but valid
])
def test_bad_dataset_files(tmp_path, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    if needle is None:
        task = DatasetTask.from_path(path)
        assert task.reward("q", "9" * 300) == 0.0  # the clipped completion cannot equal a 1,000,000-digit answer
        return
    with pytest.raises(RetainError, match=needle) as err:
        DatasetTask.from_path(path)
    _one_clear_line(err.value, str(path))


# ---------------------------------------------------------------------------------------------- the CLI, end to end


def cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "retain.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every path below ``root`` outside ``skip``: files with size and mtime, directories by name (creating ``skip``
    changes its parent's mtime, nothing else may change)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime) if p.is_file() else "dir"
            for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.fixture()
def micro_dir(tmp_path, micro_model, tokenizer) -> Path:
    path = tmp_path / "models" / "micro"
    micro_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["billion laughs", "python object tag", "huge group", "not utf-8", "traversal task"])
def test_cli_refuses_hostile_configs_with_one_line(tmp_path, name):
    text, needle = NASTY_YAML[name]
    config = tmp_path / "c.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(tmp_path, tmp_path / "out")
    result = cli("run", str(config), "--out", str(tmp_path / "out"), cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("retain: error:"), result.stderr[-2000:]
    assert needle in lines[0]
    assert not (tmp_path / "out").exists() and snapshot(tmp_path, tmp_path / "out") == before


def test_run_writes_nothing_outside_its_directory(tmp_path, micro_dir):
    """Traversal-looking names and paths in a config are data, never output paths; markup in names is text."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    data = tmp_path / "a" / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(5)))
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "../../../escape[/x]/[bold]", "model": "../../models/micro",
        "method": {"name": "sft", "batch_size": 2, "train": {"lr": 1e-3}},
        "stages": [{"task": "../data.jsonl", "steps": 1}], "eval": {"tasks": ["../data.jsonl"], "n": 2},
        "shift": {"prompts": 0},
    }))
    out = work / "run"
    before = snapshot(tmp_path, out)
    result = cli("run", "c.yaml", "--out", "run", "--quiet", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "escape[/x]/[bold]" in result.stdout  # the name printed as written, not parsed as markup
    assert snapshot(tmp_path, out) == before  # nothing new or changed outside --out
    assert (out / "results.json").exists()


def test_diverging_training_is_one_line_exit_2(tmp_path, micro_dir):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(micro_dir), "method": {"name": "sft", "batch_size": 2,
                                           "train": {"lr": 1e30, "max_nonfinite": 1, "max_grad_norm": None}},
        "stages": [{"task": "arith", "steps": 4}], "eval": {"tasks": ["arith"], "n": 2}, "shift": {"prompts": 0},
    }))
    result = cli("run", str(config), "--out", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "non-finite loss" in lines[0] and "lower the learning rate" in lines[0]


def test_out_that_is_a_file_is_one_line_exit_2(tmp_path, micro_dir):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": str(micro_dir), "stages": [{"task": "arith", "steps": 1}]}))
    (tmp_path / "file").write_text("keep me")
    result = cli("run", str(config), "--out", str(tmp_path / "file"), cwd=tmp_path)
    assert result.returncode == 2 and "a file is in the way" in result.stderr
    assert (tmp_path / "file").read_text() == "keep me"


def test_seed_bounds_are_what_the_seeding_accepts():
    import torch

    cfg = parse_experiment({**VALID, "seed": 2**32 - 1})
    worst = cfg.seed * 1000 + len(cfg.stages)
    torch.manual_seed(worst * 1_000_003 + 10**6)  # the largest seed GRPO derives: fits the generator
    assert math.log2(worst * 1_000_003 + 10**6) < 63


def test_a_key_with_a_newline_is_named_on_one_line():
    """Found by the fuzz test above: an unknown key holding a newline made the error two lines."""
    bad = {**VALID, "method": {**VALID["method"], "train": {**VALID["method"]["train"], "\n": None}}}
    with pytest.raises(RetainError) as err:
        parse_experiment(bad)
    message = str(err.value)
    assert "\n" not in message and "method.train.'\\n': Extra inputs are not permitted" in message, message
