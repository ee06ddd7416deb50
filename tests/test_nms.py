"""The neighbour NMS keeps exactly what torchvision's CPU kernel keeps, in the same order."""

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import nms as tv_nms

from cellmask.model.nms import SMALL, batched_nms, nms, overlapping_pairs


def _boxes(seed: int, n: int, size: float, largest: float, grid: bool):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * largest + 0.5
    if grid:  # whole-pixel boxes: many exactly equal overlaps
        xy, wh = xy.round(), wh.round().clamp(min=1)
    scores = torch.rand(n, generator=g)
    return torch.cat([xy, xy + wh], 1), scores


@pytest.mark.parametrize("seed", range(24))
def test_same_indices_as_torchvision(seed):
    n = SMALL + 97 * seed
    boxes, scores = _boxes(seed, n, 100.0 + 25 * seed, 6.0 + 5 * seed, grid=seed % 2 == 0)
    if seed % 3 == 0:
        scores = (scores * 10).round() / 10  # tied scores: the kernel's stable order
    threshold = (0.3, 0.5, 0.6, 0.7)[seed % 4]
    expected = tv_nms(boxes, scores, threshold)
    assert len(expected) < n  # something was suppressed
    assert torch.equal(nms(boxes, scores, threshold), expected)
    levels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(batched_nms(boxes, scores, levels, threshold),
                       tv_batched_nms(boxes, scores, levels, threshold))


def test_pairs_are_every_overlap_above_the_threshold():
    boxes, _ = _boxes(5, 700, 300.0, 40.0, grid=False)
    b = boxes.numpy()
    i, j = overlapping_pairs(b, 0.5)
    x1, y1, x2, y2 = b.T
    w = np.clip(np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1), 0, None)
    h = np.clip(np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1), 0, None)
    area = (x2 - x1) * (y2 - y1)
    iou = w * h / (area[:, None] + area - w * h)
    bi, bj = np.nonzero(np.triu(iou > 0.5, 1))
    assert len(bi) > 50
    assert set(zip(i.tolist(), j.tolist())) == set(zip(bi.tolist(), bj.tolist()))


def test_small_and_empty_inputs():
    empty = torch.zeros((0, 4))
    assert len(nms(empty, torch.zeros(0), 0.5)) == 0
    boxes, scores = _boxes(1, 10, 50.0, 20.0, grid=False)
    assert torch.equal(nms(boxes, scores, 0.5), tv_nms(boxes, scores, 0.5))


def test_box_decoding_keeps_torchvisions_detections(shipped_model):
    """The inference heads' box decoding (with the neighbour NMS) returns torchvision's
    detections exactly, for a dense and a sparse image in one batch."""
    from torchvision.models.detection.roi_heads import RoIHeads

    heads = shipped_model.runner.roi_heads
    proposals, counts = [], (4000, 60)
    for seed, n in enumerate(counts):
        boxes, _ = _boxes(seed, n, 500.0, 25.0, grid=False)
        proposals.append(boxes)
    g = torch.Generator().manual_seed(7)
    total = sum(counts)
    logits = torch.randn(total, 2, generator=g) * 3
    regression = torch.randn(total, 8, generator=g) * 0.1
    shapes = [(512, 512), (512, 512)]
    budget = heads.detections_per_img  # set per run from the image size; fixed here
    heads.detections_per_img = 4000
    try:
        ours = heads.postprocess_detections(logits, regression, proposals, shapes)
        theirs = RoIHeads.postprocess_detections(heads, logits, regression, proposals, shapes)
    finally:
        heads.detections_per_img = budget
    assert len(ours[0][0]) > SMALL  # the dense image went through the neighbour NMS
    for a, b in zip(ours, theirs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
