"""Pictures for the visual tasks, drawn by retain itself with numpy: playing cards, coloured shapes, numbers.

A *scene* is a small frozen description (what is drawn, where, and a ``seed`` for the nuisance: position jitter and
pixel noise); ``scene.render()`` draws it as a ``SIZE`` x ``SIZE`` RGB ``PIL.Image``, the same pixels for the same
scene on every machine (integer arithmetic, a built-in 3x5 pixel font, no font files). Splits are cut on what a
scene shows, never on its nuisance seed, so a held-out picture shows a held-out hand or layout.

Layouts line up with the vision tower's 8-pixel patches: a card slot is 16 pixels wide, a shape cell 16 x 16.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 48

# 3x5 glyphs, one string of 15 bits per character, row-major
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", "a": "010101111101101", "j": "001001001101111",
    "q": "010101101110011", "k": "101110100110101",
}  # fmt: skip
# 5x5 suit pips
_PIPS = {
    "spade": "0010001110111110010001110", "club": "0111001110111110010001110",
    "heart": "0101011111111110111000100", "diamond": "0010001110111110111000100",
}  # fmt: skip
BLACK_SUITS = ("spade", "club")
RED_SUITS = ("heart", "diamond")
INK = {"black": (20, 20, 20), "red": (200, 30, 30)}

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40),
          "white": (235, 235, 235)}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
CELL = 16  # a shape cell; the picture is a 3 x 3 grid of cells


def _mask(bits: str, width: int) -> np.ndarray:
    return np.array([c == "1" for c in bits], dtype=bool).reshape(-1, width)


def glyph(ch: str, scale: int = 1) -> np.ndarray:
    """The boolean mask of one font character, each pixel ``scale`` x ``scale``."""
    return np.kron(_mask(_FONT[ch], 3), np.ones((scale, scale), dtype=bool)).astype(bool)


def text_mask(text: str, scale: int = 1, gap: int = 1) -> np.ndarray:
    parts = [glyph(c, scale) for c in text]
    height = parts[0].shape[0]
    out = np.zeros((height, sum(p.shape[1] for p in parts) + gap * (len(parts) - 1)), dtype=bool)
    x = 0
    for p in parts:
        out[:, x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def _stamp(img: np.ndarray, mask: np.ndarray, y: int, x: int, color: tuple[int, int, int]) -> None:
    h, w = mask.shape
    region = img[y : y + h, x : x + w]
    region[mask[: region.shape[0], : region.shape[1]]] = color


def _finish(img: np.ndarray, rng: random.Random) -> Image.Image:
    """Add a little deterministic pixel noise (so no two pictures are byte-identical) and wrap as a PIL image."""
    noise = np.random.default_rng(rng.getrandbits(64)).integers(-6, 7, size=(SIZE, SIZE, 1), dtype=np.int16)
    return Image.fromarray(np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8), mode="RGB")


def _shape_mask(kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "square":
        return np.ones((size, size), dtype=bool)
    if kind == "circle":
        c = (size - 1) / 2
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    if kind == "triangle":  # apex up: row r spans a width growing with r
        half = (yy + 1) * size / (2 * size)
        return np.abs(xx - (size - 1) / 2) <= half
    raise ValueError(f"unknown shape {kind!r}")


RANK_TEXT = {1: "a", 11: "j", 12: "q", 13: "k"}


@dataclass(frozen=True)
class CardScene:
    """Cards in a row, left to right: ``ranks`` (1..13) with their ``suits`` (names of ``_PIPS``)."""

    ranks: tuple[int, ...]
    suits: tuple[str, ...]
    seed: int = 0

    def render(self) -> Image.Image:
        rng = random.Random(f"cards/{self.ranks}/{self.suits}/{self.seed}")
        img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        img[:] = (40, 110, 60)  # the table
        slot = SIZE // max(3, len(self.ranks))
        for i, (rank, suit) in enumerate(zip(self.ranks, self.suits)):
            x, y = i * slot + 1, 10 + rng.randint(0, 6)
            img[y : y + 24, x : x + slot - 2] = (245, 245, 240)
            ink = INK["red" if suit in RED_SUITS else "black"]
            label = text_mask(RANK_TEXT.get(rank, str(rank)), scale=2 if rank != 10 else 1)
            _stamp(img, label, y + 2, x + (slot - 2 - label.shape[1]) // 2, ink)
            _stamp(img, _mask(_PIPS[suit], 5), y + 15, x + (slot - 2 - 5) // 2, ink)
        return _finish(img, rng)


@dataclass(frozen=True)
class ShapeScene:
    """Shapes on a 3 x 3 grid: ``items`` are (cell 0..8 row-major, shape, colour)."""

    items: tuple[tuple[int, str, str], ...]
    seed: int = 0

    def render(self) -> Image.Image:
        rng = random.Random(f"shapes/{self.items}/{self.seed}")
        img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        img[:] = (30, 30, 35)
        for cell, kind, color in self.items:
            size = rng.randint(10, 13)
            y = (cell // 3) * CELL + rng.randint(0, CELL - size)
            x = (cell % 3) * CELL + rng.randint(0, CELL - size)
            _stamp(img, _shape_mask(kind, size), y, x, COLORS[color])
        return _finish(img, rng)


@dataclass(frozen=True)
class NumberScene:
    """A number written in the pixel font (``scale`` 3) in ``color``."""

    text: str
    color: str = "white"
    seed: int = 0

    def render(self) -> Image.Image:
        rng = random.Random(f"number/{self.text}/{self.color}/{self.seed}")
        img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        img[:] = (30, 30, 35)
        mask = text_mask(self.text, scale=3, gap=2)
        y = rng.randint(4, SIZE - mask.shape[0] - 4)
        x = rng.randint(1, max(1, SIZE - mask.shape[1] - 1))
        _stamp(img, mask, y, x, COLORS[self.color])
        return _finish(img, rng)
