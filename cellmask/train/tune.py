"""Choosing inference thresholds on a validation split (never on a test split).

The network runs once per image with permissive thresholds, through the tile engine of every
run (:func:`cellmask.engine.image_instances`: the same appearance, tiles and scale); each
candidate setting then only re-filters, re-runs NMS and re-paints those detections, so a search
costs seconds, not a re-inference per setting. The search is coordinate ascent over a small
grid per threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import nms

from cellmask.engine import image_instances
from cellmask.evaluate import iter_split
from cellmask.metrics import Evaluation
from cellmask.model.paint import Instances, paint
from cellmask.train.data import refuse_test_split

log = logging.getLogger(__name__)

GRID = {
    "score_thresh": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    "nms_thresh": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    "mask_thresh": (0.3, 0.4, 0.5, 0.6),
    "min_visible_fraction": (0.2, 0.35, 0.5, 0.65, 0.8, 0.9),
}


@dataclass(frozen=True)
class _Raw:
    gt: np.ndarray
    inst: Instances


def objective(ev: Evaluation) -> float:
    """What the search maximises: AP at IoU 0.5 plus AP at IoU 0.75."""
    s = ev.summary()
    return s["ap@0.50"] + s["ap@0.75"]


def _apply(raw: _Raw, p: dict[str, float], min_area: int) -> np.ndarray:
    inst = raw.inst.select(raw.inst.scores >= p["score_thresh"])
    if len(inst):
        keep = nms(torch.from_numpy(inst.boxes), torch.from_numpy(inst.scores), p["nms_thresh"])
        inst = inst.select(keep.numpy())
    return paint(inst, raw.gt.shape, mask_thresh=p["mask_thresh"],
                 min_visible_fraction=p["min_visible_fraction"], min_area=min_area)


def tune_thresholds(model, data_dir: str | Path, split: str | Path,
                    rounds: int = 2) -> tuple[dict[str, float], float]:
    """Best thresholds on ``split`` and the objective they reach."""
    refuse_test_split(split, "tune thresholds", "a validation split")
    permissive = model.with_config(score_thresh=min(GRID["score_thresh"]),
                                   nms_thresh=max(GRID["nms_thresh"]))
    # the detections of a run of each image (the tile engine), painted again per setting
    raws = [_Raw(gt, image_instances(permissive, image))
            for _, image, gt in iter_split(data_dir, split)]
    c = model.config
    best = {k: getattr(c, k) for k in GRID}

    def score(params: dict[str, float]) -> float:
        ev = Evaluation()
        for raw in raws:
            ev.add(raw.gt, _apply(raw, params, c.min_area))
        return objective(ev)

    best_value = score(best)
    for _ in range(rounds):
        for key, values in GRID.items():
            for v in values:
                trial = {**best, key: v}
                value = score(trial)
                if value > best_value + 1e-9:
                    best, best_value = trial, value
        log.info("tuning round: %s -> %.4f", best, best_value)
    return best, best_value
