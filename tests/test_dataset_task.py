"""Dataset-backed tasks: loading, splits, the three verifiers, and one clear error per bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retain.errors import RetainError
from retain.tasks import get
from retain.tasks.dataset import DatasetTask, last_number

ROWS = [
    {"prompt": "2+2?", "answer": "4"},
    {"prompt": "capital of france?", "answer": "Paris"},
    {"prompt": "half of 3?", "answer": "1.5"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---- loading -----------------------------------------------------------------------------------------------------


def check_round_trip(task):
    assert task.splits == ("train", "test")
    for split in task.splits:  # no split column: every row is in train and in test
        got = sorted((e.prompt, e.answer) for e in task.examples(split))
        assert got == sorted((r["prompt"], r["answer"]) for r in ROWS)
    for r in ROWS:
        assert task.reward(r["prompt"], r["answer"]) == 1.0


def test_jsonl_round_trip(tmp_path):
    task = DatasetTask.from_path(write_jsonl(tmp_path / "qa.jsonl", ROWS))
    check_round_trip(task)
    assert task.name == "qa" and task.verifier == "exact"


def test_parquet_round_trip(tmp_path):
    check_round_trip(DatasetTask.from_path(write_parquet(tmp_path / "qa.parquet", ROWS)))


def test_hf_dir_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "qa"))
    check_round_trip(DatasetTask.from_path(tmp_path / "qa"))
    # a DatasetDict keeps its own split names
    parts = {"train": ROWS[:2], "test": ROWS[2:]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    task = DatasetTask.from_path(tmp_path / "dd")
    assert task.splits == ("train", "test")
    assert [e.prompt for e in task.examples("test")] == ["half of 3?"]


def test_split_column_and_custom_columns(tmp_path):
    rows = [
        {"q": "a?", "a": "1", "part": "train"},
        {"q": "b?", "a": "2", "part": "ood"},
        {"q": "c?", "a": "3", "part": "train"},
    ]
    task = DatasetTask.from_path(
        write_jsonl(tmp_path / "d.jsonl", rows), prompt_column="q", answer_column="a", split_column="part", name="mine"
    )
    assert task.name == "mine" and task.splits == ("train", "ood")
    assert sorted(e.prompt for e in task.examples("train")) == ["a?", "c?"]
    assert [e.answer for e in task.examples("ood")] == ["2"]
    with pytest.raises(RetainError, match="no split 'test'"):
        task.examples("test")


def test_examples_deterministic_prefix_and_duplicate_prompts(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(30)] + [{"prompt": "p0", "answer": "zero"}]
    task = DatasetTask.from_path(write_jsonl(tmp_path / "d.jsonl", rows))
    assert task.examples("train", seed=1) == task.examples("train", seed=1)
    assert task.examples("train", 5, seed=1) == task.examples("train", seed=1)[:5]
    assert task.examples("train", seed=1) != task.examples("train", seed=2)
    # a prompt in two rows accepts either answer
    assert task.reward("p0", "0") == task.reward("p0", "ZERO") == 1.0
    p0 = sorted((e.answer, e.answers) for e in task.examples("train") if e.prompt == "p0")
    assert p0 == [("0", ("0", "zero")), ("zero", ("0", "zero"))]  # every answer of the prompt, file order


def test_registry_routes_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "reg.jsonl", ROWS)
    plain = get("reg.jsonl")
    assert isinstance(plain, DatasetTask) and plain.verifier == "exact" and plain.reward("2+2?", "4") == 1.0
    write_jsonl(tmp_path / "num.jsonl", [ROWS[0], ROWS[2]])
    numeric = get("num.jsonl:numeric")
    assert numeric.verifier == "numeric" and numeric.reward("half of 3?", "it is 1.50") == 1.0
    with pytest.raises(RetainError, match="unknown verifier 'bogus'"):
        get("reg.jsonl:bogus")


# ---- verifiers, worked by hand -----------------------------------------------------------------------------------


def make(tmp_path, verifier, rows, pattern=None):
    return DatasetTask.from_path(write_jsonl(tmp_path / "v.jsonl", rows), verifier=verifier, pattern=pattern)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Paris", 1.0),
        ("  paris  ", 1.0),
        ("PARIS\nbecause", 1.0),  # the first line only
        ("paris.", 0.0),
        ("the answer is paris", 0.0),
        ("", 0.0),
    ],
)
def test_exact_verifier(tmp_path, completion, expected):
    task = make(tmp_path, "exact", [{"prompt": "q", "answer": " Paris "}])
    assert task.reward("q", completion) == expected


@pytest.mark.parametrize(
    "answer, completion, expected",
    [
        ("1000000", "1000000.5", 1.0),  # |diff| 0.5 <= 1e-6 * 1000000.5
        ("1000000", "1000002", 0.0),  # |diff| 2 > 1e-6 * 1000002
        ("0", "0.0000005", 1.0),  # the absolute floor 1e-6
        ("0", "0.00001", 0.0),
        ("42", "first 7 then 42", 1.0),  # the last number counts
        ("42", "42 then 7", 0.0),
        ("1234", "it is 1,234", 1.0),  # thousands commas
        ("-2.5", "x=-2.5e0", 1.0),
        ("4", "3-4", 1.0),  # a sign glued to a digit is a minus operator, not a sign
        ("4", "four", 0.0),
        ("4", "1e999", 0.0),  # not finite: no number
        ("the answer is 12", "12", 1.0),  # the answer's number is its last number too
    ],
)
def test_numeric_verifier(tmp_path, answer, completion, expected):
    task = make(tmp_path, "numeric", [{"prompt": "q", "answer": answer}])
    assert task.reward("q", completion) == expected


@pytest.mark.parametrize(
    "pattern, answer, completion, expected",
    [
        (None, "7", "3 + 4 = 7", 1.0),  # default: the last number, then exact
        (None, "7", "7 apples, 8 pears", 0.0),
        (None, "7.0", "7", 0.0),  # exact compare of text, not of values
        (r"#### (\w+)", "yes", "think... #### Yes", 1.0),  # first group
        (r"#### (\w+)", "yes", "#### no #### yes", 1.0),  # last match
        (r"#### (\w+)", "yes", "yes", 0.0),  # no match
        (r"\[(\w+)\]", "b", "[a] or [b]", 1.0),
    ],
)
def test_regex_verifier(tmp_path, pattern, answer, completion, expected):
    task = make(tmp_path, "regex", [{"prompt": "q", "answer": answer}], pattern=pattern)
    assert task.reward("q", completion) == expected


def test_reward_with_given_answer_and_unknown_prompt(tmp_path):
    task = make(tmp_path, "exact", ROWS)
    assert task.reward("never seen?", "4") == 0.0
    assert task.reward("never seen?", "4", answer="4") == 1.0  # a caller's answer column wins over the lookup
    assert task.reward("2+2?", "4", answer="5") == 0.0
    assert task.as_reward_fn()(["2+2?", "2+2?"], ["4", "5"]) == [1.0, 0.0]


def test_last_number():
    assert last_number("a 1 b -2.5 c") == -2.5
    assert last_number("no digits") is None
    assert last_number(".5") == 0.5


# ---- bad input: one RetainError naming the file and the field ----------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(RetainError, match=r"not found: .*nope\.jsonl"):
        DatasetTask.from_path(tmp_path / "nope.jsonl")


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(RetainError, match=r"d\.csv: unsupported file type '\.csv'"):
        DatasetTask.from_path(tmp_path / "d.csv")


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": \n')
    with pytest.raises(RetainError, match=r"d\.jsonl line 3: malformed JSON"):
        DatasetTask.from_path(path)
    path.write_text('{"prompt": "a", "answer": "b"}\n[1, 2]\n')
    with pytest.raises(RetainError, match=r"d\.jsonl line 2: expected a JSON object, got list"):
        DatasetTask.from_path(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, text):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(RetainError, match=r"d\.jsonl is empty"):
        DatasetTask.from_path(tmp_path / "d.jsonl")


def test_empty_parquet(tmp_path):
    empty = pa.array([], pa.string())
    pq.write_table(pa.table({"prompt": empty, "answer": empty}), tmp_path / "e.parquet")
    with pytest.raises(RetainError, match=r"e\.parquet is empty"):
        DatasetTask.from_path(tmp_path / "e.parquet")


def test_missing_column_lists_the_columns_present(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(RetainError, match=r"d\.jsonl has no column 'prompt' \(columns present: 'question', 'answer'"):
        DatasetTask.from_path(tmp_path / "d.jsonl")
    write_parquet(tmp_path / "d.parquet", [{"prompt": "a", "solution": "b"}])
    with pytest.raises(RetainError, match=r"d\.parquet has no column 'answer' \(columns present: 'prompt', 'solution'"):
        DatasetTask.from_path(tmp_path / "d.parquet")


@pytest.mark.parametrize(
    "bad_row, needle",
    [
        ({"prompt": "a", "answer": None}, r"line 2: column 'answer' is missing or null"),
        ({"prompt": "a"}, r"line 2: column 'answer' is missing or null"),
        ({"prompt": "a", "answer": 4}, r"line 2: column 'answer' is int 4, expected a string"),
        ({"prompt": ["a"], "answer": "4"}, r"line 2: column 'prompt' is list \['a'\], expected a string"),
    ],
)
def test_bad_cells_name_row_and_column(tmp_path, bad_row, needle):
    write_jsonl(tmp_path / "d.jsonl", [ROWS[0], bad_row])
    with pytest.raises(RetainError, match=r"d\.jsonl " + needle):
        DatasetTask.from_path(tmp_path / "d.jsonl")


def test_null_cell_in_parquet_names_the_row(tmp_path):
    write_parquet(tmp_path / "d.parquet", [ROWS[0], ROWS[1], {"prompt": "x", "answer": None}])
    with pytest.raises(RetainError, match=r"d\.parquet row 3: column 'answer' is missing or null"):
        DatasetTask.from_path(tmp_path / "d.parquet")


def test_numeric_answer_without_a_number(tmp_path):
    with pytest.raises(RetainError, match=r"v\.jsonl line 2: column 'answer' holds no number: 'Paris'"):
        make(tmp_path, "numeric", ROWS)


def test_unknown_verifier_and_bad_regex(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(RetainError, match=r"d\.jsonl: unknown verifier 'fuzzy' \(verifiers: exact, numeric, regex\)"):
        DatasetTask.from_path(path, verifier="fuzzy")
    with pytest.raises(RetainError, match=r"d\.jsonl: bad regex pattern '\(unclosed'"):
        DatasetTask.from_path(path, verifier="regex", pattern="(unclosed")
    with pytest.raises(RetainError, match=r"d\.jsonl: pattern '\\\\d' is only used by the 'regex' verifier"):
        DatasetTask.from_path(path, verifier="exact", pattern=r"\d")


def test_not_a_dataset(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RetainError, match=r"junk\.parquet: not a readable parquet file"):
        DatasetTask.from_path(tmp_path / "junk.parquet")
    (tmp_path / "folder").mkdir()
    pytest.importorskip("datasets")
    with pytest.raises(RetainError, match=r"folder: not a directory written by datasets' save_to_disk"):
        DatasetTask.from_path(tmp_path / "folder")


# ---- hostile completions -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("h") / "h.jsonl", ROWS)
    return [
        DatasetTask.from_path(path),
        DatasetTask.from_path(path, verifier="regex"),
        DatasetTask.from_path(path, verifier="regex", pattern=r"answer: (\S+)"),
        DatasetTask.from_path(write_jsonl(path.parent / "n.jsonl", [{"prompt": "q", "answer": "1.5"}]), "numeric"),
    ]


NUMBERISH = st.text(alphabet="0123456789.,-+eE x", max_size=300)


@settings(max_examples=2000, deadline=None)
@given(
    prompt=st.one_of(st.sampled_from([r["prompt"] for r in ROWS] + ["q"]), st.text(max_size=50)),
    completion=st.one_of(st.text(max_size=600), NUMBERISH, st.just("9" * 5000)),
    answer=st.one_of(st.none(), st.text(max_size=20), NUMBERISH),
)
def test_hostile_completions_never_raise(tasks, prompt, completion, answer):
    for task in tasks:
        assert task.reward(prompt, completion, answer) in (0.0, 1.0)
