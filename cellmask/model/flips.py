"""Test-time flips: the network sees each tile as it is and mirrored, and the views' detections
are fused into one set.

A detection found in most views is kept with its outline averaged over them; one found in a
single view (usually a faint or doubtful object) is scored down. This is the ``augment``
option of Cellpose's evaluation, for a detector: Cellpose averages its flow fields, a
detector has discrete objects, so here the views' detections are matched by box overlap and
fused as weighted box fusion does (Solovyev et al., "Weighted boxes fusion", Image Vis.
Comput. 2021): the fused box is the score-weighted mean of its members' boxes, the fused
score the sum of their scores over the number of views, and the fused mask the
score-weighted mean of the members' masks, each resampled onto the fused box.

Frames: an image is ``(C, H, W)``; boxes ``[x1, y1, x2, y2]`` in its pixels (pixel ``i``
spans ``[i, i + 1)``), so mirroring maps ``x`` to ``W - x``; masks are box-local ``(M, M)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cellmask.errors import InputError
from cellmask.model.nms import overlapping_pairs
from cellmask.model.paint import Instances

#: The views, as (flip rows, flip columns, then transpose): the image, mirrored left-right,
#: upside down, both (the first four), and the same four transposed (the eight symmetries of
#: the square).
VIEWS = ((False, False, False), (False, True, False), (True, False, False), (True, True, False),
         (False, False, True), (False, True, True), (True, False, True), (True, True, True))
View = tuple[bool, bool, bool]
#: Box IoU above which two views' detections are one object (weighted box fusion's 0.55).
FUSE_IOU = 0.55
#: Detections this far (px) outside a tile's core still reach the fusion.
CORE_MARGIN = 16.0


def views(count: int) -> tuple[View, ...]:
    """The first ``count`` views of :data:`VIEWS`: 1, 2, 4 or 8."""
    if count not in (1, 2, 4, 8):
        raise InputError(f"test_views must be 1, 2, 4 or 8, not {count!r}")
    return VIEWS[:count]

Core = tuple[float, float, float, float]


def view_image(image: np.ndarray, view: View) -> np.ndarray:
    """``image`` ``(C, H, W)`` as the network sees it in ``view``: a C-ordered copy with
    positive strides (``np.ascontiguousarray`` keeps the negative strides of a flipped axis of
    length 1, which torch refuses), or ``image`` itself for the identity."""
    flip_y, flip_x, transpose = view
    if not any(view):
        return image
    out = image[:, ::-1] if flip_y else image
    out = out[:, :, ::-1] if flip_x else out
    return (out.transpose(0, 2, 1) if transpose else out).copy(order="C")


def view_core(core: Core | None, view: View, shape: tuple[int, int],
              margin: float) -> Core | None:
    """The region ``(y0, y1, x0, x1)`` of an image of ``shape`` ``(H, W)`` in ``view``'s frame,
    grown by ``margin`` px: detections near a core's edge must reach the fusion from every
    view, so that whether a fused object is owned is decided on the fused box."""
    if core is None:
        return None
    y0, y1, x0, x1 = core
    h, w = shape
    if view[0]:
        y0, y1 = h - y1, h - y0
    if view[1]:
        x0, x1 = w - x1, w - x0
    if view[2]:
        y0, y1, x0, x1 = x0, x1, y0, y1
    return (y0 - margin, y1 + margin, x0 - margin, x1 + margin)


def unview(inst: Instances, view: View, shape: tuple[int, int]) -> Instances:
    """``inst`` found in ``view`` of an image of ``shape`` ``(H, W)``, in the image's frame."""
    h, w = shape
    boxes, masks = inst.boxes, inst.masks
    if view[2]:
        boxes, masks = boxes[:, [1, 0, 3, 2]], masks.transpose(0, 2, 1)
    boxes = boxes.copy()
    if view[1]:
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        masks = masks[:, :, ::-1]
    if view[0]:
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
        masks = masks[:, ::-1, :]
    return Instances(boxes, inst.scores, masks.copy(order="C"))


def _pair_iou(b: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    w = np.clip(np.minimum(b[i, 2], b[j, 2]) - np.maximum(b[i, 0], b[j, 0]), 0, None)
    h = np.clip(np.minimum(b[i, 3], b[j, 3]) - np.maximum(b[i, 1], b[j, 1]), 0, None)
    inter = w * h
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area[i] + area[j] - inter, 1e-9)


def clusters(boxes: np.ndarray, scores: np.ndarray, views: np.ndarray,
             iou: float) -> np.ndarray:
    """Cluster id of each detection (``(N, 4)`` boxes, scores, view index): by decreasing
    score, an unclustered detection starts a cluster and takes, from each other view, its
    unclustered detection of highest box IoU above ``iou``. At most one member per view."""
    n = len(scores)
    out = np.full(n, -1, np.int64)
    if n == 0:
        return out
    first, second = overlapping_pairs(boxes.astype(np.float32), iou)
    overlap = _pair_iou(boxes, first, second)
    # each pair both ways, grouped by its first detection, best overlap first
    a = np.concatenate([first, second])
    b = np.concatenate([second, first])
    o = np.concatenate([overlap, overlap])
    order = np.lexsort((-o, a))
    a, b = a[order], b[order]
    starts = np.searchsorted(a, np.arange(n + 1))
    next_id = 0
    for r in np.argsort(-scores, kind="stable"):
        if out[r] >= 0:
            continue
        out[r] = next_id
        taken = {int(views[r])}
        for k in b[starts[r]:starts[r + 1]]:
            v = int(views[k])
            if out[k] < 0 and v not in taken:
                out[k] = next_id
                taken.add(v)
        next_id += 1
    return out


def resample_masks(masks: np.ndarray, src: np.ndarray, dst: np.ndarray) -> torch.Tensor:
    """Box-local masks ``(N, M, M)`` over boxes ``src`` ``(N, 4)``, resampled onto boxes
    ``dst`` ``(N, 4)`` (bilinear, zero outside the source box): ``(N, M, M)``."""
    n, m = masks.shape[0], masks.shape[-1]
    centres = (np.arange(m, dtype=np.float32) + 0.5) / m
    sw = np.maximum(src[:, 2] - src[:, 0], 1e-3)[:, None]
    sh = np.maximum(src[:, 3] - src[:, 1], 1e-3)[:, None]
    xs = dst[:, 0:1] + centres[None] * (dst[:, 2:3] - dst[:, 0:1])
    ys = dst[:, 1:2] + centres[None] * (dst[:, 3:4] - dst[:, 1:2])
    grid = np.empty((n, m, m, 2), np.float32)
    grid[..., 0] = ((xs - src[:, 0:1]) / sw * 2 - 1)[:, None, :]
    grid[..., 1] = ((ys - src[:, 1:2]) / sh * 2 - 1)[:, :, None]
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(masks, np.float32))[:, None],
                        torch.from_numpy(grid), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out[:, 0]


def fuse(parts: list[Instances], iou: float, score_thresh: float) -> Instances:
    """One set of detections from the detections of ``len(parts)`` views (all in one frame):
    clusters (:func:`clusters`) fused into score-weighted mean boxes and masks, scored by the
    sum of their members' scores over the number of views; fused detections scoring below
    ``score_thresh`` are dropped. Sorted by decreasing score."""
    mask_size = parts[0].masks.shape[-1] if parts else 28
    pooled = Instances.concatenate(list(parts), mask_size)
    views = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)]) \
        if parts else np.zeros(0, np.int64)
    cid = clusters(pooled.boxes, pooled.scores, views, iou)
    count = int(cid.max()) + 1 if len(cid) else 0
    if count == 0:
        return pooled
    weight = pooled.scores.astype(np.float64)
    total = np.bincount(cid, weight, count)
    boxes = np.stack([np.bincount(cid, weight * pooled.boxes[:, k], count) / total
                      for k in range(4)], 1).astype(np.float32)
    scores = (total / len(parts)).astype(np.float32)
    on_fused = resample_masks(pooled.masks, pooled.boxes, boxes[cid])
    masks = torch.zeros((count, mask_size, mask_size))
    masks.index_add_(0, torch.from_numpy(cid), on_fused * torch.from_numpy(weight).float()
                     [:, None, None])
    masks = (masks / torch.from_numpy(total).float()[:, None, None]).numpy()
    keep = np.where(scores >= score_thresh)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return Instances(boxes[keep], scores[keep], masks[keep])
