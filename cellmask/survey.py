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
from cellmask.tissue import TissueMask, view_step


@dataclass(frozen=True)
class Survey:
    """What one look at the whole image gives: ``appearance``; ``view``, the sample as a
    low-resolution ``(h, w, C)`` image (every ``step``-th pixel; None when corrupt chunks were
    read around); ``digest``, SHA-256 of the sample's pixels; ``tissue``, the tissue mask of an
    RGB brightfield view where the brightness cap read its level in it (None otherwise; it
    depends on the glass brightness only, which the cap leaves as it is)."""

    appearance: Appearance
    view: np.ndarray | None
    step: int
    digest: str
    tissue: TissueMask | None = None


def survey_image(src: ImageSource, percentiles, modality: str = "auto",
                 max_samples: int = 4_000_000, skip_corrupt: bool = False,
                 second_stain: float = 0.0, level: float = 0.0) -> Survey:
    """Modality, stains and intensity range of the whole image, from a regular strided sample
    (the same sample ``Model.segment`` takes of an in-memory image, so both map alike), with
    the sample itself (a brightfield slide's tissue is found on it, without reading the slide
    again) and its digest. ``percentiles``, ``second_stain`` and ``level``: the model's
    ``norm_percentiles``, ``second_stain_weight`` and ``brightfield_level``.
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
    look, tissue = cap_brightness(estimate(sample, modality, percentiles, second_stain), view,
                                  step, level)
    return Survey(look, view, step, digest, tissue)


def cap_brightness(look: Appearance, view: np.ndarray | None, step: int,
                   level: float) -> tuple[Appearance, TissueMask | None]:
    """``look`` with the model's ``brightfield_level`` applied
    (:func:`cellmask.appearance.widened_to`) to the level of its tissue
    (:func:`tissue_level`), and the RGB tissue mask the level was read in (None where none
    was). Fluorescence, level 0 or no view: ``look`` as it is."""
    from cellmask.appearance import widened_to

    if level <= 0 or look.modality != "brightfield" or view is None:
        return look, None
    tissue = find_tissue(view, step, look) if view.shape[-1] == 3 else None
    return widened_to(look, tissue_level(look, view, step, tissue), level), tissue


def tissue_level(look: Appearance, view: np.ndarray, step: int,
                 tissue: TissueMask | None = None) -> float:
    """The input level (:func:`cellmask.appearance.input_level`) of the tissue region of a
    brightfield image's strided view ``(h, w, C)`` (every ``step``-th level-0 pixel): RGB,
    inside the slide's tissue mask (``tissue``, found here when not given; glass excluded);
    grey, every pixel."""
    from cellmask.appearance import input_level

    pixels = view.reshape(-1, view.shape[-1])
    if view.shape[-1] == 3:
        tissue = tissue if tissue is not None else find_tissue(view, step, look)
        k = view_step(view.shape[:2])
        inside = view[::k, ::k][tissue.mask]
        if len(inside) >= MIN_LEVEL_PIXELS:
            pixels = inside
    return input_level(look, pixels)


#: Fewer tissue pixels than this in the view: the brightness level is read on every pixel.
MIN_LEVEL_PIXELS = 1000


def find_tissue(view: np.ndarray | None, step: int, appearance: Appearance):
    """The :class:`~cellmask.tissue.TissueMask` of an RGB slide from the low-resolution view
    the appearance was estimated on (coarsened to :data:`~cellmask.tissue.VIEW_SIDE`); None
    without a view (every tile is then segmented)."""
    from cellmask.tissue import tissue_mask

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
