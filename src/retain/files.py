"""Crash-safe files (the module is not called ``io``, which would shadow the standard library's). Atomic file
writes: write a temp file beside the target, fsync, then rename — a crash never leaves half a file.

Also: checksum manifests for directories (``write_manifest`` / ``verify_manifest``: a model or checkpoint directory
carries the sha256 and size of every file it holds, written last inside the temp directory before its rename, so a
loader can tell a complete directory from a truncated or bit-flipped one), and ``fault_point``, the hook the crash
tests use to kill a process at a chosen moment (inert unless ``RETAIN_FAULT`` is set).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fault_point("atomic_write")  # the temp file is complete, the target not yet replaced
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line; a crash can at worst lose this line, and readers skip a torn line. A torn last line left by
    a crash is ended first, so it never swallows the record appended after it."""
    line = (json.dumps(record, default=_jsonable) + "\n").encode("utf-8")
    with open(path, "ab+") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON-object lines of ``path`` (torn or malformed lines skipped); ``[]`` when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


# ------------------------------------------------------------------------------------------------ directories


def remove_dir(path: str | Path) -> None:
    """Delete a directory so that no reader ever sees it half deleted: it is renamed away first (atomic), then
    deleted under a ``*.tmp`` name — a kill during the deletion leaves a temp leftover, which resuming removes."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(path.name + ".del.tmp")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish_dir(tmp: str | Path, path: str | Path) -> None:
    """Move the complete directory ``tmp`` to ``path``, replacing what was there: a reader sees the old directory,
    then none, then the new one, never a mix of the two."""
    remove_dir(path)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ manifests


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())  # the bytes we vouch for are on disk before the directory is renamed into place
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Write ``directory/manifest.json``: the size and sha256 of every file below ``directory`` (fsynced first).

    Call it last, inside the temp directory, just before the rename that publishes the directory."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p != directory / MANIFEST and not p.name.endswith(".tmp"):
            files[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)}
    atomic_write_json(directory / MANIFEST, {"version": 1, "files": files})


def verify_manifest(directory: str | Path, required: bool = False) -> str | None:
    """``None`` when ``directory`` holds every file its manifest lists with the listed size and sha256; otherwise
    what is wrong, naming the file. A directory without a manifest (written before manifests existed) passes
    unless ``required``."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory}: missing"
    manifest = directory / MANIFEST
    if not manifest.exists():
        return f"{manifest}: missing" if required else None
    try:
        files = read_json(manifest)["files"]
        entries = [(str(rel), int(info["bytes"]), str(info["sha256"])) for rel, info in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest}: unreadable"
    for rel, size, sha in entries:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            return f"{manifest}: bad entry {rel!r}"
        path = directory / rel
        if not path.is_file():
            return f"{path}: missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path}: {actual} bytes, the manifest says {size} (truncated or overwritten)"
        if _sha256(path) != sha:
            return f"{path}: sha256 differs from the manifest (corrupted)"
    return None


# ------------------------------------------------------------------------------------------------ crash tests

_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named moment a crash test may strike at; does nothing unless the environment asks.

    ``RETAIN_FAULT=NAME:N`` SIGKILLs this process the N-th time it reaches point ``NAME`` (``NAME:N:enospc`` raises
    ``OSError(ENOSPC)`` there instead, a full disk; ``NAME:N:stop`` stops it with SIGSTOP, holding whatever it holds,
    until a SIGCONT); ``RETAIN_FAULT_TRACE=FILE`` appends each point reached to FILE,
    so a harness can count a run's points. Points: ``atomic_write`` (a temp file written, not yet renamed),
    ``eval`` (before each task of an evaluation row), ``model_dir`` / ``state_dir`` (a stage's directory written,
    not yet renamed), ``checkpoint`` / ``checkpoint_swap`` (a trainer checkpoint written / between its two renames),
    ``stage_done`` (before a stage's stage.json), ``results`` (before results.json)."""
    spec, trace = os.environ.get("RETAIN_FAULT"), os.environ.get("RETAIN_FAULT_TRACE")
    if not spec and not trace:
        return
    hits = _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if spec:
        target, _, rest = spec.partition(":")
        count, _, action = rest.partition(":")
        if target == name and count.isdigit() and hits == int(count):
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {name})")
            os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


def reset_fault_counts() -> None:
    """Forget how often each fault point was reached: an in-process test then counts ``RETAIN_FAULT``'s N from its
    own run (a process that dies at a point starts from zero anyway)."""
    _FAULT_HITS.clear()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
