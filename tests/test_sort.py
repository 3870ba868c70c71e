"""The sort task: disjoint, stable splits; the reward's three levels; prompts it did not write score 0."""

from retain import tasks
from retain.tasks.sort import PERMUTATION_REWARD, split_of


def test_splits_are_disjoint_stable_and_follow_the_hash():
    task = tasks.get("sort")
    words = {s: {e.meta["word"] for e in task.examples(s)} for s in task.splits}
    assert not (words["pretrain"] & words["train"]) and not (words["train"] & words["test"])
    assert not (words["pretrain"] & words["test"])
    assert all(split_of(w) == s for s, ws in words.items() for w in ws)
    assert [e.prompt for e in task.examples("test", 5, seed=3)] == [e.prompt for e in task.examples("test", 5, seed=3)]
    assert [e.prompt for e in task.examples("test", 5, seed=3)] != [e.prompt for e in task.examples("test", 5, seed=4)]
    assert len(words["test"]) == 2000 and all(5 <= len(w) <= 7 for w in words["test"])


def test_reward_levels():
    task = tasks.get("sort")
    assert task.reward("sort dbca", "abcd") == 1.0
    assert task.reward("sort dbca", " abcd \nzz") == 1.0  # first line, stripped
    assert task.reward("sort dbca", "dcba") == PERMUTATION_REWARD  # the right letters in the wrong order
    assert task.reward("sort dbca", "abce") == 0.0
    assert task.reward("sort aab", "aab") == 1.0 and task.reward("sort aab", "ab") == 0.0
    assert task.reward("reverse abc", "abc") == 0.0  # not a prompt this task writes
    assert task.is_correct("sort cab", "abc") and not task.is_correct("sort cab", "cab")
    example = task.examples("train", 1)[0]
    assert task.reward(example.prompt, example.answer) == 1.0
