"""Tile planning: which region each tile owns (its core) and which it reads (core + halo).

Frames: all regions are ``(y0, y1, x0, x1)`` half-open pixel ranges of the full image. Cores lie
on a regular grid of step ``tile`` from the origin, so they partition the image exactly (every
pixel in one core) and, with ``tile`` a multiple of the output chunk size, align with chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellmask.errors import InputError


@dataclass(frozen=True)
class Tile:
    """One tile: ``core`` is the region it owns, ``window`` what it reads (core + halo, clipped)."""

    index: tuple[int, int]
    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]

    @property
    def local_core(self) -> tuple[int, int, int, int]:
        """The core ``(y0, y1, x0, x1)`` in the frame of the window (origin at its corner)."""
        (wy0, _, wx0, _), (y0, y1, x0, x1) = self.window, self.core
        return y0 - wy0, y1 - wy0, x0 - wx0, x1 - wx0

    def owns(self, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
        """Whether points ``(cy, cx)`` (full-image frame) fall in this tile's core."""
        y0, y1, x0, x1 = self.core
        return (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)


def plan_tiles(shape: tuple[int, int], tile: int, halo: int) -> list[Tile]:
    """Tiles of an image of ``shape`` ``(H, W)``, row-major.

    Raises ``ValueError`` for a non-positive ``tile``, a negative ``halo`` or an empty image.
    """
    h, w = int(shape[0]), int(shape[1])
    if tile <= 0:
        raise InputError(f"tile size must be positive, got {tile}")
    if halo < 0:
        raise InputError(f"halo must be zero or positive, got {halo}")
    if h <= 0 or w <= 0:
        raise InputError(f"cannot tile an empty image of shape {shape}")
    tiles = []
    for i, y0 in enumerate(range(0, h, tile)):
        for j, x0 in enumerate(range(0, w, tile)):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            window = (max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo))
            tiles.append(Tile((i, j), (y0, y1, x0, x1), window))
    return tiles
