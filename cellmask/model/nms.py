"""Greedy non-maximum suppression that compares each box with its neighbours only.

torchvision's CPU kernel compares every kept box with every box ranked below it: on a dense
tile's 5,000 region proposals of one FPN level that is ~12 million overlaps, and the proposal
NMS costs more than the box head. Nuclei proposals are small against a tile, so here the
overlapping pairs are found first on a grid of cells as large as the largest box (a box can
only overlap boxes whose corner lies in its own or a neighbouring cell), with the kernel's own
float32 arithmetic, and the greedy pass then visits each box's few neighbours. The kept
indices are those of ``torchvision.ops.nms``, in the same order (tested on real proposals).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import boxes as box_ops

#: Below this many boxes torchvision's kernel is as fast.
SMALL = 512
#: Neighbouring cells of a cell, each unordered pair of cells once (the cell itself apart).
_NEIGHBOURS = ((0, 1), (1, -1), (1, 0), (1, 1))


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each ``k``, the integers ``starts[k] .. ends[k] - 1``: ``(owner k, value)`` flat."""
    counts = np.maximum(ends - starts, 0)
    owner = np.repeat(np.arange(len(starts)), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, starts[owner] + offsets


def overlapping_pairs(b: np.ndarray, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, of boxes ``b`` ``(N, 4)`` float32 ``[x1, y1, x2, y2]``
    whose IoU exceeds ``iou_threshold``, computed as torchvision's CPU kernel does."""
    x1, y1, x2, y2 = (np.ascontiguousarray(b[:, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    side = float(max((x2 - x1).max(), (y2 - y1).max(), 1.0))
    cx = np.floor((x1 - x1.min()) / side).astype(np.int64)
    cy = np.floor((y1 - y1.min()) / side).astype(np.int64)
    cols = int(cx.max()) + 3
    key = (cy + 1) * cols + (cx + 1)  # a margin column so that neighbours never wrap
    perm = np.argsort(key, kind="stable")
    sorted_key = key[perm]
    firsts, seconds = [], []
    # the same cell: each box with the boxes after it in the sorted order
    pos = np.arange(len(b))
    owner, other = _ranges(pos + 1, np.searchsorted(sorted_key, sorted_key, "right"))
    firsts.append(perm[owner])
    seconds.append(perm[other])
    for dy, dx in _NEIGHBOURS:
        target = sorted_key + dy * cols + dx
        owner, other = _ranges(np.searchsorted(sorted_key, target, "left"),
                               np.searchsorted(sorted_key, target, "right"))
        firsts.append(perm[owner])
        seconds.append(perm[other])
    i, j = np.concatenate(firsts), np.concatenate(seconds)
    i, j = np.minimum(i, j), np.maximum(i, j)
    w = np.maximum(np.float32(0), np.minimum(x2[i], x2[j]) - np.maximum(x1[i], x1[j]))
    h = np.maximum(np.float32(0), np.minimum(y2[i], y2[j]) - np.maximum(y1[i], y1[j]))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        ovr = inter / (areas[i] + areas[j] - inter)
    # the kernel compares the float32 overlap with the threshold as a double
    hit = ovr.astype(np.float64) > iou_threshold
    return i[hit], j[hit]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes ``(N, 4)`` kept by greedy NMS, by decreasing score: those of
    ``torchvision.ops.nms`` (which runs below :data:`SMALL` boxes or off the CPU)."""
    if len(boxes) < SMALL or boxes.device.type != "cpu" or boxes.dtype != torch.float32:
        return box_ops.nms(boxes, scores, iou_threshold)
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]  # the kernel's order
    ranked = boxes[order].numpy()
    first, second = overlapping_pairs(ranked, iou_threshold)
    by_first = np.argsort(first, kind="stable")
    first, second = first[by_first], second[by_first]
    starts = np.searchsorted(first, np.arange(len(ranked) + 1))
    suppressed = np.zeros(len(ranked), bool)
    keep = []
    for r in range(len(ranked)):
        if suppressed[r]:
            continue
        keep.append(r)
        s, e = starts[r], starts[r + 1]
        if e > s:
            suppressed[second[s:e]] = True
    return order[torch.as_tensor(keep, dtype=torch.int64)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.batched_nms`` with :func:`nms` per category where torchvision runs
    one NMS per category (more than 1,000 boxes on the CPU); the same indices."""
    if boxes.numel() <= 4000 or boxes.device.type != "cpu":
        return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        current = torch.where(idxs == class_id)[0]
        keep_mask[current[nms(boxes[current], scores[current], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]
