"""A run directory's ``config.yaml`` against the config a resumed run (or a sweep's rerun) asks for.

A directory written by an older retain lacks the fields added since. Such a field is added with the old behaviour as
its default, so a stored config that lacks it is read as holding that default: it is the same run, and it resumes.
Every other difference — a value changed, a field the current config no longer has — is a different run, named by
its first field path (``eval.n: stored 128, now 64``).
"""

from __future__ import annotations

import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter

from retain.config import ExperimentConfig


def resolved(cfg: ExperimentConfig) -> Any:
    """The config as ``config.yaml`` holds it (JSON types, through YAML)."""
    return yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True))


def config_difference(cfg: ExperimentConfig, stored: Any) -> str | None:
    """``None`` when ``stored`` (a loaded ``config.yaml``) is ``cfg``'s run, fields missing from it read as their
    defaults; else the first difference, as ``path: stored X, now Y``."""
    filled: set[str] = set()
    return first_difference(with_defaults(ExperimentConfig, stored, "", filled), resolved(cfg), "", filled)


def with_defaults(model: type[BaseModel], stored: Any, path: str, filled: set[str]) -> Any:
    """``stored`` with every field of ``model`` it lacks (and that has a default) filled in with that default, in
    nested configs too (``eval.checkpoints``, ``stages[i]``, ``datasets.NAME``); the paths filled are added to
    ``filled``. Anything else is left as stored."""
    if not isinstance(stored, dict):
        return stored
    out = dict(stored)
    for name, field in model.model_fields.items():
        where = f"{path}.{name}" if path else name
        if field.exclude:  # not part of the stored config (report_to)
            continue
        if name not in out:
            if not field.is_required():
                default = TypeAdapter(field.annotation).dump_python(field.get_default(call_default_factory=True),
                                                                    mode="json")
                out[name] = yaml.safe_load(yaml.safe_dump(default))
                filled.add(where)
        else:
            out[name] = fill_nested(field.annotation, out[name], where, filled)
    return out


def fill_nested(annotation: Any, value: Any, path: str, filled: set[str]) -> Any:
    """Descend into the configs ``annotation`` holds: a model, ``X | None``, ``list[X]`` or ``dict[str, X]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return with_defaults(annotation, value, path, filled)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return with_defaults(models[0], value, path, filled) if len(models) == 1 else value
    if origin is list and args and isinstance(value, list):
        return [fill_nested(args[0], item, f"{path}[{i}]", filled) for i, item in enumerate(value)]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {key: fill_nested(args[1], item, f"{path}.{key}", filled) for key, item in value.items()}
    return value


def first_difference(stored: Any, now: Any, path: str, filled: set[str]) -> str | None:
    if isinstance(stored, dict) and isinstance(now, dict):
        for key in sorted(set(stored) | set(now), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in now:
                return f"{where}: stored {short(stored[key])}, not a field now"
            if key not in stored:
                return f"{where}: not stored, now {short(now[key])}"
            found = first_difference(stored[key], now[key], where, filled)
            if found:
                return found
        return None
    if isinstance(stored, list) and isinstance(now, list) and len(stored) == len(now):
        for i, (a, b) in enumerate(zip(stored, now)):
            found = first_difference(a, b, f"{path}[{i}]", filled)
            if found:
                return found
        return None
    if stored == now:
        return None
    was = f"not stored (its default {short(stored)})" if path in filled else f"stored {short(stored)}"
    return f"{path or 'config'}: {was}, now {short(now)}"


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
