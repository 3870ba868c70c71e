"""Task registry: ``get(name)``, ``names()``, and the groups ``prior`` and ``sequence``.

Built-in tasks are registered by name with a factory (imported lazily, so importing retain stays cheap). A name
that is a path to a ``.jsonl`` / ``.parquet`` file or a saved HF dataset directory, optionally followed by
``:VERIFIER`` (exact, numeric, regex), makes a dataset-backed task.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

from retain.errors import RetainError
from retain.tasks.base import CORRECT, Example, Task

__all__ = ["CORRECT", "Example", "Task", "get", "names", "resolve", "GROUPS"]

# name -> "module:attribute" of a zero-argument factory
_BUILTIN: dict[str, str] = {
    "facts": "retain.tasks.kg:FactsTask",
    "reverse": "retain.tasks.prior:ReverseTask",
    "arith": "retain.tasks.prior:ArithTask",
    "gpoints": "retain.tasks.gpoints:GeneralPointsTask",
    "kg": "retain.tasks.kg:KGComposeTask",
    "countdown": "retain.tasks.countdown:CountdownTask",
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
    "sequence": ("gpoints", "kg", "countdown"),
    "vprior": ("cards",),  # visual tasks: their examples carry a picture (Example.image); see retain.vision.tasks
    "vsequence": ("gpoints_vl", "vcount", "vcolor", "vspatial", "vdigits"),
}


def names() -> list[str]:
    """Every registered task name (dataset-backed tasks are made from paths and are not listed)."""
    return list(_BUILTIN)


@lru_cache(maxsize=None)
def get(name: str) -> Task:
    """The task called ``name``; raises RetainError naming the unknown name."""
    if name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), attr)()
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
