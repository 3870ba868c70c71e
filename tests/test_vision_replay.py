"""Replay on a VLM: a visual task's replay buffer keeps its pictures across save and resume (``replay.json`` holds
each picture's example and pixel digest, ``retain.methods.replay_record``), and a VLM run replays them."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from retain.config import parse_experiment
from retain.errors import RetainError
from retain.files import atomic_write_json
from retain.methods.sources import WithReplay
from retain.methods.stage import MethodState
from retain.rundir import load_state, save_state
from retain.runner import run_experiment


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def filled_state(tasks_and_seeds) -> MethodState:
    """A state whose buffers WithReplay filled at the end of each (task, seed) stage, as a run fills them."""
    state = MethodState()
    for task_name, seed in tasks_and_seeds:
        ctx = SimpleNamespace(task_name=task_name, seed=seed, state=state)  # all end_stage reads of a canonical buffer
        WithReplay(inner=None, buffers={}, ratio=0.5, size=24).end_stage(None, ctx)
    return state


def test_a_visual_buffer_keeps_its_pictures_and_prompts_across_save_and_resume(tmp_path):
    state = filled_state([("gpoints_vl", 3), ("vcount", 4), ("kg", 5)])  # the visual sequence, and a text task
    save_state(state, tmp_path / "state")
    loaded = load_state(tmp_path / "state")
    assert list(loaded.replay) == list(state.replay)
    for task_name, pairs in state.replay.items():
        again = loaded.replay[task_name]
        assert len(again) == len(pairs) == 24
        assert [str(p) for p, _ in again] == [str(p) for p, _ in pairs] and [a for _, a in again] == [a for _, a in pairs]
        for (before, _), (after, _) in zip(pairs, again):
            if task_name == "kg":
                assert getattr(after, "image", None) is None
                continue
            assert after == before and after.answer == before.answer  # the same PicturePrompt: text, scene, answer
            assert np.array_equal(np.asarray(after.image.render()), np.asarray(before.image.render()))
    saved = json.loads((tmp_path / "state" / "replay.json").read_text())
    assert all(len(e) == 3 for e in saved["vcount"]) and all(len(e) == 2 for e in saved["kg"])


def test_a_saved_picture_that_no_longer_matches_is_refused_naming_the_file(tmp_path):
    save_state(filled_state([("vcount", 4)]), tmp_path / "state")
    path = tmp_path / "state" / "replay.json"
    saved = json.loads(path.read_text())
    for change, said in (
        (lambda e: e[2].update(index=e[2]["index"] + 1), "is no longer the one saved"),
        (lambda e: e[2].update(pixels_sha256="0" * 64), "now renders other pixels than the saved picture"),
        (lambda e: e[2].update(split="ood"), "has no split"),
        (lambda e: e.pop(), None),  # a picture prompt saved as text alone loads as text: the format for text pairs
    ):
        entries = json.loads(json.dumps(saved))
        change(entries["vcount"][0])
        atomic_write_json(path, entries)
        if said is None:
            assert getattr(load_state(tmp_path / "state").replay["vcount"][0][0], "image", None) is None
            continue
        with pytest.raises(RetainError) as err:
            load_state(tmp_path / "state")
        assert str(err.value).startswith(f"{path}: task 'vcount' entry 0: ") and said in str(err.value)
        assert "\n" not in str(err.value)


REPLAY = {"name": "replay", "batch_size": 4, "replay": {"ratio": 0.5, "size": 16}, "train": {"steps": 2, "lr": 1e-3}}


def replay_run() -> dict:
    return {"model": "vlm", "method": REPLAY, "stages": [{"task": "vcount"}, {"task": "vcolor"}],
            "eval": {"tasks": ["vcount", "vcolor"], "n": 4}, "shift": {"prompts": 2}}


def test_a_vlm_replay_run_trains_and_resumes_with_the_same_pictures(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    results = run_experiment(parse_experiment(replay_run()), out)
    assert results["tasks"] == ["vcount", "vcolor"] and len(results["matrix"]) == 3
    saved = json.loads((out / "stages" / "1" / "state" / "replay.json").read_text())
    assert list(saved) == ["vcount"] and len(saved["vcount"]) == 16 and all(len(e) == 3 for e in saved["vcount"])
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "results.json").unlink()
    shutil.rmtree(again / "stages" / "2")  # killed after stage 1: stage 2 replays vcount from the saved buffer
    resumed = run_experiment(parse_experiment(replay_run()), again)
    full, redone = (load_file(d / "stages" / "2" / "model" / "model.safetensors") for d in (out, again))
    assert all(torch.equal(full[k], redone[k]) for k in full)  # the replayed items were the same, pictures included
    assert resumed["matrix"] == results["matrix"]
