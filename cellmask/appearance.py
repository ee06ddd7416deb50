"""How an image looks to the network: modality, stain separation and intensity range, estimated
once per image (never per tile) from a strided sample of its pixels.

The network always sees nuclei as bright objects on a dark background, as fluorescence shows
them. Fluorescence images are mapped channel by channel from their 1st/99.8th percentiles to
[0, 1]. Brightfield colour images (H&E above all) are turned into optical density and separated
into stains with a per-image stain matrix (Macenko et al., ISBI 2009: the plane of the two
largest principal directions of the tissue's optical density, and the extreme angles in it);
the hematoxylin concentration, which stains nuclei, is the network's input, plus a fraction of
the second stain where the model asks for it (``ModelConfig.second_stain_weight``, 0 in the
shipped models: pale nuclei of single-dye stains carry part of their density along the second
direction, but on H&E the second stain is eosin, the cytoplasm). Grey brightfield is
inverted. A model may cap how bright a brightfield image looks as a whole
(``ModelConfig.brightfield_level``): where the 75th percentile of the normalised nuclear
signal in the slide's tissue region (:mod:`cellmask.tissue`, glass excluded) exceeds the
level the model's brightfield training images sit at (tissue packed with nuclei and stained
cytoplasm, as H&E slides are), the range is widened until it does not, so that such a slide
reaches the network at the brightness the model learned brightfield at.
Every number used is recorded in :class:`Appearance`, which the run stores in its output
metadata and its fingerprint.

Frames: a pixel sample is ``(N, C)``; an image or tile is channels-first ``(C, h, w)`` raw;
:meth:`Appearance.apply` returns float32 ``(3, h, w)`` for the network.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import numpy as np

from cellmask.normalize import InputError, apply_range

log = logging.getLogger(__name__)

MODALITIES = ("auto", "fluorescence", "brightfield")

#: Hematoxylin, eosin and DAB optical-density directions of Ruifrok & Johnston (2001), as in
#: ``skimage.color.rgb_from_hed``: the fallback stain matrix when too little tissue is seen.
RUIFROK_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))

#: Median brightness (as a fraction of the image's 0.1-99.9 percentile range) from which a
#: grey / an RGB image counts as brightfield; below it, as fluorescence (dark background).
#: Measured on the DSB2018 images (fluorescence at most 0.19, grey brightfield at least 0.86,
#: colour brightfield and H&E at least 0.50) and the MoNuSeg H&E tiles (0.31 to 0.74: tissue
#: packed with nuclei leaves little bright glass).
BRIGHT_BACKGROUND = {1: 0.5, 3: 0.25}
#: Optical density above which a pixel counts as tissue for the stain estimate.
TISSUE_OD = 0.15
#: The percentile of the normalised brightfield signal that ``brightfield_level`` caps, and the
#: largest factor by which the range may be widened for it.
LEVEL_PERCENTILE = 75.0
MAX_WIDENING = 1 / 0.3


@dataclass(frozen=True)
class Appearance:
    """The per-image mapping from raw pixels to the network's input, and how it was chosen.

    ``stains``: rows are the unit optical-density vectors (R, G, B) of hematoxylin, the second
    stain and their residual, for RGB brightfield; ``background``: the per-channel intensity of
    empty glass ``I0``. ``lo``/``hi``: the percentile range applied to the network channel(s)
    (per raw channel for fluorescence, of the hematoxylin or inverted grey channel for
    brightfield).
    """

    modality: str
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    stains: tuple[tuple[float, float, float], ...] | None = None
    background: tuple[float, ...] | None = None
    #: How the modality was chosen: "given" or "auto (median brightness 0.83 of range)".
    decided: str = "given"
    #: How the stain matrix was found: "macenko" or "ruifrok (too little tissue)".
    stain_method: str | None = None
    #: RGB brightfield: the network's signal is hematoxylin + this fraction of the second
    #: stain (0: hematoxylin alone).
    second_stain: float = 0.0

    def apply(self, chw: np.ndarray) -> np.ndarray:
        """Raw ``(C, h, w)`` pixels (any real dtype) -> float32 network input ``(3, h, w)``."""
        signal = chw if self.modality == "fluorescence" else self._signal(chw)
        return apply_range(signal, np.asarray(self.lo, np.float32),
                           np.asarray(self.hi, np.float32))

    def _signal(self, chw: np.ndarray) -> np.ndarray:
        """Brightfield ``(C, h, w)`` -> ``(1, h, w)`` nuclear signal before its range."""
        if chw.shape[0] == 1:  # grey brightfield: dark nuclei on a bright field, inverted
            return np.negative(chw, dtype=np.float32)
        return nuclear_signal(chw, np.asarray(self.stains, np.float32),
                              np.asarray(self.background, np.float32), self.second_stain)

    def to_dict(self) -> dict:
        """JSON-ready record of every number of the mapping (for metadata and fingerprints;
        ``second_stain`` only when it is used, so that records of hematoxylin-only runs made
        before it existed still match)."""
        out = asdict(self)
        if not out["second_stain"]:
            del out["second_stain"]
        return {k: (list(map(list, v)) if k == "stains" and v is not None else
                    list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Appearance":
        v = dict(values)
        v["lo"], v["hi"] = tuple(v["lo"]), tuple(v["hi"])
        if v.get("stains") is not None:
            v["stains"] = tuple(tuple(float(x) for x in row) for row in v["stains"])
        if v.get("background") is not None:
            v["background"] = tuple(v["background"])
        return cls(**v)


def optical_density(chw: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Beer-Lambert optical density ``-log10(I / I0)`` of RGB ``(3, h, w)``, float32 >= 0.

    8-bit pixels are looked up in a table of the 256 values per channel, made by the same
    arithmetic, so the numbers are those of the same pixels as float32 (3x faster on the
    survey's sample of a slide)."""
    if chw.dtype == np.uint8:
        table = _od_levels(background, len(chw))
        return np.stack([np.take(table[c], chw[c]) for c in range(len(chw))])
    return _od_float(chw, background)


def _od_float(chw: np.ndarray, background: np.ndarray) -> np.ndarray:
    i0 = np.maximum(np.asarray(background, np.float32), 1e-6)[:, None, None]
    ratio = (np.maximum(chw.astype(np.float32, copy=False), 0) + 1.0) / (i0 + 1.0)
    return np.maximum(-np.log10(np.minimum(ratio, 1.0)), 0.0)


def _od_levels(background: np.ndarray, channels: int = 3) -> np.ndarray:
    """``(channels, 256)`` float32: the optical density of every 8-bit level per channel."""
    levels = np.broadcast_to(np.arange(256, dtype=np.float32)[None, :, None], (channels, 256, 1))
    return _od_float(levels, background)[:, :, 0]


def concentrations(chw: np.ndarray, stains: np.ndarray, background: np.ndarray,
                   n: int = 3) -> np.ndarray:
    """The first ``n`` stain concentrations ``(n, h, w)`` float32 of RGB ``(3, h, w)`` under
    ``stains`` (rows: hematoxylin, second stain, residual). Pure black pixels are no data in
    brightfield (scanner padding, chunks read around as zeros), not the densest stain: they
    read as glass (0)."""
    od = optical_density(chw, background)
    unmix = _unmixing(stains)
    conc = np.stack([_weighted_sum(od, unmix[:, i]) for i in range(n)])
    _clear_black(conc, chw)
    return conc


def nuclear_signal(chw: np.ndarray, stains: np.ndarray, background: np.ndarray,
                   second: float = 0.0) -> np.ndarray:
    """``(1, h, w)`` float32: hematoxylin + ``second`` x the second stain's concentration of
    RGB ``(3, h, w)`` under ``stains``, i.e. ``sum_c weights[c] * OD_c``.

    8-bit pixels are looked up: a channel has 256 values, so its weighted optical density is
    a table of 256 numbers made by :func:`optical_density` itself; three lookups and two sums
    per pixel replace a logarithm per channel (4x faster on a 1,152 px H&E tile). Other
    dtypes are computed with the same operations in the same order, so an 8-bit image and
    the same image as float32 give identical numbers.
    """
    unmix = _unmixing(stains)
    weights = unmix[:, 0] + np.float32(second) * unmix[:, 1] if second else unmix[:, 0]
    if chw.dtype == np.uint8:
        table = weights[:, None] * _od_levels(background)  # (3, 256)
        out = np.take(table[0], chw[0])
        out += np.take(table[1], chw[1])
        out += np.take(table[2], chw[2])
    else:
        out = _weighted_sum(optical_density(chw, background), weights)
    _clear_black(out, chw)
    return out[None]


def _unmixing(stains: np.ndarray) -> np.ndarray:
    """``(3, 3)`` float32 inverse of the stain matrix: ``conc = od @ unmix``."""
    return np.linalg.inv(stains.astype(np.float64)).astype(np.float32)


def _weighted_sum(od: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``w0 * od[0] + w1 * od[1] + w2 * od[2]`` ``(h, w)`` float32, each product rounded,
    summed left to right (the order the 8-bit tables give)."""
    out = weights[0] * od[0]
    out += weights[1] * od[1]
    out += weights[2] * od[2]
    return out


def _clear_black(values: np.ndarray, chw: np.ndarray) -> None:
    """Set ``values[..., y, x]`` to 0 where every channel of ``chw`` ``(3, h, w)`` is 0 (the
    first channel is tested first: black pixels are rare, and testing all three channels of a
    tile costs more than the stain separation itself)."""
    ys, xs = np.nonzero(chw[0] == 0)
    if len(ys):
        black = (chw[1][ys, xs] == 0) & (chw[2][ys, xs] == 0)
        values[..., ys[black], xs[black]] = 0.0


def macenko_stains(od: np.ndarray, alpha: float = 1.0) -> np.ndarray | None:
    """Per-image stain matrix ``(3, 3)`` (rows: hematoxylin, second stain, residual) from the
    optical densities ``(N, 3)`` of tissue pixels, or None when they do not define two stains.

    Written here rather than taken from a stain library: the method is twenty lines of numpy,
    and the libraries that carry it (staintools, torchstain) would add a dependency for them.
    """
    if len(od) < 500:
        return None
    _, vectors = np.linalg.eigh(np.cov(od.T.astype(np.float64)))
    plane = vectors[:, 1:3]  # the two largest principal directions
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    if plane[:, 1].sum() < 0:
        plane[:, 1] *= -1
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, (alpha, 100 - alpha))
    if hi - lo < 0.05:  # one stain only: nothing to separate
        return None
    a = plane @ np.array([np.cos(lo), np.sin(lo)])
    b = plane @ np.array([np.cos(hi), np.sin(hi)])
    a, b = np.abs(a) / np.linalg.norm(a), np.abs(b) / np.linalg.norm(b)
    residual = np.cross(a, b)
    residual = np.abs(residual) / max(np.linalg.norm(residual), 1e-6)
    stains = np.stack([a, b, residual])
    if abs(np.linalg.det(stains)) < 1e-3:
        return None
    # The nuclear stain is the one whose strongest pixels are the darkest: nuclei are the
    # densest objects of a brightfield slide. On H&E this is hematoxylin (it agrees with
    # "hematoxylin absorbs red most" on every MoNuSeg training tile); on single-stain slides
    # (Giemsa, crystal violet), where both directions are shades of one dye, it picks the one
    # that shows the nuclei (measured on the DSB2018 colour training images: mean nucleus
    # contrast 0.32 against 0.24 for the red rule).
    conc = od @ np.linalg.inv(stains)
    total = od.sum(axis=1)
    darkness = [total[conc[:, i] >= np.percentile(conc[:, i], 98)].mean() for i in (0, 1)]
    if darkness[1] > darkness[0]:
        stains = stains[[1, 0, 2]]
    return stains


def decide_modality(sample: np.ndarray) -> tuple[str, float]:
    """Modality of an image from its pixel sample ``(N, C)``: brightfield if its typical pixel
    is bright (an empty or lightly stained field), else fluorescence; and that brightness."""
    lum = sample.astype(np.float32, copy=False).mean(axis=1)
    lo, mid, hi = np.percentile(lum, (0.1, 50, 99.9))
    brightness = float((mid - lo) / max(hi - lo, 1e-6))
    bright = brightness >= BRIGHT_BACKGROUND.get(sample.shape[1], 0.5)
    return ("brightfield" if bright else "fluorescence"), brightness


def estimate(sample: np.ndarray, modality: str = "auto",
             percentiles: tuple[float, float] = (1.0, 99.8),
             second_stain: float = 0.0) -> Appearance:
    """The :class:`Appearance` of an image from a strided pixel sample ``(N, C)``, C in {1, 3}.

    ``modality``: "auto" decides from the sample (and logs the decision), or "fluorescence" /
    "brightfield". ``second_stain``: the fraction of the second stain added to hematoxylin in
    RGB brightfield (the model's ``second_stain_weight``). The sample must be finite (the
    model's ``brightfield_level`` is applied afterwards, on the tissue:
    :func:`cellmask.survey.cap_brightness`).
    """
    if modality not in MODALITIES:
        raise InputError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    raw = np.asarray(sample).reshape(len(sample), -1)  # 8-bit stays 8-bit: table lookups
    sample = raw.astype(np.float32, copy=False)
    decided = "given"
    if modality == "auto":
        modality, brightness = decide_modality(sample)
        decided = f"auto (median brightness {brightness:.2f} of range)"
        log.info("modality: %s, decided from the image (median brightness %.2f of its range; "
                 "pass modality= to choose)", modality, brightness)
    if modality == "fluorescence":
        lo, hi = np.percentile(sample, percentiles, axis=0).astype(np.float32)
        return Appearance("fluorescence", _floats(lo), _floats(hi), decided=decided)
    if sample.shape[1] == 1:
        lo, hi = np.percentile(-sample[:, 0], percentiles).astype(np.float32)
        return Appearance("brightfield", (float(lo),), (float(hi),), decided=decided,
                          stain_method="inverted grey")
    if sample.shape[1] != 3:
        raise InputError(f"brightfield images need 1 (grey) or 3 (RGB) channels, not "
                         f"{sample.shape[1]}")
    background = np.maximum(np.percentile(sample, 99.9, axis=0), 1.0).astype(np.float32)
    pixels = raw.T[:, :, None]  # (3, N, 1); both functions below cast other dtypes to float32
    od = optical_density(pixels, background)[:, :, 0].T  # (N, 3)
    stains = macenko_stains(od[od.sum(axis=1) > TISSUE_OD])
    method = "macenko"
    if stains is None:
        stains, method = np.asarray(RUIFROK_HED, np.float64), "ruifrok (too little tissue)"
        stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    h = nuclear_signal(pixels, stains, background, second_stain)[0, :, 0]
    lo, hi = np.percentile(h, percentiles).astype(np.float32)
    log.info("brightfield stains (%s): hematoxylin %s, second %s; background %s", method,
             np.round(stains[0], 3).tolist(), np.round(stains[1], 3).tolist(),
             np.round(background, 1).tolist())
    return Appearance("brightfield", (float(lo),), (float(hi),),
                      tuple(tuple(float(x) for x in row) for row in stains),
                      _floats(background), decided, method, float(second_stain))


def input_level(appearance: Appearance, pixels: np.ndarray) -> float:
    """The :data:`LEVEL_PERCENTILE` of the network input that ``appearance`` makes of raw
    ``pixels`` ``(N, C)``: what ``brightfield_level`` caps (:func:`cellmask.survey.cap_brightness`
    takes the pixels of the tissue)."""
    chw = np.asarray(pixels).reshape(len(pixels), -1).T[:, :, None]
    return float(np.percentile(appearance.apply(chw)[0], LEVEL_PERCENTILE))


def widened_to(appearance: Appearance, seen: float, level: float) -> Appearance:
    """``appearance`` with the upper end of its range raised so that an input level ``seen``
    (:func:`input_level`) becomes ``level``, by a factor of at most :data:`MAX_WIDENING` on
    the range; unchanged where ``seen`` is at most ``level``."""
    if level <= 0 or seen <= level:
        return appearance
    widen = min(seen / level, MAX_WIDENING)
    lo, hi = appearance.lo[0], appearance.hi[0]
    new_hi = float(np.float32(lo + max(hi - lo, 1e-6) * widen))
    log.info("brightfield tissue at %.3f of its range (75th percentile), above the model's "
             "%.3f: range widened %.2fx", seen, level, widen)
    return replace(appearance, hi=(new_hi,))


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in np.atleast_1d(values))
