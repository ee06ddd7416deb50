"""Looking at the whole image once, before any tile: its appearance (modality, stains,
intensity range) from a regular strided sample, a digest of that sample (the input's identity
in the run's fingerprint), and for brightfield slides the tissue on the same sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cellmask.appearance import Appearance, estimate
from cellmask.engine import chunk_name, chunks_in
from cellmask.errors import InputError
from cellmask.normalize import sample_step
from cellmask.sources import ImageSource, sync_scheduler, threaded_scheduler


@dataclass(frozen=True)
class Survey:
    """What one look at the whole image gives: ``appearance``; ``view``, the sample as a
    low-resolution ``(h, w, C)`` image (every ``step``-th pixel; None when corrupt chunks were
    read around); ``digest``, SHA-256 of the sample's pixels."""

    appearance: Appearance
    view: np.ndarray | None
    step: int
    digest: str


def survey_image(src: ImageSource, percentiles, modality: str = "auto",
                 max_samples: int = 4_000_000, skip_corrupt: bool = False,
                 second_stain: float = 0.0) -> Survey:
    """Modality, stains and intensity range of the whole image, from a regular strided sample
    (the same sample ``Model.segment`` takes of an in-memory image, so both map alike), with
    the sample itself (a brightfield slide's tissue is found on it, without reading the slide
    again) and its digest. ``percentiles`` and ``second_stain``: the model's
    ``norm_percentiles`` and ``second_stain_weight``.
    """
    h, w = src.shape
    c = src.array.shape[2]
    step = sample_step((h, w), max_samples)
    view = None
    try:
        # a local threaded read (cellmask.sources.sync_scheduler says why it is a function)
        view = np.asarray(src.array[::step, ::step].compute(scheduler=threaded_scheduler))
        sample = view.reshape(-1, c)
    except Exception:  # a corrupt chunk: sample chunk by chunk (named error, or skipped)
        parts = []
        for i, j, box in chunks_in(src, (0, h, 0, w)):
            oy, ox = (-box[0]) % step, (-box[2]) % step
            try:
                block = src.array[box[0] + oy:box[1]:step,
                                  box[2] + ox:box[3]:step].compute(scheduler=sync_scheduler)
            except Exception:  # this chunk is broken
                if not skip_corrupt:
                    raise InputError(f"cannot read {src.path or 'the image'}: "
                                     f"{chunk_name(src, i, j, box)} is corrupt; repair it, or "
                                     "pass --skip-corrupt to segment around it") from None
                continue
            parts.append(np.asarray(block).reshape(-1, c))
        sample = np.concatenate(parts) if parts else np.zeros((1, c))
    digest = hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest()
    # integers are finite; 8-bit samples stay 8-bit (the appearance then uses table lookups)
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        raise InputError("the image has NaN or infinite pixels: replace them (e.g. with 0) "
                         "before segmenting")
    return Survey(estimate(sample, modality, percentiles, second_stain), view, step, digest)


def find_tissue(view: np.ndarray | None, step: int, appearance: Appearance):
    """The :class:`~cellmask.tissue.TissueMask` of an RGB slide from the low-resolution view
    the appearance was estimated on (coarsened to :data:`~cellmask.tissue.VIEW_SIDE`); None
    without a view (every tile is then segmented)."""
    from cellmask.tissue import tissue_mask, view_step

    if view is None:
        return None
    k = view_step(view.shape[:2])
    return tissue_mask(view[::k, ::k], step * k, appearance)


def corrupt_boxes(names: list[str]) -> list[tuple[int, int, int, int]]:
    """Level-0 ``(y0, y1, x0, x1)`` of corrupt chunks from their names (:func:`~cellmask.engine.chunk_name`)."""
    import re

    out = []
    for name in names:
        m = re.search(r"pixels y (\d+):(\d+), x (\d+):(\d+)", name)
        if m:
            out.append(tuple(int(v) for v in m.groups()))
    return out
