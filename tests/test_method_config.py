"""Method configuration: presets, deep-merged overrides, strict validation with field paths (SPEC §2)."""

from __future__ import annotations

import pytest

from retain.errors import RetainError
from retain.methods.config import (
    PRESETS, ConflictMaskedLoss, EAFTLoss, GRPOLoss, KLRefReg, L2SPReg, MethodConfig, NLLLoss, OfflineData,
    OnPolicyData, method_config,
)

# what each preset must be made of: (data kind, loss kind, regulariser kinds, replay?, adapter?)
EXPECTED_PARTS = {
    "sft": ("offline", "nll", [], False, False),
    "grpo": ("on_policy", "grpo", [], False, False),
    "self_sft": ("self", "nll", [], False, False),
    "iterative_sft": ("iterative", "nll", [], False, False),
    "rl_sample_sft": ("self", "nll", [], False, False),
    "eaft": ("offline", "eaft", [], False, False),
    "conflict_sft": ("offline", "conflict_masked", [], False, False),
    "kl_sft": ("offline", "nll", ["kl_ref"], False, False),
    "lwf": ("offline", "nll", ["distill"], False, False),
    "replay": ("offline", "nll", [], True, False),
    "l2sp": ("offline", "nll", ["l2sp"], False, False),
    "ewc": ("offline", "nll", ["ewc"], False, False),
    "lora": ("offline", "nll", [], False, True),
    "multitask": ("multitask", "nll", [], False, False),
    "sft_likely": ("offline", "nll", [], False, False),
    "sft_unlikely": ("offline", "nll", [], False, False),
    "dft": ("offline", "dft", [], False, False),
    "sft_varied": ("offline", "nll", [], False, False),
    "psft": ("offline", "psft", [], False, False),
    "grpo_positive": ("on_policy", "grpo", [], False, False),
    "chord": ("on_policy", "grpo", ["sft_mix"], False, False),
    "opd": ("on_policy", "teacher_kl", [], False, False),
    "sdft": ("on_policy", "teacher_kl", [], False, False),
    "sdft_live": ("on_policy", "teacher_kl", [], False, False),
}


def test_every_preset_is_listed_here():
    assert set(PRESETS) == set(EXPECTED_PARTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARTS))
def test_every_preset_validates_with_its_parts(name):
    cfg = method_config(name)
    data, loss, regs, replay, adapter = EXPECTED_PARTS[name]
    assert cfg.name == name
    assert cfg.data.kind == data and cfg.loss.kind == loss
    assert [r.kind for r in cfg.regularizers] == regs
    assert (cfg.replay is not None) == replay and (cfg.adapter is not None) == adapter
    # the same preset through the dict form gives the same config
    assert method_config({"name": name}) == cfg


def test_preset_training_defaults():
    assert (method_config("sft").train.steps, method_config("sft").train.lr) == (150, 3e-4)
    assert (method_config("grpo").train.steps, method_config("grpo").train.lr) == (60, 1e-4)
    assert method_config("lora").train.lr == 2e-3
    assert method_config("rl_sample_sft").data.source_model is None


def test_override_deep_merges_into_the_preset_part():
    cfg = method_config({"name": "eaft", "loss": {"k": 10}})
    assert isinstance(cfg.loss, EAFTLoss)
    assert (cfg.loss.kind, cfg.loss.k, cfg.loss.alpha) == ("eaft", 10, 1.0)
    # train overrides merge with the preset's train section: steps kept, lr replaced
    cfg = method_config({"name": "eaft", "train": {"lr": 1e-4}})
    assert (cfg.train.steps, cfg.train.lr) == (150, 1e-4)
    # the same kind named explicitly still merges
    cfg = method_config({"name": "grpo", "data": {"kind": "on_policy", "group_size": 4}})
    assert isinstance(cfg.data, OnPolicyData) and (cfg.data.group_size, cfg.data.prompts_per_step) == (4, 16)


def test_override_does_not_mutate_presets():
    method_config({"name": "sft", "train": {"lr": 0.5, "steps": 3}})
    method_config({"name": "eaft", "loss": {"k": 3}})
    assert PRESETS["sft"]["train"] == {"steps": 150, "lr": 3e-4}
    assert PRESETS["eaft"]["train"] == {"steps": 150, "lr": 3e-4}  # a dict shared between presets
    assert PRESETS["eaft"]["loss"] == {"kind": "eaft"}
    assert method_config("eaft").loss.k == 20


def test_changing_a_parts_kind_replaces_it_whole():
    cfg = method_config({"name": "eaft", "loss": {"kind": "conflict_masked"}})
    assert cfg.loss == ConflictMaskedLoss()
    # the old part's fields are not carried over: k is not a field of conflict_masked, even if the eaft preset had it
    with pytest.raises(RetainError, match="k"):
        method_config({"name": "eaft", "loss": {"kind": "conflict_masked", "k": 10}})
    cfg = method_config({"name": "eaft", "loss": {"kind": "nll"}})
    assert cfg.loss == NLLLoss() and cfg.name == "eaft"


def test_lists_are_replaced_not_merged():
    cfg = method_config({"name": "kl_sft", "regularizers": [{"kind": "l2sp", "weight": 0.5}]})
    assert cfg.regularizers == [L2SPReg(weight=0.5)]
    cfg = method_config({"name": "kl_sft", "regularizers": []})
    assert cfg.regularizers == []


def test_custom_and_passthrough():
    cfg = method_config({"data": {"kind": "on_policy", "group_size": 3}, "loss": {"kind": "grpo", "beta": 0.04}})
    assert cfg.name == "custom" and isinstance(cfg.loss, GRPOLoss) and cfg.loss.beta == 0.04
    assert cfg.data.group_size == 3
    assert method_config({}) == MethodConfig()
    assert isinstance(MethodConfig().data, OfflineData)
    assert method_config(cfg) is cfg
    cfg = method_config({"regularizers": [{"kind": "kl_ref"}, {"kind": "l2sp"}]})
    assert cfg.regularizers == [KLRefReg(), L2SPReg()]


@pytest.mark.parametrize(
    "spec, prefix, words",
    [
        ("nope", "method.name:", ["'nope'", "sft", "grpo"]),
        ({"name": "nope"}, "method.name:", ["'nope'"]),
        ({"name": "sft", "foo": 1}, "method.foo:", ["Extra inputs"]),
        ({"name": "sft", "train": {"lr": -1e-3}}, "method.train.lr:", ["greater than 0"]),
        ({"name": "sft", "train": {"lr": 0}}, "method.train.lr:", ["greater than 0"]),
        ({"name": "sft", "train": {"bogus": 1}}, "method.train.bogus:", []),
        ({"name": "sft", "batch_size": 0}, "method.batch_size:", []),
        ({"name": "replay", "replay": {"ratio": 1.0}}, "method.replay.ratio:", ["less than 1"]),
        ({"name": "sft", "loss": {"kind": "grpo"}}, "method", ["loss.kind", "'grpo'", "data.kind", "'offline'"]),
        ({"name": "grpo", "loss": {"kind": "nll"}}, "method", ["loss.kind", "'nll'", "'on_policy'"]),
        ({"name": "grpo", "data": {"group_size": 1}}, "method.data", ["group_size", "greater than or equal to 2"]),
        ({"name": "l2sp", "regularizers": [{"kind": "l2sp"}, {"kind": "l2sp"}]}, "method", ["regularizers", "l2sp"]),
        ({"name": "grpo", "replay": {}}, "method", ["replay", "on_policy"]),
        ({"name": "sft", "data": {"kind": "bogus"}}, "method.data", ["'bogus'", "offline"]),
        ({"name": "sft", "loss": {"kind": "teacher_kl"}}, "method", ["'teacher_kl'", "on_policy"]),
        ({"name": "opd", "loss": {"teacher": "live"}}, "method.loss", ["'live'", "KL is 0"]),
        ({"name": "opd", "loss": {"teacher": "/no/such/dir"}}, "method.loss", ["'/no/such/dir'"]),
        ({"name": "sdft", "loss": {"template": "{prompt} only"}}, "method.loss", ["{demonstration}"]),
        ({"name": "sdft", "loss": {"direction": "sideways"}}, "method.loss.direction", ["reverse", "forward"]),
        ({"name": "sft", "regularizers": [{"kind": "sft_mix"}]}, "method", ["sft_mix", "grpo"]),
        ({"name": "opd", "regularizers": [{"kind": "sft_mix"}]}, "method", ["sft_mix", "grpo"]),
        ({"name": "chord", "regularizers": [{"kind": "sft_mix", "weight": 1.5}]}, "method.regularizers.0.weight",
         ["less than or equal to 1"]),
        ({"name": "psft", "train": {"checkpoint_every": 3}}, "method", ["checkpoint_every", "updates_per_batch"]),
        ({"name": "psft", "data": {"kind": "iterative"}}, "method", ["psft", "iterative"]),
        ({"name": "sft", "data": {"prompts": "some"}}, "method.data.prompts", ["varied"]),
        ({"name": "opd", "loss": {"teacher": "ema"}, "adapter": {}}, "method", ["ema", "adapter"]),
    ],
)
def test_invalid_configs_name_the_field(spec, prefix, words):
    with pytest.raises(RetainError) as err:
        method_config(spec)
    msg = str(err.value)
    assert msg.startswith(prefix), msg
    for word in words:
        assert word in msg, (word, msg)
    assert "\n" not in msg  # one line


def test_where_prefixes_the_path():
    with pytest.raises(RetainError, match=r"^stages\[1\]\.method\.train\.lr:"):
        method_config({"name": "sft", "train": {"lr": -1}}, where="stages[1].method")
    with pytest.raises(RetainError, match=r"^stages\[0\]\.method\.name:"):
        method_config("nope", where="stages[0].method")


@pytest.mark.parametrize(
    "spec, path",
    [
        ({"name": "grpo", "data": {"group_size": 1}}, "method.data.group_size:"),
        ({"name": "eaft", "loss": {"k": 1}}, "method.loss.k:"),
        ({"name": "l2sp", "regularizers": [{"kind": "l2sp", "weight": -1}]}, "method.regularizers.0.weight:"),
    ],
)
def test_error_path_is_the_users_path(spec, path):
    with pytest.raises(RetainError) as err:
        method_config(spec)
    assert str(err.value).startswith(path), str(err.value)


def test_new_parts_compose_from_overrides():
    cfg = method_config({"name": "opd", "loss": {"teacher": "ema", "ema_rate": 0.5, "refresh_every": 2}})
    assert (cfg.loss.teacher, cfg.loss.ema_rate, cfg.loss.refresh_every, cfg.loss.direction) == ("ema", 0.5, 2, "reverse")
    assert method_config("sdft").loss.direction == "forward"  # the authors' per-token forward KL
    assert method_config("sdft").loss.teacher == "start" and method_config("sdft_live").loss.teacher == "live"
    cfg = method_config({"name": "chord", "regularizers": [{"kind": "sft_mix", "weight": 0.2}]})
    assert cfg.regularizers[0].weight == 0.2 and cfg.regularizers[0].weight_end is None  # a fixed weight
    assert method_config("grpo_positive").loss.positive_only and not method_config("grpo").loss.positive_only
    # a recover stage: distil back towards the embedded base, on any task
    assert method_config({"name": "opd", "loss": {"teacher": "base"}}).loss.teacher == "base"


def test_grpo_with_a_regularizer_is_refused_not_ignored():
    with pytest.raises(RetainError, match="loss.beta"):
        method_config({"name": "grpo", "regularizers": [{"kind": "l2sp"}]})
