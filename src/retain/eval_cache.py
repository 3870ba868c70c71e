"""A content-addressed store of evaluation rows, shared by the runs of a demo or a sweep.

Every run of a study evaluates its starting model before the first stage (row 0 of the accuracy matrix). Runs that
start from the same weights with the same evaluation settings compute the same row, bit for bit (greedy decoding
and seeded sampling are deterministic on one machine and thread count), so a study computes it once: the first run
to need a row computes it under a per-key file lock while the others wait, then read it.

The key is the sha256 of everything the row depends on: the parameters' bytes (names, shapes, dtypes, values — not
a file name, so a copied or renamed model hits and a changed one misses), the evaluation columns, ``n``, ``samples``
and seed, the engine, the torch thread count and the versions of retain, torch and transformers. An entry records
that description beside the row, so ``DIR/<key>.json`` says what it holds. A damaged entry is recomputed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from retain.files import atomic_write_json, read_json


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and bytes, in the module's order."""
    h = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def describe(model: torch.nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    """What a row depends on: the weights' digest, the caller's evaluation settings, threads and versions."""
    import transformers

    from retain.version import __version__

    return {
        "parameters": parameter_digest(model),
        **settings,
        "torch_threads": torch.get_num_threads(),
        "versions": {"retain": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _entry(cache: Path, description: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
    return cache / f"{key}.json"


def _read_entry(entry: Path, description: dict[str, Any]) -> dict[str, Any] | None:
    try:
        stored = read_json(entry)
    except (OSError, ValueError):
        return None  # absent or damaged: computed again
    if isinstance(stored, dict) and stored.get("description") == description and isinstance(stored.get("row"), dict):
        return stored["row"]
    return None


def stored_row(cache: str | Path | None, model: torch.nn.Module, settings: dict[str, Any],
               description: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The stored row for this model and settings, or ``None`` (nothing is computed or written). ``description``:
    :func:`describe` of them when the caller has it (the parameters' digest reads every weight once)."""
    if cache is None:
        return None
    description = description or describe(model, settings)
    return _read_entry(_entry(Path(cache), description), description)


def cached_row(
    cache: str | Path | None, model: torch.nn.Module, settings: dict[str, Any], compute: Callable[[], dict[str, Any]],
    description: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """``(row, hit)``: the stored row for this model and settings, or ``compute()`` stored for the next caller.
    Without a cache directory it simply computes. ``description``: as for :func:`stored_row`."""
    if cache is None:
        return compute(), False
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    description = description or describe(model, settings)
    entry = _entry(cache, description)
    with open(entry.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one computes, the others wait for its entry
        row = _read_entry(entry, description)
        if row is not None:
            return row, True
        row = compute()
        atomic_write_json(entry, {"description": description, "row": row})
        return row, False
