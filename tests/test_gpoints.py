"""GeneralPoints (retain.tasks.gpoints): splits, the rule shift, answers and the 1.0 / 0.2 / 0.1 / 0.0 reward."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retain import tasks
from retain.errors import RetainError
from retain.tasks.gpoints import GeneralPointsTask, prompt_for, values

class ThreeCardsTo12(GeneralPointsTask):
    """The one-target variant the hand-worked cases below use (3 cards, target 12): every number is checkable by hand."""

    n_cards = 3
    targets = (12,)


TASK = ThreeCardsTo12()
ID_PROMPT = "cards 4 7 k, j=q=k=10, make 12"  # values 4 7 10
OOD_PROMPT = "cards 2 3 k, j=11 q=12 k=13, make 12"  # values 2 3 13
HOSTILE = [
    "__import__('os').system('x')",
    "lambda: 4*(10-7)",
    "9" * 500,
    "(" * 1000,
    "(" * 1000 + "4*(10-7)" + ")" * 1000,
    "1/0",
    "1/(3-3)",
    "4*(10-7)/(3-3)",
    "4*(k-7)",
    "٤*(10-7)",
]


def _ranks(cards: tuple[str, ...]) -> tuple[int, ...]:
    named = {"a": 1, "j": 11, "q": 12, "k": 13}
    return tuple(named.get(c) or int(c) for c in cards)


def test_registered_and_splits() -> None:
    assert isinstance(tasks.get("gpoints"), GeneralPointsTask)
    assert TASK.splits == ("pretrain", "train", "test", "ood")
    with pytest.raises(RetainError):
        TASK.examples("validation")
    with pytest.raises(RetainError):
        TASK.examples("train", n=-1)


def test_prompt_format() -> None:
    assert prompt_for((13, 4, 7), "id", 12) == ID_PROMPT  # cards shown in rank order
    assert prompt_for((2, 3, 13), "ood", 12) == OOD_PROMPT
    assert prompt_for((1, 10, 12), "id", 12) == "cards a 10 q, j=q=k=10, make 12"
    assert values((1, 11, 12, 13), "id") == (1, 10, 10, 10)
    assert values((1, 11, 12, 13), "ood") == (1, 11, 12, 13)


def test_split_sizes() -> None:
    # 150 of the 455 three-card hands reach 12 under j=q=k=10, cut 46/58/46 (by value multiset, weighted);
    # 86 of the 235 hands holding a face card reach 12 under j=11 q=12 k=13: 22 join pretrain, 64 are the ood split
    sizes = {split: len(TASK.examples(split)) for split in TASK.splits}
    assert sizes == {"pretrain": 46 + 22, "train": 58, "test": 46, "ood": 64}
    assert sum(e.meta["rule"] == "ood" for e in TASK.examples("pretrain")) == 22


def test_registered_task_is_three_cards_to_10_through_24() -> None:
    task = tasks.get("gpoints")
    assert (task.n_cards, task.targets) == (3, tuple(range(10, 25)))
    sizes = {split: len(task.examples(split)) for split in task.splits}
    assert sizes == {"pretrain": 698, "train": 652, "test": 492, "ood": 616}
    assert sum(e.meta["rule"] == "ood" for e in task.examples("pretrain")) == 206
    for split in task.splits:
        for e in task.examples(split, 40):
            assert 10 <= e.meta["target"] <= 24 and len(e.prompt.split(",")[0].split()) == 4
            assert all(task.reward(e.prompt, a) == 1.0 for a in e.answers)


def test_classic_game_is_a_subclass_away() -> None:
    class Classic(GeneralPointsTask):
        n_cards, targets = 4, (24,)

    e = Classic().examples("test", 1)[0]
    assert e.prompt.endswith(", j=q=k=10, make 24") and len(e.prompt.split(",")[0].split()) == 5
    assert all(Classic().reward(e.prompt, a) == 1.0 for a in e.answers)


def test_splits_are_disjoint_including_value_twins() -> None:
    seen_prompts: set[str] = set()
    seen_values: set[tuple[int, ...]] = set()
    for split in ("pretrain", "train", "test"):
        examples = TASK.examples(split)
        prompts = {e.prompt for e in examples}
        value_sets = {tuple(sorted(e.meta["values"])) for e in examples}
        assert len(prompts) == len(examples)
        assert not prompts & seen_prompts
        assert not value_sets & seen_values  # "j 2 10" and "q 2 10" never straddle splits
        seen_prompts |= prompts
        seen_values |= value_sets
    assert not {e.prompt for e in TASK.examples("ood")} & seen_prompts


def test_examples_are_deterministic_and_seed_orders_them() -> None:
    first = TASK.examples("train", seed=0)
    assert first == ThreeCardsTo12().examples("train", seed=0)  # a fresh object gives the same
    other = TASK.examples("train", seed=1)
    assert [e.prompt for e in other] != [e.prompt for e in first]
    assert sorted(e.prompt for e in other) == sorted(e.prompt for e in first)
    assert TASK.examples("train", n=5, seed=3) == TASK.examples("train", seed=3)[:5]
    assert TASK.examples("train", n=10_000) == first
    assert TASK.examples("train", n=0) == []


def test_rules_in_and_out_of_distribution() -> None:
    ood_values = {tuple(sorted(e.meta["values"])) for e in TASK.examples("ood")}
    for e in TASK.examples("pretrain"):  # the OOD rule's pretraining slice: value multisets the ood split never has
        if e.meta["rule"] == "ood":
            assert ", j=11 q=12 k=13, make 12" in e.prompt and tuple(sorted(e.meta["values"])) not in ood_values
    for split in ("pretrain", "train", "test"):
        for e in TASK.examples(split):
            if e.meta["rule"] == "ood":
                continue
            assert ", j=q=k=10, make 12" in e.prompt
            assert e.meta["values"] == tuple(min(r, 10) for r in _ranks(e.meta["cards"]))
            assert max(e.meta["values"]) <= 10
    faces_seen: set[int] = set()
    for e in TASK.examples("ood"):
        assert ", j=11 q=12 k=13, make 12" in e.prompt
        ranks = _ranks(e.meta["cards"])
        assert any(r >= 11 for r in ranks)
        assert e.meta["values"] == ranks
        faces_seen |= {r for r in ranks if r >= 11}
    assert faces_seen == {11, 12, 13}


def test_every_answer_scores_full_reward() -> None:
    for split in TASK.splits:
        for e in TASK.examples(split):
            assert len(e.prompt) <= 48
            assert e.answer == e.answers[0]
            assert len(e.answers) == len(set(e.answers)) <= 32
            assert e.meta["target"] == 12 and sorted(e.meta["numbers"]) == sorted(e.meta["values"])
            for answer in e.answers:
                assert TASK.reward(e.prompt, answer) == 1.0
                assert TASK.is_correct(e.prompt, answer)


def test_known_example_and_its_answers() -> None:
    [e] = [e for e in TASK.examples("test") if e.prompt == ID_PROMPT]
    # every 3-card tree is "card op (other two)": 7 with 4,10 (14 6 -6 40 2/5 5/2) and 10 with 4,7 (11 3 -3 28 4/7
    # 7/4) never make 12, 4 with 7,10 does only as 4*(10-7); two spellings, equal length, "(" sorts before "4"
    assert e.answers == ("(10-7)*4", "4*(10-7)")
    assert e.answer == "(10-7)*4"
    assert e.meta["cards"] == ("4", "7", "k")


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        (ID_PROMPT, "4*(10-7)", 1.0),
        (ID_PROMPT, "(10-7)*4", 1.0),
        (ID_PROMPT, " 4 * (10 - 7) ", 1.0),
        (ID_PROMPT, "4*(10-7)\nthat is 12", 1.0),  # only the first line counts
        (ID_PROMPT, "4+7+10", 0.2),  # 21
        (ID_PROMPT, "4*(13-7)", 0.1),  # k is 10 under this rule
        (ID_PROMPT, "12", 0.1),
        (ID_PROMPT, "4*(k-7)", 0.0),  # cards are written as numbers
        (ID_PROMPT, "4*(10-7)=12", 0.0),
        (ID_PROMPT, "4*(10-7)/0", 0.0),
        (OOD_PROMPT, "13-3+2", 1.0),
        (OOD_PROMPT, "13+3-2", 0.2),  # 14
        (OOD_PROMPT, "10+2", 0.1),  # k is 13 under this rule, and the 3 is missing
        ("cards a a 10, j=q=k=10, make 12", "10+1+1", 1.0),  # an ace is 1
        ("<|user|>" + ID_PROMPT + "<|assistant|>", "4*(10-7)", 1.0),  # a chat-templated prompt still reads
        ("cards 4 7 k, j=q=k=9, make 12", "4*(10-7)", 0.0),  # not a prompt this task writes
        ("hello", "4*(10-7)", 0.0),
        ("", "", 0.0),
    ],
)
def test_reward_hand_worked(prompt: str, completion: str, expected: float) -> None:
    assert TASK.reward(prompt, completion) == expected


def test_reward_ignores_answer_column_and_bounds_length() -> None:
    assert TASK.reward(ID_PROMPT, "(10-7)*4", answer="4*(10-7)") == 1.0
    assert TASK.reward(ID_PROMPT, "4*(10-7)" + " " * 300) == 1.0  # clipped to 256 characters, then stripped
    assert TASK.reward(ID_PROMPT, " " * 300 + "4*(10-7)") == 0.0  # the answer lies past the clip


def test_as_reward_fn_on_lists() -> None:
    fn = TASK.as_reward_fn()
    assert fn.__name__ == "gpoints_reward"
    prompts = [ID_PROMPT, ID_PROMPT, OOD_PROMPT, "junk"]
    completions = ["4*(10-7)", "4+7+10", [{"role": "assistant", "content": "13-3+2"}], "1"]
    assert fn(prompts, completions) == [1.0, 0.2, 1.0, 0.0]
    assert fn(prompts, completions, answer=["x", "x", "x", "x"]) == [1.0, 0.2, 1.0, 0.0]


_PROMPTS = [e.prompt for split in TASK.splits for e in TASK.examples(split)]
_COMPLETIONS = st.one_of(
    st.text(),
    st.sampled_from(HOSTILE),
    st.text(alphabet="0123456789+-*/() jqka", max_size=70),
    st.sampled_from([a for e in TASK.examples("ood") for a in e.answers]),
)


@settings(max_examples=10_000, deadline=None)
@given(st.one_of(st.sampled_from(_PROMPTS), st.text()), _COMPLETIONS)
def test_reward_never_raises(prompt: str, completion: str) -> None:
    assert TASK.reward(prompt, completion) in (0.0, 0.1, 0.2, 1.0)
