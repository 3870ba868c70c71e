"""Which kind of model a config trains (``model_kind``, ``retain.kind``): a hub VLM is recognised from the local
Hugging Face cache's config.json without the network, the field states it for a hub model not yet downloaded, and
what auto cannot tell is said in one line."""

from __future__ import annotations

import json
import logging

import pytest

from retain.config import parse_experiment
from retain.errors import RetainError

HUB_VLM = "Qwen/Qwen2.5-VL-3B-Instruct"
COMMIT = "0" * 40
# the fields of Qwen2.5-VL-3B-Instruct's config.json that say what it is (its vision tower under vision_config)
QWEN_VL_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048, "patch_size": 14},
}


def cache_holding(root, repo: str, config: dict) -> None:
    """A Hugging Face hub cache laid out as huggingface_hub writes it: refs/main -> a snapshot with config.json."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def visual(model: str, **extra) -> dict:
    return {"model": model, "stages": [{"task": "gpoints_vl", "steps": 1}], "eval": {"tasks": ["gpoints_vl"]}, **extra}


def test_a_cached_hub_vlm_is_a_vlm(hub_cache):
    cache_holding(hub_cache, HUB_VLM, QWEN_VL_CONFIG)
    cfg = parse_experiment(visual(HUB_VLM))
    assert cfg.kind().name == "vision" and cfg.kind().spec == HUB_VLM


def test_a_cached_hub_text_model_is_text(hub_cache):
    cache_holding(hub_cache, "Qwen/Qwen2.5-0.5B-Instruct", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    cfg = parse_experiment({"model": "Qwen/Qwen2.5-0.5B-Instruct", "stages": [{"task": "kg"}]})
    assert cfg.kind().name == "text"


def test_an_uncached_hub_name_is_taken_as_text_and_says_so_in_one_line(hub_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="retain"):
        cfg = parse_experiment({"model": HUB_VLM, "stages": [{"task": "kg"}]})
    assert cfg.kind().name == "text"
    said = [r.getMessage() for r in caplog.records if r.name == "retain"]
    assert len(said) == 1 and "\n" not in said[0]
    assert HUB_VLM in said[0] and "taken as a text model" in said[0] and "model_kind: vlm" in said[0]
    with pytest.raises(RetainError, match="model_kind: vlm for a hub VLM not yet downloaded") as err:
        parse_experiment(visual(HUB_VLM))  # a visual task refuses the assumption, naming the field
    assert "\n" not in str(err.value)


def test_a_declared_kind_wins(hub_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="retain"):
        declared = parse_experiment(visual(HUB_VLM, model_kind="vlm"))  # not cached: the field says it
    assert declared.kind().name == "vision" and not [r for r in caplog.records if r.name == "retain"]
    cache_holding(hub_cache, HUB_VLM, QWEN_VL_CONFIG)
    as_text = parse_experiment({"model": HUB_VLM, "model_kind": "text", "stages": [{"task": "kg"}]})
    assert as_text.kind().name == "text"  # a cached VLM declared text is loaded as text
    assert parse_experiment(visual("vlm", model_kind="auto")).kind().name == "vision"


def test_declaring_vlm_for_a_model_whose_config_has_no_vision_tower_is_refused():
    with pytest.raises(RetainError) as err:
        parse_experiment({"model": "base", "model_kind": "vlm", "stages": [{"task": "kg"}]})
    assert "model_kind: 'vlm', but the config.json of model 'base' has no vision tower" in str(err.value)


@pytest.mark.parametrize("bad", ["vision", "VLM", 3])
def test_a_bad_model_kind_is_one_error_naming_the_field(bad):
    with pytest.raises(RetainError) as err:
        parse_experiment({"model": "base", "model_kind": bad, "stages": [{"task": "kg"}]}, "exp.yaml")
    assert str(err.value).startswith("exp.yaml: model_kind: ") and "'auto', 'text' or 'vlm'" in str(err.value)
    assert "\n" not in str(err.value)
