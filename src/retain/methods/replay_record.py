"""The replay buffers as a run directory keeps them (``stages/N/state/replay.json``), pictures included.

A buffer holds (prompt, answer) pairs drawn from a task's train split (``WithReplay.end_stage``). A text pair is
saved as ``[prompt, answer]``. A visual task's prompt is a ``PicturePrompt`` whose picture is not in its text, so its
pair is saved as ``[prompt, answer, {"split", "index", "pixels_sha256"}]``: where the example lies in the task's
split (``examples(split, None, seed=0)``, the order the buffer was drawn from) and a digest of the rendered picture.
A resume takes that example again — the same ``PicturePrompt``, scene and reference answer the run had in memory —
and checks its text, answer and pixels against what was saved.

Why a reference and not the pixels: retain renders every visual task's pictures itself, deterministically
(``retain.vision.render``: the same pixels for the same scene on every machine), so the reference gives back the very
prompt object the buffer held (equal and hashing alike, so the VLM kind's per-prompt encoding cache and the rewards,
which read the prompt's reference answer, see no difference), at ~100 bytes an entry instead of a picture. What a
reference alone could not catch — the renderer or a task's split changing between save and resume — the digest does:
the resume then stops with one error instead of replaying other pictures.
"""

from __future__ import annotations

import hashlib
from typing import Any

from retain import tasks as task_registry
from retain.errors import RetainError

Pair = tuple[str, str]
SPLIT = "train"  # the split WithReplay fills its buffers from


def picture_digest(image: Any) -> str:
    """sha256 of a rendered picture's mode, size and pixel bytes."""
    picture = image.render()
    return hashlib.sha256(f"{picture.mode}{picture.size}".encode() + picture.tobytes()).hexdigest()


def replay_record(replay: dict[str, list[Pair]]) -> dict[str, list[list[Any]]]:
    """The buffers as JSON: a text pair as ``[prompt, answer]``, a picture pair with its example's place and digest."""
    out: dict[str, list[list[Any]]] = {}
    for task_name, pairs in replay.items():
        places: dict[str, int] | None = None
        entries: list[list[Any]] = []
        for prompt, answer in pairs:
            image = getattr(prompt, "image", None)
            if image is None:
                entries.append([str(prompt), answer])
                continue
            if places is None:  # the split's order, read once per buffer that shows pictures
                places = {}
                for i, example in enumerate(task_registry.get(task_name).examples(SPLIT, None, seed=0)):
                    places.setdefault(example.prompt, i)
            if prompt not in places:
                raise RetainError(f"replay buffer of task {task_name!r}: a picture prompt {str(prompt)!r} that is not "
                                  f"in the task's {SPLIT} split cannot be saved so that a resume shows its picture")
            entries.append([str(prompt), answer,
                            {"split": SPLIT, "index": places[prompt], "pixels_sha256": picture_digest(image)}])
        out[task_name] = entries
    return out


def replay_from_record(record: Any, where: str) -> dict[str, list[Pair]]:
    """The buffers ``replay_record`` saved, each picture prompt taken again from its task and checked; a malformed
    entry or one whose text, answer or pixels differ from the example's now is a ``RetainError`` naming ``where``."""
    if not isinstance(record, dict):
        raise RetainError(f"{where}: expected a mapping of task -> pairs, got {type(record).__name__}")
    splits: dict[tuple[str, str], list[Any]] = {}
    out: dict[str, list[Pair]] = {}
    for task_name, entries in record.items():
        if not isinstance(entries, list):
            raise RetainError(f"{where}: task {task_name!r}: expected a list of pairs")
        pairs: list[Pair] = []
        for i, entry in enumerate(entries):
            at = f"{where}: task {task_name!r} entry {i}"
            if not (isinstance(entry, list) and len(entry) in (2, 3) and all(isinstance(x, str) for x in entry[:2])):
                raise RetainError(f"{at}: expected [prompt, answer] or [prompt, answer, picture]")
            text, answer = entry[0], entry[1]
            if len(entry) == 2:
                pairs.append((text, answer))
                continue
            pairs.append((_pictured_prompt(task_name, text, answer, entry[2], splits, at), answer))
        out[task_name] = pairs
    return out


def _pictured_prompt(task_name: str, text: str, answer: str, picture: Any, splits: dict, at: str) -> str:
    if not (isinstance(picture, dict) and isinstance(picture.get("split"), str)
            and type(picture.get("index")) is int and isinstance(picture.get("pixels_sha256"), str)):
        raise RetainError(f"{at}: a picture is {{split, index, pixels_sha256}}")
    split, index = picture["split"], picture["index"]
    try:
        task = task_registry.get(task_name)
        task.check_split(split)
    except RetainError as err:
        raise RetainError(f"{at}: {err}") from None
    if (task_name, split) not in splits:
        splits[task_name, split] = task.examples(split, None, seed=0)
    examples = splits[task_name, split]
    if not 0 <= index < len(examples):
        raise RetainError(f"{at}: index {index} is outside task {task_name!r}'s {split} split ({len(examples)})")
    example = examples[index]
    prompt = example.prompt
    if str(prompt) != text or example.answer != answer or getattr(prompt, "image", None) is None:
        raise RetainError(f"{at}: task {task_name!r}'s {split} example {index} is no longer the one saved "
                          f"({str(prompt)!r} -> {example.answer!r}, saved {text!r} -> {answer!r})")
    if picture_digest(prompt.image) != picture["pixels_sha256"]:
        raise RetainError(f"{at}: task {task_name!r}'s {split} example {index} now renders other pixels than the "
                          "saved picture (the renderer changed since the run was saved)")
    return prompt


__all__ = ["picture_digest", "replay_from_record", "replay_record"]
