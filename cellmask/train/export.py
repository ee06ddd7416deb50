"""Turning a training run into a shippable model: thresholds tuned on val, written with them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cellmask.model.segmenter import load_model
from cellmask.model.weights import save_weights
from cellmask.train.tune import tune_thresholds

log = logging.getLogger(__name__)


def export_model(weights: str | Path, data_dir: str | Path, split: str | Path,
                 out: str | Path, *, trained_diameter: float = 20.0) -> tuple[Path, dict]:
    """Tune the inference thresholds of ``weights`` on ``split`` and write ``out``.

    Returns the written path and the tuned thresholds (with the objective they reached).
    """
    model = load_model(weights, device="cpu")
    best, value = tune_thresholds(model, data_dir, split)
    config = model.config.replace(**best)
    meta = {k: v for k, v in model.meta.items() if k not in ("format", "config")}
    meta.update({"trained_diameter": str(trained_diameter), "tuned_on": str(split),
                 "tuned_thresholds": json.dumps(best), "tuning_objective": f"{value:.4f}"})
    path = save_weights(out, model.net.state_dict(), config, meta)
    log.info("exported %s with thresholds %s (ap50+ap75 on %s = %.4f)", path, best, split, value)
    return path, {**best, "objective": value}
