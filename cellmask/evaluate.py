"""Evaluating a model on an annotated split (``cellmask evaluate``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile

from cellmask.metrics import Evaluation
from cellmask.train.data import read_split

log = logging.getLogger(__name__)


def iter_split(data_dir: str | Path, split: str | Path,
               only: set[str] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, image, ground-truth labels)`` for every id of a split (or of those in
    ``only``), read lazily."""
    data_dir = Path(data_dir)
    for name in read_split(data_dir, split):
        if only is not None and name not in only:
            continue
        yield (name, tifffile.imread(data_dir / "images" / f"{name}.tif"),
               tifffile.imread(data_dir / "masks" / f"{name}.tif"))


def evaluate_split(model, data_dir: str | Path, split: str | Path, **segment_kwargs) -> Evaluation:
    """Segment every image of ``split`` with ``model.segment`` and pool the metrics."""
    ev = Evaluation()
    t0 = time.perf_counter()
    for name, image, gt in iter_split(data_dir, split):
        ev.add(gt, model.segment(image, **segment_kwargs))
    log.info("evaluated %d images of %s in %.1f s", ev.images, split, time.perf_counter() - t0)
    return ev


def format_table(ev: Evaluation) -> str:
    """The per-threshold table as fixed-width text."""
    table = ev.table()
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}")
