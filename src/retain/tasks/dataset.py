"""A task made from the user's own file: prompts, reference answers, and one of three verifiers.

``DatasetTask.from_path(path, verifier="exact")`` reads

- ``.jsonl``: one JSON object per line (blank lines skipped; "line N" in errors counts from 1, as editors do);
- ``.parquet``: read with pyarrow ("row N" in errors counts from 1);
- a directory written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``).

Every cell of the prompt and answer columns must be a string (a number in the answer column is an error: quote it,
so what the verifier compares is exactly what the file says). Splits: when a ``split`` column exists its values
name the splits; else the splits of a saved ``DatasetDict`` are used; else every row is in both ``train`` and
``test`` (the file is then a fixed set to learn and be scored on, with no held-out part).

Verifiers look only at ``clip_completion(completion)`` (the completion's first line, stripped, at most 256 chars):

- ``exact``: equal after strip + casefold;
- ``numeric``: the **last** number in the completion equals the answer's number within ``math.isclose`` with
  ``rel_tol=1e-6, abs_tol=1e-6`` (relative, with an absolute floor so an answer of 0 is reachable). Numbers are
  decimal with an optional sign, fraction and exponent; ``1,234`` (thousands commas) reads as 1234. Every answer
  must hold a number, checked when the file loads;
- ``regex``: extract with ``pattern`` (default: the last number, as ``numeric`` finds it) — the last match, its
  first group when the pattern has one — then compare as ``exact``. No match scores 0. The pattern is the user's
  and the text the model's, so matching runs under the ``regex`` module's timeout (``REGEX_TIMEOUT`` seconds per
  completion): a pattern that backtracks catastrophically on some output (``(a|aa)+$``) scores that output 0
  instead of hanging the run.

With ``reward_fn`` (a TRL-signature function, :mod:`retain.tasks.rewards`), GRPO's reward is that function, called
with the prompt's row (its first row, the prompt column left out) as TRL passes dataset columns; the accuracy the
matrix reports stays the verifier's, so the task's metric does not depend on the reward being trained.

A prompt that appears in several rows accepts any of their answers. ``reward(prompt, completion)`` without an
answer looks the prompt up; a prompt the file does not hold scores 0.0. Bad input raises one RetainError that names
the file and the field or value at fault.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any, Callable

import regex

from retain.errors import RetainError
from retain.tasks.base import CORRECT, Example, Task, clip_completion
from retain.tasks.rewards import one_reward, qualified_name

VERIFIERS = ("exact", "numeric", "regex")
NUMERIC_TOLERANCE = 1e-6
REGEX_TIMEOUT = 0.05  # seconds one completion may spend in a user pattern
# Sign only when not glued to a preceding digit ("3-4" holds 3 and 4); thousands commas before the plain form.
_NUMBER = r"(?<![\d.])[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
NUMBER_RE = re.compile(_NUMBER)


def last_number(text: str) -> float | None:
    """The last number in ``text`` as a float, or None when there is none (or it is not finite)."""
    found = NUMBER_RE.findall(text)
    if not found:
        return None
    value = float(found[-1].replace(",", ""))
    return value if math.isfinite(value) else None


class DatasetTask(Task):
    """Examples and answers from a file; see the module docstring for formats, splits and verifiers."""

    def __init__(
        self,
        rows: list[tuple[str, str, str]],
        splits: tuple[str, ...],
        verifier: str = "exact",
        pattern: str | None = None,
        name: str = "dataset",
        source: str = "<memory>",
        columns: dict[str, dict[str, Any]] | None = None,
        reward_fn: Callable[..., list[Any]] | None = None,
        reward_name: str | None = None,
        conversational: bool = False,
    ):
        """``rows`` are ``(split, prompt, answer)``; a row with split ``"*"`` belongs to every split. ``columns``:
        per prompt, the row a reward function sees; ``reward_name``: the function's qualified name."""
        self.name = name
        self.source = source
        self.splits = splits
        self.reward_fn, self.conversational = reward_fn, conversational
        self.reward_name = reward_name or (qualified_name(reward_fn, "reward") if reward_fn else None)
        self._columns = columns or {}
        self.description = f"{verifier}-verified dataset from {source}" + (
            f"; GRPO reward {self.reward_name}" if reward_fn else "")
        self.verifier = _check_verifier(verifier, source)
        self._pattern = _compile_pattern(verifier, pattern, source)
        self._answers: dict[str, list[str]] = {}
        for _, prompt, answer in rows:
            known = self._answers.setdefault(prompt, [])
            if answer not in known:
                known.append(answer)
        self._by_split: dict[str, list[Example]] = {s: [] for s in splits}
        for split, prompt, answer in rows:
            example = Example(prompt, answer, tuple(self._answers[prompt]))
            for s in splits if split == "*" else (split,):
                self._by_split[s].append(example)

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        verifier: str = "exact",
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        pattern: str | None = None,
        name: str | None = None,
        split_column: str = "split",
        reward_fn: Callable[..., list[Any]] | None = None,
        reward_name: str | None = None,
        conversational: bool = False,
    ) -> DatasetTask:
        """Load ``path`` (jsonl, parquet or a saved HF dataset directory); raises RetainError on any bad input."""
        path = Path(path)
        source = str(path)
        _check_verifier(verifier, source)
        _compile_pattern(verifier, pattern, source)
        if not path.exists():
            raise RetainError(f"dataset file not found: {source}")
        tables = _read(path)  # [(split name from a DatasetDict or None, columns, rows with their labels)]
        if not any(rows for _, _, rows in tables):
            raise RetainError(f"{source} is empty: no rows")
        columns = list(dict.fromkeys(c for _, cols, _ in tables for c in cols))
        for column in (prompt_column, answer_column):
            if column not in columns:
                raise RetainError(
                    f"{source} has no column {column!r} (columns present: {', '.join(map(repr, columns)) or 'none'})"
                )
        has_split = split_column in columns
        triples: list[tuple[str, str, str]] = []
        row_columns: dict[str, dict[str, Any]] = {}
        for table_split, _, rows in tables:
            for where, row in rows:
                prompt = _cell(row, prompt_column, where, source)
                answer = _cell(row, answer_column, where, source)
                if verifier == "numeric" and last_number(answer) is None:
                    raise RetainError(f"{source} {where}: column {answer_column!r} holds no number: {answer[:40]!r}")
                split = _cell(row, split_column, where, source) if has_split else table_split or "*"
                triples.append((split, prompt, answer))
                row_columns.setdefault(prompt, {k: v for k, v in row.items() if k not in (prompt_column, split_column)})
        if has_split or tables[0][0] is not None:
            splits = tuple(dict.fromkeys(s for s, _, _ in triples))
        else:
            splits = ("train", "test")
        return cls(triples, splits, verifier, pattern, name or path.stem, source, row_columns if reward_fn else None,
                   reward_fn, reward_name, conversational)

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """The split's rows shuffled by ``seed`` (file order before the shuffle); the first ``n`` when given."""
        self.check_split(split)
        if n is not None and n < 0:
            raise RetainError(f"n must be >= 0 or None, got {n}")
        rows = list(self._by_split[split])
        random.Random(seed).shuffle(rows)
        return rows if n is None else rows[:n]

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float | None:
        """The reward function's score when the task has one (``None``: unscorable), else the verifier's."""
        if self.reward_fn is None:
            return self.verified(prompt, completion, answer)
        if self.conversational:
            said = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
        else:
            said = prompt, completion
        return one_reward(self.reward_fn, self.reward_name, *said, self._columns.get(prompt, {}))

    def is_correct(self, prompt: str, completion: str, answer: str | None = None) -> bool:
        return self.verified(prompt, completion, answer) >= CORRECT

    def verified(self, prompt: str, completion: str, answer: str | None = None) -> float:
        """The verifier's score: ``CORRECT`` when the completion matches an answer of the prompt, else 0."""
        answers = [str(answer)] if answer is not None else self._answers.get(prompt, []) if isinstance(prompt, str) \
            else []
        said = clip_completion(completion)
        return CORRECT if any(self._verify(said, a) for a in answers) else 0.0

    def _verify(self, said: str, answer: str) -> bool:
        if self.verifier == "exact":
            return said.casefold() == answer.strip().casefold()
        if self.verifier == "numeric":
            got, want = last_number(said), last_number(answer)
            return got is not None and want is not None and math.isclose(
                got, want, rel_tol=NUMERIC_TOLERANCE, abs_tol=NUMERIC_TOLERANCE
            )
        try:
            found = self._pattern.findall(said, timeout=REGEX_TIMEOUT) if self._pattern else []
        except TimeoutError:
            return False
        return bool(found) and _text_of(found[-1]).strip().casefold() == answer.strip().casefold()


def _text_of(match: str | tuple[str, ...]) -> str:
    # findall gives a tuple when the pattern has several groups: the first group is the answer.
    return match[0] if isinstance(match, tuple) else match


def _check_verifier(verifier: str, source: str) -> str:
    if verifier not in VERIFIERS:
        raise RetainError(f"{source}: unknown verifier {verifier!r} (verifiers: {', '.join(VERIFIERS)})")
    return verifier


def _compile_pattern(verifier: str, pattern: str | None, source: str) -> regex.Pattern | None:
    if verifier != "regex":
        if pattern is not None:
            raise RetainError(f"{source}: pattern {pattern!r} is only used by the 'regex' verifier, not {verifier!r}")
        return None
    try:
        return regex.compile(_NUMBER if pattern is None else pattern)
    except (regex.error, TypeError) as err:
        raise RetainError(f"{source}: bad regex pattern {pattern!r}: {err}") from None


def _cell(row: dict[str, Any], column: str, where: str, source: str) -> str:
    if column not in row or row[column] is None:
        raise RetainError(f"{source} {where}: column {column!r} is missing or null")
    value = row[column]
    if not isinstance(value, str):
        raise RetainError(
            f"{source} {where}: column {column!r} is {type(value).__name__} {value!r:.40}, expected a string"
        )
    return value


Rows = list[tuple[str, dict[str, Any]]]  # (where, for errors: "line 3" / "row 3"; the row)


def _read(path: Path) -> list[tuple[str | None, list[str], Rows]]:
    if path.is_dir():
        return _read_hf_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [_read_jsonl(path)]
    if suffix == ".parquet":
        return [_read_parquet(path)]
    kind = repr(suffix) if suffix else "(no extension)"
    raise RetainError(f"{path}: unsupported file type {kind} (use .jsonl, .parquet or a saved HF dataset dir)")


def _read_jsonl(path: Path) -> tuple[None, list[str], Rows]:
    rows: Rows = []
    columns: dict[str, None] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RetainError(f"{path}: cannot read as UTF-8 text: {err}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RetainError(f"{path} line {number}: malformed JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise RetainError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        columns.update(dict.fromkeys(row))
        rows.append((f"line {number}", row))
    return None, list(columns), rows


def _read_parquet(path: Path) -> tuple[None, list[str], Rows]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt or foreign file
        raise RetainError(f"{path}: not a readable parquet file: {err}") from None
    return None, table.column_names, [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _read_hf_dir(path: Path) -> list[tuple[str | None, list[str], Rows]]:
    try:
        import datasets
    except ImportError:
        raise RetainError(f"{path} is a directory: reading a saved HF dataset needs `pip install datasets`") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError / ValueError for a directory that is not a saved dataset
        raise RetainError(f"{path}: not a directory written by datasets' save_to_disk: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return [
            (split, ds.column_names, [(f"split {split!r} row {i}", r) for i, r in enumerate(ds.to_list(), start=1)])
            for split, ds in loaded.items()
        ]
    return [(None, loaded.column_names, [(f"row {i}", r) for i, r in enumerate(loaded.to_list(), start=1)])]
