"""Hostile model output: every registered task's reward and every parser under property-based tests, 10,000 cases
each — no exception escapes, no code runs, and the work per completion is bounded.

A completion is whatever a model wrote, so the strategies mix arbitrary unicode, near misses of real answers,
operator soup, huge numbers, deep brackets, code-injection strings and very long text. While the rewards run,
``eval``/``exec``/``os.system``/``subprocess.Popen``/``pickle.loads`` are replaced by traps that record any call, and a
sentinel file a successful injection would create must not appear. Each call's work is metered without a clock —
the Python function calls it makes, counted by a profile hook — and bounded (the same count on any machine).
"""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retain import tasks
from retain.tasks.base import MAX_COMPLETION_CHARS, clip_completion
from retain.tasks.countdown import CountdownTask
from retain.tasks.dataset import DatasetTask, last_number
from retain.tasks.expr import ExprError, parse_with_numbers
from retain.tasks.gpoints import GeneralPointsTask
from retain.tasks.kg import parse_question

CASES = 10_000
MAX_CALLS = 20_000  # Python calls one reward / parser call may make (the heaviest input seen makes ~170)
SENTINEL = Path(os.environ.get("TMPDIR", "/tmp")) / f"retain-pwned-{os.getpid()}"

TASKS = {name: tasks.get(name) for name in tasks.names()}
OWN_PROMPTS = {
    name: [e.prompt for split in task.splits for e in task.examples(split, 100, seed=0)] for name, task in TASKS.items()
}
ANSWERS = sorted({a for name, task in TASKS.items() for split in task.splits
                  for e in task.examples(split, 30, seed=1) for a in e.answers})
INJECTIONS = [
    f"__import__('pathlib').Path('{SENTINEL}').touch()",
    f"__import__('os').system('touch {SENTINEL}')",
    "eval('1+1')", "exec('import os')", "().__class__.__bases__[0].__subclasses__()", "lambda: 0",
    "open('/etc/passwd').read()", "{{7*7}}", "${jndi:ldap://x/a}", "'; DROP TABLE runs; --", "%s%s%s%n",
    "pickle.loads(b'cos\\nsystem\\n(S\\'id\\'\\ntR.')", "import os; os.remove('x')", "\\x00\\x00", "`rm -rf /`",
]
HOSTILE = [
    "", " ", "\n", "\r\n", "\t", "\x00", "\x1b[2J", "\u202e24", "\ufeff24", "\u200b", "\ud800", "🂡🂮", "２４",
    "٢٤", "²⁴", "24\u2028", "1" * 10_000, "9" * 400 + "e999", "1e309", "-1e309", "nan", "inf", "-0", "0x18", "1_000",
    "(" * 5000, ")" * 5000, "(" * 17 + "1" + ")" * 17, "((((((((((((((((1))))))))))))))))", "1/0", "0/0",
    "999999*999999*999999*999999*999999", "1" + "*9" * 40, "+-*/" * 100, "a of " * 200 + "ava?",
    "city of mentor of ava?", "paris\n" * 1000, "x" * 1_000_000, "1,234,567.5e-3", ",,,,", "....", "--5", "+-+5",
]


def _mutate(args: tuple[str, str, int]) -> str:
    answer, junk, at = args
    at = min(at, len(answer))
    return answer[:at] + junk + answer[at:]


COMPLETIONS = st.one_of(
    st.text(max_size=400),
    st.sampled_from(HOSTILE + INJECTIONS),
    st.sampled_from(ANSWERS),
    st.tuples(st.sampled_from(ANSWERS), st.text(max_size=4), st.integers(0, 40)).map(_mutate),
    st.text(alphabet="0123456789+-*/() x×÷.,eE\n", max_size=300),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz ?\n", max_size=300),
    st.tuples(st.sampled_from(ANSWERS), st.sampled_from(["\n", " ", "", "=24", " of ", "\x00"]),
              st.text(max_size=50)).map("".join),
)
PROMPT_PICK = st.tuples(
    st.integers(0, 10**6),
    st.one_of(st.none(), st.none(), st.text(max_size=300), st.sampled_from(HOSTILE + INJECTIONS),
              st.sampled_from(["<|user|>", "\n", " ", "?", "junk "])),
)
ANSWER_ARG = st.one_of(st.none(), st.sampled_from(ANSWERS), st.text(max_size=30))


class Traps:
    """Record (and refuse) anything that would run code while a reward or parser looks at hostile text."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @contextmanager
    def armed(self):
        saved = (builtins.eval, builtins.exec, os.system, subprocess.Popen, pickle.loads)

        def trap(name):
            def refuse(*args, **kwargs):
                self.calls.append(name)
                raise AssertionError(f"{name} called while scoring hostile text")

            return refuse

        builtins.eval, builtins.exec = trap("eval"), trap("exec")
        os.system, subprocess.Popen, pickle.loads = trap("os.system"), trap("subprocess.Popen"), trap("pickle.loads")
        try:
            yield
        finally:
            builtins.eval, builtins.exec, os.system, subprocess.Popen, pickle.loads = saved


class WorkLimitExceeded(AssertionError):
    pass


def metered(fn, *args) -> tuple[object, int]:
    """``(fn(*args), the Python function calls it made)``; a call past ``MAX_CALLS`` is stopped with
    ``WorkLimitExceeded`` (raised from the profile hook), so runaway work fails the test instead of hanging it."""
    count = 0

    def hook(frame, event, arg):
        nonlocal count
        if event == "call":
            count += 1
            if count > MAX_CALLS:
                raise WorkLimitExceeded(f"{getattr(fn, '__qualname__', fn)} made more than {MAX_CALLS:,} calls")

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        out = fn(*args)
    finally:
        sys.setprofile(previous)
    return out, count


def test_the_meter_stops_runaway_work():
    def runaway():
        while True:
            abs(-1)  # a C call: not counted
            (lambda: None)()  # a Python call: counted

    with pytest.raises(WorkLimitExceeded):
        metered(runaway)
    assert sys.getprofile() is None  # the hook is gone afterwards
    assert metered(lambda x: x + 1, 1) == (2, 1)


class Tally:
    """Cases run and the most work one call took, per function under test (the figures the closing note quotes)."""

    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.heaviest: dict[str, int] = {}

    def run(self, name: str, fn, *args):
        out, calls = metered(fn, *args)
        self.cases[name] += 1
        self.heaviest[name] = max(self.heaviest.get(name, 0), calls)
        return out

    def report(self, request) -> None:
        lines = [f"{name}: {n} cases, heaviest {self.heaviest[name]:,} Python calls"
                 for name, n in sorted(self.cases.items())]
        request.node.user_properties.append(("hostile", lines))
        print("\n" + "\n".join(lines))


def _prompt(name: str, pick: tuple[int, str | None]) -> str:
    index, text = pick
    own = OWN_PROMPTS[name][index % len(OWN_PROMPTS[name])]
    if text is None:
        return own
    if index % 3 == 0:
        return own + text  # a real prompt with junk after it
    if index % 3 == 1:
        return text + own  # ... or before it (a chat template, say)
    return text


def test_every_registered_task_is_covered():
    assert set(TASKS) == {"facts", "reverse", "arith", "gpoints", "kg", "countdown", "sort",
                          "cards", "gpoints_vl", "vcount", "vcolor", "vspatial", "vdigits"}


def test_every_task_reward_survives_hostile_output(request):
    traps, tally = Traps(), Tally()
    SENTINEL.unlink(missing_ok=True)

    @settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(pick=PROMPT_PICK, completion=COMPLETIONS, answer=ANSWER_ARG)
    def check(pick, completion, answer):
        with traps.armed():
            for name, task in TASKS.items():
                prompt = _prompt(name, pick)
                reward = tally.run(name, task.reward, prompt, completion, answer)
                assert isinstance(reward, float) and 0.0 <= reward <= 1.0, (name, reward)
                assert tally.run(f"{name}.is_correct", task.is_correct, prompt, completion) in (True, False)

    check()
    tally.report(request)
    assert not traps.calls and not SENTINEL.exists()
    assert all(tally.cases[name] >= CASES for name in TASKS), tally.cases


def test_trl_reward_callables_take_any_batch():
    """TRL hands completions as strings or chat messages; odd items (None, numbers, dicts) score 0, never raise."""
    odd = [None, 24, 2.5, {"role": "assistant"}, [], [{"content": None}], [{"role": "assistant", "content": "24"}],
           b"4*6", ["a", "b"], "x" * 100_000]
    for name, task in TASKS.items():
        fn = task.as_reward_fn()
        prompts = [OWN_PROMPTS[name][0]] * len(odd)
        scores = fn(prompts, odd)
        assert len(scores) == len(odd) and all(0.0 <= s <= 1.0 for s in scores), (name, scores)
        assert fn([None, 3], ["1", None]) == [0.0, 0.0]  # no prompt to read


def test_non_string_inputs_score_zero():
    for name, task in TASKS.items():
        for prompt, completion in [(None, "24"), (OWN_PROMPTS[name][0], None), (3, 4), (b"x", b"y"), ([], {})]:
            assert task.reward(prompt, completion) == 0.0, (name, prompt, completion)


@pytest.fixture(scope="module")
def dataset_tasks(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("d") / "d.jsonl"
    rows = [{"prompt": "q1", "answer": "42"}, {"prompt": "q2", "answer": "-3.5e2"}, {"prompt": "q3", "answer": "aaaa"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    numeric = path.with_name("n.jsonl")
    numeric.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return {
        "dataset:exact": DatasetTask.from_path(path),
        "dataset:numeric": DatasetTask.from_path(numeric, verifier="numeric"),
        "dataset:regex": DatasetTask.from_path(path, verifier="regex"),
        "dataset:regex-group": DatasetTask.from_path(path, verifier="regex", pattern=r"answer[:=]\s*(\S+)"),
        # a user pattern that backtracks catastrophically on some outputs: bounded by the verifier's timeout
        "dataset:regex-evil": DatasetTask.from_path(path, verifier="regex", pattern=r"^(a|aa)+$"),
    }


PARSER_TEXT = st.one_of(
    st.text(max_size=400),
    st.sampled_from(HOSTILE + INJECTIONS + ANSWERS),
    st.text(alphabet="0123456789+-*/() x×÷", max_size=120),
    st.text(alphabet="0123456789.,eE+- ", max_size=300),
    st.text(alphabet="a ", max_size=300).map(lambda s: s + "b"),
    st.tuples(st.sampled_from(sum(OWN_PROMPTS.values(), [])), st.text(max_size=20)).map("".join),
)


def test_every_parser_survives_hostile_text(dataset_tasks, request):
    """GeneralPoints/Countdown expressions and prompts, numbers, KG questions, clipping, the dataset verifiers."""
    traps, tally = Traps(), Tally()
    gp, cd, kg = GeneralPointsTask(), CountdownTask(), TASKS["kg"]

    def expr(text: str):
        try:
            value, numbers = parse_with_numbers(text)
        except ExprError:
            return None
        assert all(isinstance(n, int) and 0 <= n < 10**6 for n in numbers)
        return value

    @settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(text=PARSER_TEXT)
    def check(text):
        with traps.armed():
            tally.run("expr.parse_with_numbers", expr, text)
            tally.run("expr.parse_with_numbers(+-*)", expr, text.replace("/", "*"))
            number = tally.run("dataset.last_number", last_number, text)
            assert number is None or (isinstance(number, float) and number == number and abs(number) != float("inf"))
            clipped = tally.run("clip_completion", clip_completion, text)
            assert len(clipped) <= MAX_COMPLETION_CHARS and "\n" not in clipped
            parsed = tally.run("kg.parse_question", parse_question, kg.world, text)
            assert parsed is None or parsed[0] in kg.world.people
            for name, task in (("gpoints.read_prompt", gp), ("countdown.read_prompt", cd)):
                read = tally.run(name, task.read_prompt, text)
                assert read is None or (all(isinstance(n, int) for n in read[0]) and isinstance(read[1], int))
            for name, task in dataset_tasks.items():
                for prompt in ("q1", "q3", text):
                    assert tally.run(name, task.reward, prompt, text) in (0.0, 1.0)

    check()
    tally.report(request)
    assert not traps.calls
    assert min(tally.cases.values()) >= CASES, tally.cases


def test_worst_case_inputs_are_bounded(dataset_tasks):
    """The inputs built to be slow: megabytes of text, deep brackets, long literals, backtracking bait."""
    big = ["(" * 1_000_000, "1" * 1_000_000, "a" * 1_000_000 + "b", "a of " * 200_000 + "ava?",
           "9," * 300_000, "1+" * 500_000, ("(" * 16 + "1") * 1000, "24\n" * 500_000,
           "a" * (MAX_COMPLETION_CHARS - 1) + "b"]  # ^(a|aa)+$ on this: exponential backtracking without the timeout
    everything = {**TASKS, **dataset_tasks}
    for text in big:
        for name, task in everything.items():
            for prompt, completion in [(OWN_PROMPTS.get(name, ["q3"])[0], text), (text, text)]:
                reward, _ = metered(task.reward, prompt, completion)  # raises past MAX_CALLS
                assert 0.0 <= reward <= 1.0, (name, text[:20])
