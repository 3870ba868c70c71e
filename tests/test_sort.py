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


def test_prompt_variants_are_read_by_the_reward_and_tokenized_without_unknowns():
    from retain.models.loading import load_model
    from retain.tasks.sort import TEMPLATES

    task = tasks.get("sort")
    variants = task.prompt_variants("sort qbxeh")
    assert variants[0] == "sort qbxeh" and len(set(variants)) == len(TEMPLATES) == 5
    assert all("qbxeh" in v for v in variants)
    assert [task.reward(v, "behqx") for v in variants] == [1.0] * 5  # every template asks for the same sort
    assert [task.reward(v, "qbxeh") for v in variants] == [PERMUTATION_REWARD] * 5
    assert task.prompt_variants("reverse abc") == ["reverse abc"]  # not a prompt this task writes
    assert task.reward("sort the letters qbxeh please", "behqx") == 0.0  # a template must match whole
    _, tok = load_model("base")
    unk = tok.convert_tokens_to_ids("<unk>")
    assert all(unk not in tok(v)["input_ids"] for v in variants)


def test_template_diverse_sft_trains_every_template_on_sort():
    from retain.methods.sources import varied_prompts

    task = tasks.get("sort")
    pairs = [(e.prompt, e.answer) for e in task.examples("train", 3)]
    out = varied_prompts(task, pairs, "sort")
    assert len(out) == 15 and {a for _, a in out} == {a for _, a in pairs}
    assert all(task.reward(p, a) == 1.0 for p, a in out)
