import numpy as np
import pytest
from skimage.draw import disk

from cellmask.model.paint import Instances, local_masks, paint, pixel_windows
from cellmask.tiling import plan_tiles


def instances_from_labels(labels, scores=None, m=28):
    """Exact box-local masks of a label image, as a perfect network would return them."""
    import torch
    from torchvision.ops import roi_align

    ids = [i for i in np.unique(labels) if i]
    boxes = []
    for i in ids:
        ys, xs = np.nonzero(labels == i)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    full = torch.from_numpy(np.stack([(labels == i) for i in ids]).astype(np.float32))[:, None]
    rois = torch.cat([torch.arange(len(ids))[:, None].float(), torch.from_numpy(boxes)], 1)
    masks = roi_align(full, rois, (m, m), 1.0, sampling_ratio=2, aligned=True)[:, 0].numpy()
    scores = np.linspace(1, 0.5, len(ids)).astype(np.float32) if scores is None else scores
    return Instances(boxes, scores, masks)


def test_paint_reproduces_disks():
    labels = np.zeros((120, 140), np.int32)
    for i, (cy, cx, r) in enumerate([(20, 20, 8), (60, 70, 15), (100, 30, 5), (30, 110, 11)], 1):
        labels[disk((cy, cx), r, shape=labels.shape)] = i
    out = paint(instances_from_labels(labels), labels.shape)
    assert out.max() == 4
    for i in range(1, 5):
        pred = out == out[labels == i][0]
        iou = (pred & (labels == i)).sum() / (pred | (labels == i)).sum()
        assert iou > 0.9


def test_higher_score_wins_and_duplicates_dropped():
    labels = np.zeros((60, 60), np.int32)
    labels[disk((30, 30), 10)] = 1
    inst = instances_from_labels(labels)
    dup = Instances(np.concatenate([inst.boxes, inst.boxes + 1]), np.array([0.6, 0.9], np.float32),
                    np.concatenate([inst.masks, inst.masks]))
    out = paint(dup, labels.shape)
    assert out.max() == 1  # the shifted duplicate keeps < 50% of itself: dropped
    ys, xs = np.nonzero(out == 1)
    assert xs.min() == np.nonzero(labels)[1].min() + 1  # the 0.9 (shifted) copy was painted


def test_masks_stay_box_local():
    labels = np.zeros((50, 50), np.int32)
    labels[disk((25, 25), 6)] = 1
    inst = instances_from_labels(labels)
    win = pixel_windows(inst.boxes, labels.shape)
    (m,) = local_masks(inst, win, 0.5)
    assert m.shape == (win[0, 3] - win[0, 1], win[0, 2] - win[0, 0])


def test_empty_instances():
    empty = Instances.concatenate([], 28)
    assert paint(empty, (10, 12)).shape == (10, 12)
    assert paint(empty, (10, 12)).max() == 0


@pytest.mark.parametrize("shape,tile,halo", [((100, 100), 32, 8), ((7, 3000), 512, 64),
                                             ((1, 1), 16, 4), ((1000, 17), 100, 0)])
def test_tile_cores_partition_the_image(shape, tile, halo):
    cover = np.zeros(shape, np.int32)
    for t in plan_tiles(shape, tile, halo):
        y0, y1, x0, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        wy0, wy1, wx0, wx1 = t.window
        assert 0 <= wy0 <= y0 < y1 <= wy1 <= shape[0] and 0 <= wx0 <= x0 < x1 <= wx1 <= shape[1]
        assert wy0 == max(0, y0 - halo) and wx1 == min(shape[1], x1 + halo)
    assert (cover == 1).all()


def test_bad_tiling_arguments():
    with pytest.raises(ValueError, match="tile size"):
        plan_tiles((10, 10), 0, 2)
    with pytest.raises(ValueError, match="halo"):
        plan_tiles((10, 10), 8, -1)
    with pytest.raises(ValueError, match="empty"):
        plan_tiles((0, 10), 8, 2)
