"""Test-time views: each view's detections come back to the image's frame exactly, and the
fusion keeps what the views agree on."""

import numpy as np
import pytest

from cellmask import InputError
from cellmask.metrics import Evaluation
from cellmask.model import flips
from cellmask.model.paint import Instances, paint
from cellmask.samples import load_sample
from fixtures import load_fixture


def _instances(rng, shape, n, m=8):
    h, w = shape
    y0 = rng.uniform(0, h - 12, n)
    x0 = rng.uniform(0, w - 12, n)
    boxes = np.stack([x0, y0, x0 + rng.uniform(4, 12, n), y0 + rng.uniform(4, 12, n)], 1)
    return Instances(boxes.astype(np.float32), rng.uniform(0.5, 1, n).astype(np.float32),
                     rng.uniform(0, 1, (n, m, m)).astype(np.float32))


def _back(labels, view):
    """A label image seen in ``view``, in the image's frame."""
    out = labels.T if view[2] else labels
    out = out[::-1] if view[0] else out
    return out[:, ::-1] if view[1] else out


def _paint(inst, shape):
    return paint(inst, shape, min_visible_fraction=0.0, min_area=0)


@pytest.mark.parametrize("view", flips.VIEWS)
def test_detections_of_a_view_come_back_to_the_image_frame_exactly(view):
    shape = (40, 56)
    seen_shape = shape[::-1] if view[2] else shape
    seen = _instances(np.random.default_rng(sum(view) + 4 * view[2]), seen_shape, 12)
    expected = _back(_paint(seen, seen_shape), view)
    assert np.array_equal(_paint(flips.unview(seen, view, shape), shape), expected)
    assert expected.max() > 5


@pytest.mark.parametrize("view", flips.VIEWS)
def test_a_core_is_the_same_pixels_in_every_view(view):
    image = np.arange(3 * 30 * 44, dtype=np.float32).reshape(3, 30, 44)
    core = (5, 21, 7, 40)
    y0, y1, x0, x1 = (int(v) for v in flips.view_core(core, view, (30, 44), margin=0))
    assert np.array_equal(flips.view_image(image, view)[:, y0:y1, x0:x1],
                          flips.view_image(image[:, 5:21, 7:40], view))
    assert flips.view_core(None, view, (30, 44), 16) is None


def test_views_that_agree_fuse_into_the_same_detections():
    inst = _instances(np.random.default_rng(0), (64, 64), 20)
    fused = flips.fuse([inst] * 8, 0.55, 0.5)
    order = np.argsort(-inst.scores, kind="stable")
    assert np.allclose(fused.boxes, inst.boxes[order], atol=1e-4)
    assert np.allclose(fused.scores, inst.scores[order], atol=1e-6)
    assert np.allclose(fused.masks, inst.masks[order], atol=1e-5)


def test_an_object_most_views_miss_is_scored_down_and_dropped():
    obj = Instances(np.array([[10, 10, 20, 20]], np.float32), np.array([0.9], np.float32),
                    np.ones((1, 8, 8), np.float32))
    empty = obj.select(np.zeros(1, bool))
    once = flips.fuse([obj] + [empty] * 7, 0.55, 0.5)
    assert len(once) == 0
    five = flips.fuse([obj] * 5 + [empty] * 3, 0.55, 0.5)
    assert len(five) == 1 and five.scores[0] == pytest.approx(0.9 * 5 / 8)


def test_two_objects_of_one_view_never_fuse():
    boxes = np.array([[10, 10, 20, 20], [11, 11, 21, 21]], np.float32)  # IoU 0.68
    one = Instances(boxes, np.array([0.9, 0.8], np.float32), np.ones((2, 8, 8), np.float32))
    fused = flips.fuse([one, one], 0.55, 0.5)
    assert len(fused) == 2
    assert np.allclose(fused.boxes, boxes)


def test_fused_outline_is_the_mean_of_the_members_on_the_fused_box():
    left = Instances(np.array([[0, 0, 8, 8]], np.float32), np.array([0.8], np.float32),
                     np.ones((1, 8, 8), np.float32))
    right = Instances(np.array([[2, 0, 10, 8]], np.float32), np.array([0.8], np.float32),
                      np.ones((1, 8, 8), np.float32))
    fused = flips.fuse([left, right], 0.55, 0.5)
    assert np.allclose(fused.boxes, [[1, 0, 9, 8]])
    # on the fused box, each member covers all but one column: the mean is 1 inside, 0.5 on
    # the two edge columns
    assert np.allclose(fused.masks[0][:, 1:-1], 1) and np.allclose(fused.masks[0][:, [0, -1]],
                                                                    0.5, atol=0.01)
    same = flips.resample_masks(left.masks, left.boxes, left.boxes)
    assert np.allclose(same.numpy(), left.masks)


def test_eight_views_of_degenerate_images(shipped_model):
    model = shipped_model.with_config(test_views=8)
    for shape in ((1, 1), (1, 40), (37, 1)):
        labels = model.segment(np.zeros(shape, np.uint8))
        assert labels.shape == shape and labels.max() == 0
    image, _ = load_sample()
    thin = model.segment(image[:37, :300])
    assert thin.shape == (37, 300) and thin.max() > 5


def test_view_counts_other_than_1_2_4_8_are_refused(shipped_model):
    assert len(flips.views(8)) == 8 and flips.views(1) == ((False, False, False),)
    with pytest.raises(InputError, match="1, 2, 4 or 8"):
        shipped_model.with_config(test_views=3)


def _ap(gt, pred, t):
    ev = Evaluation(thresholds=(t,))
    ev.add(gt, pred)
    return ev.table()["ap"][0]


def test_eight_views_outline_real_nuclei_better_and_mirror_with_the_image(shipped_model):
    image, truth = load_sample()
    one = shipped_model.segment(image)
    model = shipped_model.with_config(test_views=8)
    eight = model.segment(image)
    assert _ap(truth, eight, 0.5) >= _ap(truth, one, 0.5) - 0.005
    assert _ap(truth, eight, 0.75) >= _ap(truth, one, 0.75)  # 0.793 against 0.785
    mirrored = model.segment(np.ascontiguousarray(image[:, ::-1]))[:, ::-1]
    assert _ap(eight, mirrored, 0.75) >= 0.97


def test_eight_views_tiled_match_the_whole_image(shipped_model):
    image, _ = load_fixture("fluo_e23e11414ee6")
    model = shipped_model.with_config(test_views=8)
    whole = model.segment(image, tile=2048)
    tiled = model.segment(image, tile=256, halo=64)
    assert abs(int(whole.max()) - int(tiled.max())) <= 2
    assert _ap(whole, tiled, 0.5) >= 0.97
