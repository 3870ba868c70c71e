"""Reading a user's YAML file and turning pydantic's first validation error into one ``RetainError`` that names the
file and the field as the user wrote it — shared by the experiment, sweep and method configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from pydantic import ValidationError

from retain.errors import RetainError


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The parsed document of ``path``, or a ``RetainError`` naming the file (and the line of a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise RetainError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise RetainError(f"{path}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from None
    except UnicodeDecodeError:
        raise RetainError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise RetainError(f"{path}: nested too deeply to be a {what}") from None


def field_error(
    err: ValidationError, source: str, path: Callable[[Sequence[Any]], list[str]] | None = None, indices: bool = False
) -> RetainError:
    """``source: field: message`` for the first error. ``path`` maps pydantic's location to the user's keys (it
    drops union tags, say); ``indices`` writes list positions as ``stages[1].task`` instead of ``stages.1.task``."""
    first = err.errors()[0]
    parts = path(first["loc"]) if path else [str(p) for p in first["loc"]]
    parts = [p if p.isprintable() else repr(p) for p in parts]  # a key holding a newline stays on the one line
    if indices:
        field = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts).lstrip(".")
    else:
        field = ".".join(parts)
    message = first["msg"].removeprefix("Value error, ")
    return RetainError(f"{source}{': ' if source and field else ''}{field}: {message}" if field else
                       f"{source}: {message}" if source else message)
