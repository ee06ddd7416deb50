"""From box-local detections to an instance label image.

Frames: ``boxes`` are ``(N, 4)`` float ``[x1, y1, x2, y2]`` in pixels of the output image (pixel
``i`` spans ``[i, i + 1)``); ``masks`` are ``(N, M, M)`` probabilities that map onto their box.
No full-size mask is ever built: each mask is resampled to the integer pixel window of its box,
thresholded, and painted there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Instances:
    """Detections in one frame: ``boxes`` ``(N, 4)`` float32, ``scores`` ``(N,)`` float32,
    ``masks`` ``(N, M, M)`` float32 probabilities, box-local."""

    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> "Instances":
        """The subset ``keep`` (boolean mask or indices) of every field at once."""
        return Instances(self.boxes[keep], self.scores[keep], self.masks[keep])

    def owned_by(self, tile) -> "Instances":
        """The instances whose box centre lies in the core of ``tile`` (same frame)."""
        cy = (self.boxes[:, 1] + self.boxes[:, 3]) / 2
        cx = (self.boxes[:, 0] + self.boxes[:, 2]) / 2
        return self.select(tile.owns(cy, cx))

    def shifted(self, dy: float, dx: float) -> "Instances":
        """The same instances in a frame whose origin is at ``(-dy, -dx)`` of this one."""
        offset = np.array([dx, dy, dx, dy], dtype=np.float32)
        return Instances(self.boxes + offset, self.scores, self.masks)

    @staticmethod
    def concatenate(parts: list["Instances"], mask_size: int) -> "Instances":
        if not parts:
            return Instances(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                             np.zeros((0, mask_size, mask_size), np.float32))
        return Instances(np.concatenate([p.boxes for p in parts]),
                         np.concatenate([p.scores for p in parts]),
                         np.concatenate([p.masks for p in parts]))


def pixel_windows(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Integer windows ``(N, 4)`` ``[x0, y0, x1, y1]`` (exclusive ends) covering each box,
    clipped to an image of ``shape`` ``(H, W)``."""
    h, w = shape
    win = np.empty((len(boxes), 4), dtype=np.int64)
    win[:, 0] = np.clip(np.floor(boxes[:, 0]), 0, w)
    win[:, 1] = np.clip(np.floor(boxes[:, 1]), 0, h)
    win[:, 2] = np.clip(np.ceil(boxes[:, 2]), 0, w)
    win[:, 3] = np.clip(np.ceil(boxes[:, 3]), 0, h)
    return win


def local_masks(inst: Instances, windows: np.ndarray, thresh: float,
                chunk: int = 512, device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Boolean masks, one per instance, of shape ``(y1 - y0, x1 - x0)`` of its window.

    Each pixel centre of the window is located in the box and the box-local probability map is
    sampled there bilinearly (``grid_sample``, on ``device``); instances are processed in chunks
    of similar size so that a few large boxes do not inflate the work of the many small ones.
    """
    n = len(inst)
    out: list[np.ndarray] = [np.zeros((0, 0), bool)] * n
    if n == 0:
        return out
    heights = windows[:, 3] - windows[:, 1]
    widths = windows[:, 2] - windows[:, 0]
    order = np.argsort(np.maximum(heights, widths), kind="stable")
    masks = torch.from_numpy(np.ascontiguousarray(inst.masks, dtype=np.float32))[:, None]
    masks = masks.to(device)
    for start in range(0, n, chunk):
        idx = order[start:start + chunk]
        gh, gw = int(heights[idx].max()), int(widths[idx].max())
        if gh == 0 or gw == 0:
            continue
        b = inst.boxes[idx]
        bw = np.maximum(b[:, 2] - b[:, 0], 1e-3)
        bh = np.maximum(b[:, 3] - b[:, 1], 1e-3)
        # pixel centres of the window, in the normalised [-1, 1] frame of each box
        xs = windows[idx, 0:1] + np.arange(gw)[None] + 0.5
        ys = windows[idx, 1:2] + np.arange(gh)[None] + 0.5
        gx = (xs - b[:, 0:1]) / bw[:, None] * 2 - 1
        gy = (ys - b[:, 1:2]) / bh[:, None] * 2 - 1
        grid = np.empty((len(idx), gh, gw, 2), dtype=np.float32)
        grid[..., 0] = gx[:, None, :]
        grid[..., 1] = gy[:, :, None]
        sampled = F.grid_sample(masks[torch.from_numpy(idx).to(masks.device)],
                                torch.from_numpy(grid).to(masks.device),
                                mode="bilinear", padding_mode="zeros", align_corners=False)
        binary = (sampled[:, 0] > thresh).cpu().numpy()
        for k, i in enumerate(idx):
            out[i] = binary[k, :heights[i], :widths[i]]
    return out


def paint(inst: Instances, shape: tuple[int, int], *, mask_thresh: float = 0.5,
          min_visible_fraction: float = 0.5, min_area: int = 6,
          first_id: int = 1) -> np.ndarray:
    """Paint instances into an int32 label image of ``shape``, highest score first.

    The same rule as whole-slide stitching (:func:`cellmask.stitch.resolve`): a pixel claimed by
    a higher-scoring object is never repainted; an object that keeps less than
    ``min_visible_fraction`` of its own mask, or fewer than ``min_area`` pixels, is dropped (a
    duplicate or a fragment). Ids are consecutive from ``first_id`` in score order.
    """
    from cellmask.stitch import InstanceSet, SpatialIndex, paint_region, resolve

    windows = pixel_windows(inst.boxes, shape)
    kept = resolve(InstanceSet(windows, inst.scores, local_masks(inst, windows, mask_thresh)),
                   min_visible_fraction=min_visible_fraction, min_area=min_area)
    return paint_region(kept, SpatialIndex(kept, 256), (0, shape[0], 0, shape[1]), first_id)
