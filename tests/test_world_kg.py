"""The synthetic world, fact recall (``facts``) and two-hop questions (``kg``)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retain.errors import RetainError
from retain.tasks import get
from retain.tasks.kg import (
    COMPOSITION_PATHS,
    HELD_OUT_RELATION,
    IID_PATHS,
    TYPE_REWARD,
    ZEROSHOT_PATHS,
    FactsTask,
    KGComposeTask,
    parse_question,
    question,
)
from retain.tasks.world import ATTRIBUTES, KEYS, NAMES, RELATIONS, World, _make

WORLD = World.make(0)
KG = KGComposeTask()
FACTS = FactsTask()
LOWER = set(string.ascii_lowercase + " ?")


# ---- the world -------------------------------------------------------------------------------------------------


def test_names_are_unique_short_and_clash_with_nothing():
    assert len(NAMES) == len(set(NAMES)) == 60
    assert all(n.isalpha() and n.islower() and 3 <= len(n) <= 6 for n in NAMES)
    values = [v for vs in ATTRIBUTES.values() for v in vs]
    assert len(values) == len(set(values))  # a value names one attribute only
    assert all(6 <= len(vs) <= 10 for vs in ATTRIBUTES.values())
    assert not set(NAMES) & (set(values) | set(KEYS))


def test_world_is_deterministic_and_cached():
    assert World.make(0) is World.make(0)
    fresh = _make.__wrapped__(0)  # rebuilt, not the cached object
    assert fresh is not WORLD and fresh.atomic_facts() == WORLD.atomic_facts()
    assert World.make(1).atomic_facts() != WORLD.atomic_facts()


def test_every_person_has_one_value_per_key():
    facts = WORLD.atomic_facts()
    assert len(facts) == 60 * 7 == 420
    assert len({(s, k) for s, k, _ in facts}) == len(facts)
    for s, k, o in facts:
        assert o in WORLD.values(k)
        if k in RELATIONS:
            assert o != s  # a relation never points to oneself
    for p in NAMES:
        assert WORLD.follow(p, ("sibling", "sibling")) == p  # siblings are paired off
    for key, values in ATTRIBUTES.items():
        counts = [sum(1 for _, k, o in facts if k == key and o == v) for v in values]
        assert min(counts) >= 60 // len(values) and max(counts) <= -(-60 // len(values))  # dealt near-evenly


def test_hand_checked_lookups():
    # Seed 0, read off atomic_facts() once and pinned: a change to the world's generator shows up here.
    ava = [o for s, _, o in WORLD.atomic_facts() if s == "ava"]
    assert ava == ["bea", "mia", "zoe", "cara", "rome", "tailor", "horse"]  # mentor friend boss sibling city job pet
    assert WORLD.follow("ava", ["mentor"]) == "bea"
    assert WORLD.follow("bea", ["city"]) == "paris"
    assert WORLD.follow("ava", ("mentor", "city")) == "paris"  # = city of bea
    bea_boss = WORLD.follow("bea", ("boss",))
    assert WORLD.follow("ava", ("mentor", "boss", "job")) == WORLD.follow(bea_boss, ("job",))


@pytest.mark.parametrize(
    "person, path, needle",
    [("zed", ("city",), "zed"), ("ava", ("city", "mentor"), "'city'"), ("ava", (), "empty"), ("ava", ("age",), "age")],
)
def test_follow_rejects_bad_input(person, path, needle):
    with pytest.raises(RetainError, match=needle):
        WORLD.follow(person, path)


# ---- prompts -----------------------------------------------------------------------------------------------------


def test_question_format_and_parse_round_trip():
    assert question("ava", ("city",)) == "city of ava?"
    assert question("ava", ("mentor", "city")) == "city of mentor of ava?"
    assert parse_question(WORLD, "city of mentor of ava?") == ("ava", ("mentor", "city"))
    assert parse_question(WORLD, "<|user|>city of mentor of ava?<|assistant|>") == ("ava", ("mentor", "city"))
    for bad in ["", "city of ava", "city of zed?", "mentor of city of ava?", "age of ava?", "xcity of ava?", "ava?"]:
        assert parse_question(WORLD, bad) is None, bad


# ---- facts -------------------------------------------------------------------------------------------------------


def test_facts_are_the_whole_world_in_both_splits():
    train = FACTS.examples("train")
    assert 400 <= len(train) <= 450
    assert len({e.prompt for e in train}) == len(train)
    assert sorted(e.prompt for e in train) == sorted(e.prompt for e in FACTS.examples("test"))
    assert {(e.meta["subject"], e.meta["path"][0], e.answer) for e in train} == set(WORLD.atomic_facts())
    for e in train:
        assert len(e.prompt) <= 40 and len(e.answer) <= 12
        assert set(e.prompt) <= LOWER and set(e.answer) <= set(string.ascii_lowercase)
    with pytest.raises(RetainError, match="no split 'ood'"):
        FACTS.examples("ood")


def test_facts_rewards():
    for e in FACTS.examples("train"):
        assert FACTS.reward(e.prompt, e.answer) == 1.0
    assert FACTS.reward("city of ava?", " Rome \nmore text") == 1.0  # first line, stripped, lowercased
    assert FACTS.reward("city of ava?", "paris") == TYPE_REWARD  # a city, the wrong one
    assert FACTS.reward("city of ava?", "liam") == 0.0  # not a city
    assert FACTS.reward("mentor of ava?", "liam") == TYPE_REWARD
    assert FACTS.reward("mentor of ava?", "rome.") == 0.0
    assert FACTS.reward("what is 2+2?", "4") == 0.0
    assert not FACTS.is_correct("city of ava?", "paris")


# ---- kg ----------------------------------------------------------------------------------------------------------


def test_kg_split_sizes():
    sizes = {s: len(KG.examples(s)) for s in KG.splits}
    assert sizes == {
        "pretrain": 15 * 12,
        "train": 24 * 12,
        "test": 21 * 12,
        "ood_composition": 60 * 6,
        "ood_zeroshot": 60 * 6,
        "ood": 720,
    }


def test_kg_iid_splits_are_disjoint_by_subject():
    subjects = {s: {e.meta["subject"] for e in KG.examples(s)} for s in ("pretrain", "train", "test")}
    assert [len(v) for v in subjects.values()] == [15, 24, 21]
    assert not subjects["pretrain"] & subjects["train"]
    assert not subjects["pretrain"] & subjects["test"]
    assert not subjects["train"] & subjects["test"]
    assert set.union(*subjects.values()) == set(NAMES)
    for s, people in subjects.items():
        assert all(e.meta["people"] == s for e in KG.examples(s))


def test_kg_splits_share_no_prompt():
    prompts = {s: {e.prompt for e in KG.examples(s)} for s in KG.splits}
    parts = ["pretrain", "train", "test", "ood_composition", "ood_zeroshot"]
    for i, a in enumerate(parts):
        assert len(prompts[a]) == len(KG.examples(a))
        for b in parts[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    assert prompts["ood"] == prompts["ood_composition"] | prompts["ood_zeroshot"]
    assert not prompts["ood"] & {e.prompt for e in FACTS.examples("train")}


def test_kg_path_types_per_split():
    def types(split):
        return {e.meta["path"] for e in KG.examples(split)}

    trained = types("pretrain") | types("train")
    assert types("pretrain") == types("train") == types("test") == set(IID_PATHS)
    assert len(IID_PATHS) == 12
    # composition: seen relations only, every key of it seen in training, the pairing never
    assert types("ood_composition") == set(COMPOSITION_PATHS)
    assert not types("ood_composition") & trained
    seen_keys = {k for path in trained for k in path}
    assert all(set(path) <= seen_keys for path in COMPOSITION_PATHS)
    assert HELD_OUT_RELATION not in seen_keys  # neither first nor second hop of any training question
    # zero-shot: the held-out relation first, then a seen key
    assert types("ood_zeroshot") == set(ZEROSHOT_PATHS)
    assert all(p[0] == HELD_OUT_RELATION and p[1] in seen_keys for p in ZEROSHOT_PATHS)
    assert all(e.meta["hops"] == 2 for s in KG.splits for e in KG.examples(s))
    assert {e.meta["kind"] for e in KG.examples("ood")} == {"composition", "zeroshot"}


def test_kg_answers_score_one_and_wrong_entities_less():
    for e in KG.examples("ood") + KG.examples("pretrain") + KG.examples("train") + KG.examples("test"):
        assert e.answers == (e.answer,)
        assert e.answer == WORLD.follow(e.meta["subject"], e.meta["path"])
        assert len(e.prompt) <= 40 and len(e.answer) <= 12 and set(e.prompt) <= LOWER
        assert KG.reward(e.prompt, e.answer) == 1.0
        wrong = next(v for v in WORLD.values(e.meta["path"][-1]) if v != e.answer)
        assert KG.reward(e.prompt, wrong) == TYPE_REWARD < 1.0
        assert KG.reward(e.prompt, "") == 0.0


def test_kg_hand_worked_rewards():
    assert KG.reward("city of mentor of ava?", "paris") == 1.0  # ava -> bea -> paris
    assert KG.reward("city of mentor of ava?", "PARIS ") == 1.0
    assert KG.reward("city of mentor of ava?", "rome") == TYPE_REWARD
    assert KG.reward("city of mentor of ava?", "bea") == 0.0  # the intermediate person is not the answer
    assert KG.reward("city of mentor of ava?", "paris!") == 0.0
    assert KG.reward("city of the mentor of ava?", "paris") == 0.0  # "the" is no key: unparseable
    fn = KG.as_reward_fn()
    assert fn(["city of mentor of ava?"] * 2, ["paris", [{"role": "assistant", "content": "rome"}]]) == [1.0, 0.1]


def test_kg_examples_are_deterministic_and_prefixes():
    assert KG.examples("train", seed=3) == KGComposeTask().examples("train", seed=3)
    assert KG.examples("train", 10, seed=3) == KG.examples("train", seed=3)[:10]
    assert KG.examples("train", seed=3) != KG.examples("train", seed=4)
    assert KG.examples("train", 0) == []
    with pytest.raises(RetainError, match="no split 'valid'"):
        KG.examples("valid")


def test_registry_builds_both():
    assert isinstance(get("kg"), KGComposeTask) and isinstance(get("facts"), FactsTask)


PROMPTS = [e.prompt for e in KG.examples("ood", 20)] + [e.prompt for e in FACTS.examples("train", 20)]


@settings(max_examples=2000, deadline=None)
@given(
    prompt=st.one_of(st.sampled_from(PROMPTS), st.text(max_size=300)),
    completion=st.one_of(st.text(max_size=600), st.sampled_from(NAMES), st.just("a" * 10_000 + "\n")),
)
def test_hostile_input_never_raises(prompt, completion):
    for task in (KG, FACTS):
        assert 0.0 <= task.reward(prompt, completion) <= 1.0
