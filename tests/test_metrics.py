import numpy as np
import pytest

from cellmask.metrics import Evaluation, iou_matrix, matched_ious


def squares(shape, boxes):
    out = np.zeros(shape, np.int32)
    for i, (y0, y1, x0, x1) in enumerate(boxes, 1):
        out[y0:y1, x0:x1] = i
    return out


def test_perfect_match_is_one_at_every_threshold():
    gt = squares((50, 50), [(0, 10, 0, 10), (20, 30, 20, 35)])
    ev = Evaluation()
    ev.add(gt, gt)
    table = ev.table()
    assert (table["ap"] == 1.0).all() and (table["pq"] == 1.0).all()
    assert (table["tp"] == 2).all() and (table["fp"] == 0).all()


def test_hand_computed_case():
    # gt: A (10x10=100 px), B (10x10). pred: A' shifted by 2 cols -> IoU 80/120 = 0.667,
    # B' identical to B, C' a false positive.
    gt = squares((40, 60), [(0, 10, 0, 10), (20, 30, 20, 30)])
    pred = squares((40, 60), [(0, 10, 2, 12), (20, 30, 20, 30), (0, 5, 50, 55)])
    iou = iou_matrix(gt, pred)
    assert iou.shape == (2, 3)
    assert iou[0, 0] == pytest.approx(80 / 120)
    assert iou[1, 1] == 1.0 and iou[0, 2] == 0
    ev = Evaluation(thresholds=(0.5, 0.7))
    ev.add(gt, pred)
    r50, r70 = ev.table().to_dict("records")
    assert (r50["tp"], r50["fp"], r50["fn"]) == (2, 1, 0)
    assert r50["ap"] == pytest.approx(2 / 3)
    assert r50["precision"] == pytest.approx(2 / 3) and r50["recall"] == 1.0
    assert r50["f1"] == pytest.approx(4 / 5)
    assert r50["mean_matched_iou"] == pytest.approx((80 / 120 + 1) / 2)
    assert r50["pq"] == pytest.approx((80 / 120 + 1) / (2 + 0.5))
    assert (r70["tp"], r70["fp"], r70["fn"]) == (1, 2, 1)
    assert r70["ap"] == pytest.approx(1 / 4)


def test_pooling_sums_counts_not_ratios():
    a = squares((20, 20), [(0, 5, 0, 5)])
    empty = np.zeros((20, 20), np.int32)
    ev = Evaluation(thresholds=(0.5,))
    ev.add(a, a)  # 1 TP
    ev.add(squares((20, 20), [(0, 5, 0, 5), (10, 15, 10, 15), (0, 5, 10, 15)]), empty)  # 3 FN
    assert ev.table()["ap"][0] == pytest.approx(1 / 4)


def test_symmetric_and_permutation_invariant():
    rng = np.random.default_rng(0)
    gt = squares((64, 64), [(0, 8, 0, 8), (10, 20, 10, 22), (30, 44, 30, 40), (50, 60, 0, 9)])
    pred = np.roll(gt, 2, axis=1)
    perm = np.concatenate([[0], rng.permutation(np.arange(1, 5))])
    ev1, ev2, ev3 = Evaluation(), Evaluation(), Evaluation()
    ev1.add(gt, pred)
    ev2.add(pred, gt)
    ev3.add(perm[gt], pred * 7)  # relabelled ids, non-consecutive
    t1, t2, t3 = ev1.table(), ev2.table(), ev3.table()
    assert np.allclose(t1["ap"], t2["ap"]) and np.allclose(t1["ap"], t3["ap"])
    assert np.allclose(t1["pq"], t3["pq"])


def test_hungarian_below_half():
    # one gt overlapped by two preds at IoU 0.4 and 0.3: only one may match at 0.25
    iou = np.array([[0.4, 0.3]])
    assert list(matched_ious(iou, 0.25)) == [0.4]


def test_empty_images():
    z = np.zeros((8, 8), np.int32)
    ev = Evaluation()
    ev.add(z, z)
    assert ev.table()["ap"][0] == 1.0  # nothing to find, nothing found
    with pytest.raises(ValueError, match="differ in shape"):
        iou_matrix(z, np.zeros((8, 9), np.int32))
