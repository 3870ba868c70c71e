"""Reward functions in TRL's signature, named by the user's config: ``reward: package.module:function``.

The function is called as TRL's ``GRPOTrainer`` calls it — keyword arguments ``prompts``, ``completions`` and one list
per other dataset column (``solution``, ``answer``, ...) — and returns one value per completion: a number, or ``None``
for a completion it cannot score (TRL's convention; GRPO then gives it advantage 0 and counts it in
``unscorable``). In conversational form (``conversational: true``) prompts are ``[{"role": "user", "content": p}]``
and completions ``[{"role": "assistant", "content": c}]``, as TRL hands them for a chat dataset, so TRL's own reward
functions (``trl.rewards:think_format_reward``) work unchanged. ``completion_ids`` and TRL's trainer hooks
(``trainer_state``, ``log_metric``) are not passed: a function that requires them must default them.

The module is imported only because a config names it — the user's code, run in this process, as TRL runs it.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable

from retain.errors import RetainError

SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def import_reward(spec: str, where: str) -> Callable[..., list[Any]]:
    """The callable ``package.module:function`` names; one RetainError naming ``where`` and the spec otherwise."""
    if not isinstance(spec, str) or not SPEC.match(spec):
        raise RetainError(f"{where}: expected 'package.module:function', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise RetainError(f"{where}: cannot import module {module_name!r} ({err})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RetainError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RetainError(f"{where}: {spec!r} is a {type(target).__name__}, not a function")
    return target


def qualified_name(fn: Callable[..., Any], spec: str) -> str:
    """``module.qualname`` of the function (what the report records); the spec when the object has no such names
    (a ``functools.partial``, a callable instance)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else spec


def one_reward(fn: Callable[..., list[Any]], name: str, prompt: Any, completion: Any,
               columns: dict[str, Any]) -> float | None:
    """Score one completion with a TRL-signature function: ``fn(prompts=[prompt], completions=[completion],
    **{column: [value]})``; returns a finite float or ``None`` (unscorable)."""
    out = fn(prompts=[prompt], completions=[completion], **{k: [v] for k, v in columns.items()})
    if not isinstance(out, (list, tuple)) or len(out) != 1:
        raise RetainError(f"reward function {name} returned {type(out).__name__} {out!r:.60} for one completion; "
                          "expected a list of one float or None")
    value = out[0]
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise RetainError(f"reward function {name} returned {value!r:.60}; expected a float or None") from None
    return value if math.isfinite(value) else None
