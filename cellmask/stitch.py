"""Stitching: from per-tile instances to one label image, independent of tile order.

Frames: every window is ``[x0, y0, x1, y1]`` (exclusive ends) in level-0 pixels of the whole
image; every mask is boolean ``(y1 - y0, x1 - x0)`` over its window.

1. **Ownership** (done per tile, see :mod:`cellmask.pipeline`): a tile keeps the instances whose
   box centre lies in its core, so each object is proposed by one tile when it is smaller than
   the halo.
2. **Resolution** (:func:`resolve`): all instances, ordered by score then position, claim their
   pixels; an instance that keeps less than ``min_visible_fraction`` of its mask (a duplicate
   from a neighbouring tile, or a fragment) is dropped. Only instances whose windows intersect
   can interact, so each one is checked against its neighbours in a grid index. Ids are given
   in this order: the result depends on neither the tile size nor the order tiles finished in.
3. **Painting** (:func:`paint_region`): any region (an output chunk) is painted from the kept
   instances that touch it. Kept masks are disjoint, so chunks can be painted in any order or
   in parallel and always agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InstanceSet:
    """Instances in the whole-image frame. ``masks[i]`` is boolean over ``windows[i]``."""

    windows: np.ndarray  # (N, 4) int64 [x0, y0, x1, y1]
    scores: np.ndarray   # (N,) float32
    masks: list
    #: (N,) float32: mean mask probability over each mask's pixels (NaN where unknown)
    confidence: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def mask_confidence(self) -> np.ndarray:
        if self.confidence is None:
            return np.full(len(self), np.nan, np.float32)
        return self.confidence

    @staticmethod
    def empty() -> "InstanceSet":
        return InstanceSet(np.zeros((0, 4), np.int64), np.zeros(0, np.float32), [],
                           np.zeros(0, np.float32))

    @staticmethod
    def concatenate(parts: list["InstanceSet"]) -> "InstanceSet":
        parts = [p for p in parts if len(p)]
        if not parts:
            return InstanceSet.empty()
        return InstanceSet(np.concatenate([p.windows for p in parts]),
                           np.concatenate([p.scores for p in parts]),
                           [m for p in parts for m in p.masks],
                           np.concatenate([p.mask_confidence for p in parts]))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for an ``.npz`` record: windows, scores, packed mask bits, confidence."""
        flat = [m.ravel() for m in self.masks]
        sizes = np.array([f.size for f in flat], np.int64)
        bits = np.packbits(np.concatenate(flat)) if flat else np.zeros(0, np.uint8)
        return {"windows": self.windows, "scores": self.scores, "sizes": sizes, "bits": bits,
                "confidence": self.mask_confidence}

    @staticmethod
    def from_arrays(d) -> "InstanceSet":
        windows = np.asarray(d["windows"], np.int64).reshape(-1, 4)
        sizes = np.asarray(d["sizes"], np.int64)
        flat = np.unpackbits(np.asarray(d["bits"], np.uint8), count=int(sizes.sum())).astype(bool)
        masks, start = [], 0
        for (x0, y0, x1, y1), n in zip(windows, sizes):
            masks.append(flat[start:start + n].reshape(y1 - y0, x1 - x0))
            start += n
        conf = np.asarray(d["confidence"], np.float32) if "confidence" in d else None
        return InstanceSet(windows, np.asarray(d["scores"], np.float32), masks, conf)


def _cells(window: np.ndarray, cell: int):
    x0, y0, x1, y1 = (int(v) for v in window)
    for cy in range(y0 // cell, (max(y1, y0 + 1) - 1) // cell + 1):
        for cx in range(x0 // cell, (max(x1, x0 + 1) - 1) // cell + 1):
            yield cy, cx


def priority_order(inst: InstanceSet) -> np.ndarray:
    """Indices by decreasing score, ties broken by position (y0, then x0): deterministic."""
    w = inst.windows
    return np.lexsort((w[:, 2], w[:, 3], w[:, 0], w[:, 1], -inst.scores.astype(np.float64)))


def resolve(inst: InstanceSet, *, min_visible_fraction: float = 0.5, min_area: int = 6,
            cell: int = 64) -> InstanceSet:
    """The kept instances, in id order (id = position + 1), with their visible (disjoint) masks.

    Each instance, in priority order, loses the pixels of the kept instances before it whose
    windows intersect its own; those pairs are found at once, vectorised, from a grid of
    ``cell``-sized buckets (about the size of an object), so the sequential part only visits
    each instance's few neighbours.
    """
    order = priority_order(inst)
    windows = inst.windows[order]
    before = _intersecting_predecessors(windows, cell)
    wins = windows.tolist()
    kept_at = np.full(len(order), -1, np.int64)  # rank -> position among the kept
    kept_w: list[list[int]] = []
    kept_m: list[np.ndarray] = []
    kept_s: list[float] = []
    kept_c: list[float] = []
    confidence = inst.mask_confidence
    for rank, i in enumerate(order.tolist()):
        mask = inst.masks[i]
        area = int(np.count_nonzero(mask))
        if area < min_area:
            continue
        x0, y0, x1, y1 = wins[rank]
        free = mask
        for k in kept_at[before[rank]].tolist():
            if k < 0:
                continue
            kx0, ky0, kx1, ky1 = kept_w[k]
            ix0, iy0, ix1, iy1 = max(x0, kx0), max(y0, ky0), min(x1, kx1), min(y1, ky1)
            if free is mask:
                free = mask.copy()
            free[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] &= \
                ~kept_m[k][iy0 - ky0:iy1 - ky0, ix0 - kx0:ix1 - kx0]
        visible = area if free is mask else int(np.count_nonzero(free))
        if visible < min_area or visible < min_visible_fraction * area:
            continue
        kept_at[rank] = len(kept_w)
        kept_w.append([x0, y0, x1, y1])
        kept_m.append(free)
        kept_s.append(float(inst.scores[i]))
        kept_c.append(float(confidence[i]))
    if not kept_w:
        return InstanceSet.empty()
    return InstanceSet(np.array(kept_w, np.int64), np.array(kept_s, np.float32), kept_m,
                       np.array(kept_c, np.float32))


def _cell_entries(windows: np.ndarray, cell: int):
    """``(owner, cell_y, cell_x)``: one entry per window and ``cell``-sized grid cell it
    touches (a window of zero width or height touches the cell of its corner)."""
    x0, y0, x1, y1 = (windows[:, k] for k in range(4))
    cx0, cy0 = x0 // cell, y0 // cell
    nx = (np.maximum(x1, x0 + 1) - 1) // cell - cx0 + 1
    ny = (np.maximum(y1, y0 + 1) - 1) // cell - cy0 + 1
    per = nx * ny
    owner = np.repeat(np.arange(len(windows)), per)
    within = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
    return owner, cy0[owner] + within // nx[owner], cx0[owner] + within % nx[owner]


def _cell_groups(windows: np.ndarray, cell: int):
    """The windows touching each grid cell: ``(owner, starts, cy, cx)``, where group ``g``,
    ``owner[starts[g]:starts[g + 1]]``, lists in ascending order the windows that touch cell
    ``(cy[g], cx[g])``; cells in row-major order."""
    owner, ey, ex = _cell_entries(windows, cell)
    by = np.lexsort((owner, ex, ey))
    owner, ey, ex = owner[by], ey[by], ex[by]
    starts = np.flatnonzero(np.r_[True, (ey[1:] != ey[:-1]) | (ex[1:] != ex[:-1])])
    return owner, starts, ey[starts], ex[starts]


def _intersecting_predecessors(windows: np.ndarray, cell: int) -> list[np.ndarray]:
    """For each window ``b`` (rows of ``(N, 4)`` ``[x0, y0, x1, y1]``), the sorted indices
    ``a < b`` of the windows that overlap it by at least one pixel."""
    n = len(windows)
    if n == 0:
        return []
    x0, y0, x1, y1 = (windows[:, k] for k in range(4))
    owner, starts, _, _ = _cell_groups(windows, cell)
    # within each cell, every entry pairs with the entries after it (larger window index)
    size = np.diff(np.r_[starts, len(owner)])
    cell_of = np.repeat(np.arange(len(starts)), size)
    after = starts[cell_of] + size[cell_of] - np.arange(len(owner)) - 1  # entries after me
    a = np.repeat(owner, after)
    first = np.repeat(np.arange(len(owner)) + 1, after)
    b = owner[first + np.arange(int(after.sum())) - np.repeat(np.cumsum(after) - after, after)]
    pairs = np.unique(b * n + a)  # a pair sharing several cells counts once; sorted by b, a
    b, a = pairs // n, pairs % n
    hit = (np.minimum(x1[a], x1[b]) > np.maximum(x0[a], x0[b])) & \
          (np.minimum(y1[a], y1[b]) > np.maximum(y0[a], y0[b]))
    a, b = a[hit], b[hit]
    return np.split(a, np.searchsorted(b, np.arange(1, n)))


class SpatialIndex:
    """Which kept instances touch a region: a grid of ``cell``-sized buckets."""

    def __init__(self, inst: InstanceSet, cell: int):
        self.inst = inst
        self.cell = cell
        self.grid: dict[tuple[int, int], np.ndarray] = {}
        if len(inst):
            owner, starts, cy, cx = _cell_groups(inst.windows, cell)
            for y, x, part in zip(cy.tolist(), cx.tolist(), np.split(owner, starts[1:])):
                self.grid[y, x] = part

    def query(self, y0: int, y1: int, x0: int, x1: int) -> list[int]:
        found = [self.grid[c] for c in _cells(np.array([x0, y0, x1, y1]), self.cell)
                 if c in self.grid]
        return np.unique(np.concatenate(found)).tolist() if found else []


def paint_region(inst: InstanceSet, index: SpatialIndex, region: tuple[int, int, int, int],
                 first_id: int = 1, dtype=np.int32) -> np.ndarray:
    """Labels ``(y1 - y0, x1 - x0)`` of ``region`` ``(y0, y1, x0, x1)``; instance ``k`` gets
    id ``first_id + k``."""
    y0, y1, x0, x1 = region
    out = np.zeros((y1 - y0, x1 - x0), dtype)
    for k in index.query(y0, y1, x0, x1):
        wx0, wy0, wx1, wy1 = (int(v) for v in inst.windows[k])
        ix0, iy0, ix1, iy1 = max(wx0, x0), max(wy0, y0), min(wx1, x1), min(wy1, y1)
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        m = inst.masks[k][iy0 - wy0:iy1 - wy0, ix0 - wx0:ix1 - wx0]
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0][m] = first_id + k
    return out
