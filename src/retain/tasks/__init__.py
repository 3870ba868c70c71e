"""Task registry: ``get(name)``, ``names()``, and the groups ``prior`` and ``sequence``.

Built-in tasks are registered by name with a factory (imported lazily, so importing retain stays cheap). A name
that is a path to a ``.jsonl`` / ``.parquet`` file or a saved HF dataset directory, optionally followed by
``:VERIFIER`` (exact, numeric, regex), makes a dataset-backed task. ``define(name, spec, factory)`` adds a named
task for this process (an experiment config's ``datasets:`` section: a dataset with a reward function).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from retain.errors import RetainError
from retain.tasks.base import CORRECT, Example, Task

__all__ = ["CORRECT", "Example", "Task", "define", "get", "names", "resolve", "GROUPS"]

# name -> "module:attribute" of a zero-argument factory
_BUILTIN: dict[str, str] = {
    "facts": "retain.tasks.kg:FactsTask",
    "reverse": "retain.tasks.prior:ReverseTask",
    "arith": "retain.tasks.prior:ArithTask",
    "gpoints": "retain.tasks.gpoints:GeneralPointsTask",
    "kg": "retain.tasks.kg:KGComposeTask",
    "countdown": "retain.tasks.countdown:CountdownTask",
    "sort": "retain.tasks.sort:SortTask",
    "cards": "retain.vision.tasks:CardRecognitionTask",
    "gpoints_vl": "retain.vision.tasks:GeneralPointsVLTask",
    "vcount": "retain.vision.tasks:CountTask",
    "vcolor": "retain.vision.tasks:ColorTask",
    "vspatial": "retain.vision.tasks:SpatialTask",
    "vdigits": "retain.vision.tasks:DigitsTask",
}

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")

GROUPS: dict[str, tuple[str, ...]] = {
    "prior": ("facts", "reverse", "arith"),
    "sequence": ("gpoints", "kg", "countdown", "sort"),
    "vprior": ("cards",),  # visual tasks: their examples carry a picture (Example.image); see retain.vision.tasks
    "vsequence": ("gpoints_vl", "vcount", "vcolor", "vspatial", "vdigits"),
}


# name -> (the spec it was defined from, its factory): tasks an experiment config defines
_DEFINED: dict[str, tuple[Any, Callable[[], Task]]] = {}


def define(name: str, spec: Any, factory: Callable[[], Task]) -> None:
    """Make ``get(name)`` return ``factory()``. Defining a name again with another spec replaces it (a notebook
    re-running a cell with a changed config); a built-in task or group name is refused."""
    if name in _BUILTIN or name in GROUPS:
        raise RetainError(f"task name {name!r} is built in (choose another name)")
    if name in _DEFINED and _DEFINED[name][0] == spec:
        return
    _DEFINED[name] = (spec, factory)
    get.cache_clear()


def names() -> list[str]:
    """Every registered task name (dataset-backed tasks are made from paths and are not listed)."""
    return list(_BUILTIN)


@lru_cache(maxsize=None)
def get(name: str) -> Task:
    """The task called ``name``; raises RetainError naming the unknown name."""
    if name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), attr)()
    if name in _DEFINED:
        return _DEFINED[name][1]()
    if not isinstance(name, str):
        raise RetainError(f"a task name must be a string, got {type(name).__name__}")
    path, _, verifier = name.partition(":") if not _exists(name) else (name, "", "")
    if _exists(path) or path.endswith(_DATA_SUFFIXES) or "/" in path:
        from retain.tasks.dataset import DatasetTask

        return DatasetTask.from_path(path, verifier=verifier or "exact")  # names the missing file itself
    known = ", ".join([*_BUILTIN, *GROUPS])
    shown = repr(name) if len(name) <= 80 else repr(name[:80]) + f"... ({len(name)} characters)"
    raise RetainError(f"unknown task {shown} (known: {known}; or a path to a .jsonl/.parquet/HF dataset)")


def _exists(path: str) -> bool:
    """Whether ``path`` names something on disk; a name no file can have (too long, a NUL byte) does not."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def resolve(items: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand a comma-separated string or list of task names and groups into task names, order kept, no repeats."""
    parts = items.split(",") if isinstance(items, str) else list(items)
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        for name in GROUPS.get(part, (part,)):
            get(name)  # validate now, with the error naming the task
            if name not in out:
                out.append(name)
    if not out:
        raise RetainError("no task named (give task names or the groups 'prior', 'sequence')")
    return out
