"""Measuring the activation ranges of the int8 path once and storing them with the weights."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from cellmask.evaluate import iter_split
from cellmask.model.quantize import calibrate
from cellmask.model.segmenter import load_model
from cellmask.model.weights import save_weights
from cellmask.normalize import InputError
from cellmask.train.data import read_split, refuse_test_split

log = logging.getLogger(__name__)


def calibrate_model(weights: str | Path, data_dir: str | Path, split: str | Path,
                    out: str | Path, *, images: int = 32, trunk_part: str = "trunk"
                    ) -> tuple[Path, dict]:
    """Segment ``images`` images spread evenly over ``split`` (a training split: never test)
    with the float32 network of ``weights``, record the activation ranges of its int8 parts and
    write ``out``: the same weights, thresholds and card, plus the int8 calibration
    (``trunk_part`` "backbone": the FPN is quantised with the trunk, see
    :data:`cellmask.model.quantize.TRUNK_PARTS`).
    Returns the written path and what was recorded (images, tensors, seconds)."""
    refuse_test_split(split, "calibrate", "a training split")
    names = read_split(Path(data_dir), split)
    if not names or images < 1:
        raise InputError(f"{split} has no images to calibrate on (or --images < 1)")
    step = max(1, len(names) // images)
    chosen = set(names[::step][:images])
    model = load_model(weights, device="cpu", precision="fp32")
    t0 = time.perf_counter()

    def run_images() -> None:
        with torch.inference_mode():
            for _, image, _ in iter_split(Path(data_dir), split, only=chosen):
                model.segment(image, workers=1)  # one network: the observing one

    tensors = calibrate(model.runner, run_images, trunk_part)
    meta = {k: v for k, v in model.meta.items() if k not in ("format", "config")}
    meta["int8_calibration"] = (f"{len(chosen)} images of {split}, every {step}th"
                                + ("; trunk and FPN in int8" if trunk_part == "backbone" else ""))
    path = save_weights(out, {**model.net.state_dict(), **tensors}, model.config, meta)
    record = {"images": len(chosen), "tensors": len(tensors),
              "seconds": round(time.perf_counter() - t0, 1)}
    log.info("calibrated %s on %s: %s", path, split, record)
    return path, record
