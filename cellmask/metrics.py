"""Instance segmentation metrics: one-to-one matching at IoU thresholds, pooled over a dataset.

Definitions (those of StarDist and Cellpose): a ground-truth object and a predicted object match
at threshold ``t`` when they are paired by a one-to-one assignment maximising IoU and their IoU
is ``>= t``. Per threshold::

    precision = TP / (TP + FP)        recall = TP / (TP + FN)
    F1        = 2TP / (2TP + FP + FN)  AP     = TP / (TP + FP + FN)
    mean matched IoU = sum(IoU of matches) / TP
    PQ        = sum(IoU of matches) / (TP + FP/2 + FN/2)

Pooling sums TP, FP, FN and matched IoU over images before dividing, so large crowded images
weigh by their objects, not by their count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from cellmask.errors import InputError

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Consecutive ids 1..N (0 stays background) and N."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids[0] == 0:
        return inverse, len(ids) - 1
    return inverse + 1, len(ids)


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU ``(N_gt, N_pred)`` between the objects of two label images of equal shape."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise InputError(f"label images differ in shape: {gt.shape} vs {pred.shape}")
    g, ng = _relabel(gt)
    p, npred = _relabel(pred)
    inter = np.bincount((g.ravel().astype(np.int64) * (npred + 1) + p.ravel()),
                        minlength=(ng + 1) * (npred + 1)).reshape(ng + 1, npred + 1)
    area_g = inter.sum(axis=1)[1:]
    area_p = inter.sum(axis=0)[1:]
    inter = inter[1:, 1:].astype(np.float64)
    union = area_g[:, None] + area_p[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def matched_ious(iou: np.ndarray, threshold: float) -> np.ndarray:
    """IoUs of the one-to-one matches with IoU ``>= threshold``.

    At thresholds of 0.5 and above every object has at most one partner over the threshold, so
    the matching is the set of such pairs; below 0.5 an optimal assignment (Hungarian) is used.
    """
    if iou.size == 0:
        return np.zeros(0)
    if threshold >= 0.5:
        return iou[iou >= threshold]
    rows, cols = linear_sum_assignment(-iou)
    vals = iou[rows, cols]
    return vals[vals >= threshold]


@dataclass
class Counts:
    """Pooled counts at one IoU threshold."""

    threshold: float
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def add(self, n_gt: int, n_pred: int, ious: np.ndarray) -> None:
        tp = len(ious)
        self.tp += tp
        self.fp += n_pred - tp
        self.fn += n_gt - tp
        self.iou_sum += float(ious.sum())

    def row(self) -> dict[str, float]:
        tp, fp, fn = self.tp, self.fp, self.fn

        def div(a: float, b: float) -> float:
            return a / b if b else (1.0 if a == 0 else 0.0)

        return {
            "threshold": self.threshold, "tp": tp, "fp": fp, "fn": fn,
            "precision": div(tp, tp + fp), "recall": div(tp, tp + fn),
            "f1": div(2 * tp, 2 * tp + fp + fn), "ap": div(tp, tp + fp + fn),
            "mean_matched_iou": self.iou_sum / tp if tp else 0.0,
            "pq": div(self.iou_sum, tp + fp / 2 + fn / 2),
        }


@dataclass
class Evaluation:
    """Accumulates image pairs; ``table()`` gives one row per threshold."""

    thresholds: tuple[float, ...] = THRESHOLDS
    counts: list[Counts] = field(default_factory=list)
    images: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [Counts(t) for t in self.thresholds]

    def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
        iou = iou_matrix(gt, pred)
        for c in self.counts:
            c.add(iou.shape[0], iou.shape[1], matched_ious(iou, c.threshold))
        self.images += 1

    def table(self):
        import pandas as pd

        return pd.DataFrame([c.row() for c in self.counts])

    def summary(self) -> dict[str, float]:
        rows = {c.threshold: c.row() for c in self.counts}
        out = {f"ap@{t:.2f}": rows[t]["ap"] for t in self.thresholds}
        out["mean_ap"] = float(np.mean([rows[t]["ap"] for t in self.thresholds]))
        if 0.5 in rows:
            out["f1@0.50"] = rows[0.5]["f1"]
        return out


def evaluate(pairs, thresholds: tuple[float, ...] = THRESHOLDS) -> Evaluation:
    """Pooled evaluation of an iterable of ``(gt, pred)`` label images."""
    ev = Evaluation(thresholds)
    for gt, pred in pairs:
        ev.add(gt, pred)
    return ev
