"""Countdown (retain.tasks.countdown): splits, the length shift, answers and the 1.0 / 0.2 / 0.1 / 0.0 reward."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retain import tasks
from retain.errors import RetainError
from retain.tasks.countdown import CountdownTask, prompt_for

TASK = CountdownTask()
PROMPT = "use 3 5 8 to make 23"  # a train prompt
OOD_PROMPT = "use 2 3 5 8 to make 31"
HOSTILE = [
    "__import__('os').system('x')",
    "lambda: 3*5+8",
    "[x for x in ()]",
    "9" * 500,
    "(" * 1000,
    ")" * 1000 + "3*5+8",
    "1/0",
    "1/(3-3)",
    "3*5+8/(5-5)",
    "٣*5+8",
    "3*5+8\x00",
]


def _puzzles(split: str) -> list:
    return TASK.pools[split]  # the split's (hand, target) list, without enumerating answers


def test_registered_and_splits() -> None:
    assert isinstance(tasks.get("countdown"), CountdownTask)
    assert TASK.splits == ("pretrain", "train", "test", "ood")
    with pytest.raises(RetainError):
        TASK.examples("dev")
    with pytest.raises(RetainError):
        TASK.examples("ood", n=-3)


def test_prompt_format() -> None:
    assert prompt_for((8, 3, 5), 23) == PROMPT  # numbers shown in ascending order
    assert prompt_for((8, 5, 3, 2), 31) == OOD_PROMPT


def test_split_sizes_and_shapes() -> None:
    sizes = {split: len(_puzzles(split)) for split in TASK.splits}
    assert sizes == {"pretrain": 399, "train": 525, "test": 395, "ood": 17_122}
    for split in TASK.splits:
        width = 4 if split == "ood" else 3
        for p in _puzzles(split):
            assert len(p.numbers) == width and all(1 <= n <= 9 for n in p.numbers)
            assert 10 <= p.target <= 99
            assert len(p.prompt) <= 48


def test_splits_are_disjoint_by_hand() -> None:
    hands = {split: {p.numbers for p in _puzzles(split)} for split in TASK.splits}
    assert not hands["pretrain"] & hands["train"]
    assert not hands["pretrain"] & hands["test"]
    assert not hands["train"] & hands["test"]
    # 165 hands, less the 7 whose best is under 10: 1 1 1 (3), 1 1 2 (4), 1 1 3 (6), 1 1 4 (8), 1 2 2 (6),
    # 1 2 3 ((1+2)*3 = 9), 2 2 2 (8)
    assert len(hands["pretrain"] | hands["train"] | hands["test"]) == 158
    # 495 four-digit hands, less 1 1 1 1 (4), 1 1 1 2 (6), 1 1 1 3 ((1+1+1)*3 = 9), 1 1 2 2 ((1+2)*(1+2) = 9)
    assert len(hands["ood"]) == 491
    prompts = [p.prompt for split in TASK.splits for p in _puzzles(split)]
    assert len(prompts) == len(set(prompts))


def test_examples_are_deterministic_and_seed_orders_them() -> None:
    first = TASK.examples("test", seed=0)
    assert first == CountdownTask().examples("test", seed=0)
    other = TASK.examples("test", seed=7)
    assert [e.prompt for e in other] != [e.prompt for e in first]
    assert sorted(e.prompt for e in other) == sorted(e.prompt for e in first)
    assert TASK.examples("test", n=20, seed=7) == other[:20]
    assert TASK.examples("ood", n=5, seed=1) == TASK.examples("ood", n=5, seed=1)


def test_every_answer_scores_full_reward() -> None:
    examples = [e for split in ("pretrain", "train", "test") for e in TASK.examples(split)]
    examples += TASK.examples("ood", n=400)
    for e in examples:
        assert e.answer == e.answers[0]
        assert len(e.answers) == len(set(e.answers)) <= 32
        assert "/" not in "".join(e.answers)
        for answer in e.answers:
            assert TASK.reward(e.prompt, answer) == 1.0


def test_known_examples() -> None:
    [e] = [e for e in TASK.examples("pretrain") if e.prompt == "use 2 4 8 to make 16"]
    # 16 = 2*4+8 (four spellings) or (4-2)*8 (two), shortest first
    assert e.answers == ("2*4+8", "4*2+8", "8+2*4", "8+4*2", "(4-2)*8", "8*(4-2)")
    assert e.meta == {"numbers": (2, 4, 8), "target": 16}
    # 10 from 1 1 1 is out of reach (at most 3): such targets are never asked
    assert "use 1 1 1 to make 10" not in {p.prompt for split in TASK.splits for p in _puzzles(split)}


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        (PROMPT, "3*5+8", 1.0),
        (PROMPT, "8+(5*3)", 1.0),
        (PROMPT, "3+5+8", 0.2),  # 16
        (PROMPT, "3*5+9", 0.1),  # a 9 for the 8
        (PROMPT, "23", 0.1),
        (PROMPT, "3*5+8=23", 0.0),
        (PROMPT, "three", 0.0),
        (PROMPT, "8*3-5/5", 0.0),  # no division in countdown
        ("use 2 4 8 to make 16", "8/2*4", 0.0),  # 16, but "/" is not allowed
        (OOD_PROMPT, "2*8+3*5", 1.0),
        (OOD_PROMPT, "2*8+3+5", 0.2),  # 24
        (OOD_PROMPT, "3*5+8", 0.1),  # the 2 is missing
        ("<|user|>" + PROMPT + "<|assistant|>", "3*5+8", 1.0),
        ("use three numbers to make 23", "3*5+8", 0.0),
        ("", "3*5+8", 0.0),
    ],
)
def test_reward_hand_worked(prompt: str, completion: str, expected: float) -> None:
    assert TASK.reward(prompt, completion) == expected


def test_as_reward_fn_on_lists() -> None:
    fn = TASK.as_reward_fn()
    prompts = [PROMPT, PROMPT, OOD_PROMPT, PROMPT]
    completions = ["3*5+8", "3+5+8", [{"role": "assistant", "content": "2*8+3*5"}], "3*5+8\n= 23"]
    assert fn(prompts, completions) == [1.0, 0.2, 1.0, 1.0]
    assert fn(prompts, completions, answer=["3*5+8"] * 4) == [1.0, 0.2, 1.0, 1.0]


_PROMPTS = [p.prompt for split in ("pretrain", "train", "test") for p in _puzzles(split)] + [
    p.prompt for p in _puzzles("ood")[::50]
]
_COMPLETIONS = st.one_of(
    st.text(),
    st.sampled_from(HOSTILE),
    st.text(alphabet="0123456789+-*/() ", max_size=70),
    st.sampled_from([a for e in TASK.examples("train") for a in e.answers]),
)


@settings(max_examples=10_000, deadline=None)
@given(st.one_of(st.sampled_from(_PROMPTS), st.text()), _COMPLETIONS)
def test_reward_never_raises(prompt: str, completion: str) -> None:
    assert TASK.reward(prompt, completion) in (0.0, 0.1, 0.2, 1.0)
