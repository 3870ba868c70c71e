"""A batch's picture inputs: what a VLM's processor returns for its pictures, kept per picture so rows can be picked.

Processors lay pictures out differently, and the training / scoring paths must not care:

- LLaVA: ``pixel_values`` [n_pictures, C, H, W], one slice per picture.
- Qwen2-VL / Qwen2.5-VL: ``pixel_values`` [Σ t·h·w patches, C·temporal·patch·patch], the patches of every picture
  flattened one after another, and ``image_grid_thw`` [n_pictures, 3] saying how many patches each one has. Picking
  pictures means picking their patch spans; and the model places its multimodal rotary positions by
  ``mm_token_type_ids`` (1 at image tokens), which must cover the whole sequence the forward runs (prompt,
  completion and padding), so it is rebuilt from that sequence's ids (``as_kwargs``) rather than carried.

Every row of a batch that shows a picture shows exactly one (retain's prompts), so picture ``i`` is row ``i``'s
wherever every row shows one (a rollout batch, the shift's rows)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class PictureInputs:
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor | None = None  # [n, 3] for patch-flattened layouts (Qwen2-VL); None: one slice each
    image_token_id: int | None = None  # set where the model reads mm_token_type_ids (Qwen2-VL's rotary positions)

    @classmethod
    def from_processed(cls, processed: Mapping[str, torch.Tensor], image_token_id: int | None = None) -> PictureInputs:
        """The picture part of a processor's output (``image_token_id``: kept only where the processor also returned
        ``mm_token_type_ids``, i.e. where the model needs them)."""
        grid = processed.get("image_grid_thw")
        typed = "mm_token_type_ids" in processed
        return cls(processed["pixel_values"], grid, image_token_id if typed else None)

    def __len__(self) -> int:
        return len(self.pixel_values) if self.image_grid_thw is None else len(self.image_grid_thw)

    def _spans(self) -> list[tuple[int, int]]:
        """Each picture's slice of ``pixel_values``."""
        if self.image_grid_thw is None:
            return [(i, i + 1) for i in range(len(self.pixel_values))]
        ends = self.image_grid_thw.prod(-1).cumsum(0).tolist()
        return list(zip([0, *ends[:-1]], ends))

    @staticmethod
    def cat(parts: Sequence[PictureInputs | None]) -> PictureInputs | None:
        """Several rows' pictures, in order (None parts, text rows, skipped); None when there are none."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        grids = [p.image_grid_thw for p in parts]
        if any(g is None for g in grids) and any(g is not None for g in grids):
            raise ValueError("cannot stack pictures from processors with different layouts")
        return PictureInputs(torch.cat([p.pixel_values for p in parts]),
                             None if grids[0] is None else torch.cat(grids), parts[0].image_token_id)

    def rows(self, index: Sequence[int] | torch.Tensor | slice) -> PictureInputs:
        """Pictures ``index`` (a list of picture numbers, a 1-D index tensor or a slice), in that order."""
        if isinstance(index, slice):
            index = range(len(self))[index]
        index = [int(i) for i in index]
        if self.image_grid_thw is None:
            return PictureInputs(self.pixel_values[index], None, self.image_token_id)
        spans = self._spans()
        patches = [self.pixel_values[spans[i][0] : spans[i][1]] for i in index]
        empty = self.pixel_values[:0]
        return PictureInputs(torch.cat(patches) if patches else empty, self.image_grid_thw[index], self.image_token_id)

    def to(self, device: torch.device | str) -> PictureInputs:
        grid = None if self.image_grid_thw is None else self.image_grid_thw.to(device)
        return PictureInputs(self.pixel_values.to(device), grid, self.image_token_id)

    def as_kwargs(self, input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The model's forward keyword arguments for these pictures in a batch with ``input_ids`` (needed where the
        model takes ``mm_token_type_ids``; LLaVA gets ``pixel_values`` alone, as before)."""
        kwargs = {"pixel_values": self.pixel_values}
        if self.image_grid_thw is not None:
            kwargs["image_grid_thw"] = self.image_grid_thw
        if self.image_token_id is not None:
            if input_ids is None:
                raise ValueError("this model places its picture tokens by mm_token_type_ids: give the batch's ids")
            kwargs["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return kwargs


__all__ = ["PictureInputs"]
