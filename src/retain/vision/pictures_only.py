"""A VLM processor without its video processor, for when that one cannot load.

Qwen2-VL / Qwen2.5-VL processors bundle a video processor, and in transformers 5 it needs torchvision: without it
``AutoProcessor.from_pretrained`` raises ImportError although retain never feeds a video. Here the same processor
class is built from the directory's image processor, tokenizer and chat template with no video processor; its
``__call__`` on text and images is the class's own, and ``save_pretrained`` writes what loads again the same way
(with torchvision installed, as the full processor).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.utils import cached_file

from retain.errors import RetainError

# the files that may name a processor's class, in the order transformers reads them
CLASS_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


class PicturesOnly:
    """Mixed in before a ``ProcessorMixin`` class: accepts ``video_processor=None`` and saves without it."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument is None:  # the video processor left out (its class cannot even be looked up without torchvision)
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> list[str]:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        (directory / "processor_config.json").write_text(
            json.dumps({"processor_class": type(self).__mro__[2].__name__}, indent=2) + "\n", encoding="utf-8")
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        return [str(directory)]


def _read(path: str, name: str) -> dict[str, Any]:
    found = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(found).read_text(encoding="utf-8")) if found else {}


def _chat_template(path: str, tokenizer: Any) -> str | None:
    jinja = cached_file(path, "chat_template.jinja", _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    if jinja:
        return Path(jinja).read_text(encoding="utf-8")
    return _read(path, "chat_template.json").get("chat_template") or getattr(tokenizer, "chat_template", None)


def pictures_only_processor(path: str, why: ImportError) -> Any:
    """The processor of the VLM at ``path`` without its video processor; ``why``: the ImportError loading it gave,
    raised again if the processor has no video processor to leave out (the failure is elsewhere)."""
    name = next((n for f in CLASS_FILES if (n := _read(path, f).get("processor_class"))), None)
    base = getattr(transformers, name, None) if name else None
    if base is None or "video_processor" not in base.get_attributes():
        raise RetainError(f"cannot load the processor of {path!r}: {str(why).strip().splitlines()[0]}") from why
    tokenizer = AutoTokenizer.from_pretrained(path)
    cls = type(name, (PicturesOnly, base), {})
    return cls(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer, video_processor=None,
               chat_template=_chat_template(path, tokenizer))


__all__ = ["PicturesOnly", "pictures_only_processor"]
