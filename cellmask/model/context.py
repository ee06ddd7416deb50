"""How much context a tile needs around its core: the halo.

Two things set it, both in network pixels and both divided by the run's ``scale`` to become
level-0 pixels:

- **the network's context**: the radius around a position of the trunk's finest (stride-4)
  features within which lies :data:`CONTEXT_SHARE` of the gradient of that position with
  respect to the input: its *effective* receptive field (Luo et al., NeurIPS 2016), much
  smaller than the theoretical one (53 px for the shipped model, against a theoretical 119). Pixels
  further away barely change what the network sees at a seam. Measured once per model, on a
  uniform mid-grey input, or read from the weights header (``context_px``).
- **the objects it finds**: :data:`OBJECT_DIAMETERS` times the model's training diameter, so
  that objects up to that size are never cut at a seam (a run warns when it finds larger ones,
  and names the halo that would hold them).

The larger of the two, rounded up to :data:`HALO_STEP`, is the halo: 64 px for the shipped
models at scale 1 (where a dense mosaic's tiled labels are 99.9% identical to the whole
image's, and twice that halo changed nothing measurable).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Share of the input gradient that the context radius holds.
CONTEXT_SHARE = 0.95
#: Objects up to this many training diameters are kept whole at seams.
OBJECT_DIAMETERS = 3.0
#: Halos are rounded up to a multiple of this many pixels.
HALO_STEP = 16
#: Side of the probe image (network px): larger than the theoretical receptive field's radius
#: would be wasted, smaller would clip it.
_PROBE_SIDE = 256


def effective_context(backbone: torch.nn.Module, in_channels: int,
                      share: float = CONTEXT_SHARE) -> int:
    """Radius (network px, along rows or columns) holding ``share`` of the input gradient of
    the centre of ``backbone``'s first (finest) output, on a uniform mid-grey input."""
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    try:
        # gradients even when called under no_grad or inference_mode (int8 calibration and
        # inference run so, and the first run of a network measures its context there)
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.full((1, in_channels, _PROBE_SIDE, _PROBE_SIDE), 0.5,
                           dtype=torch.float32, device=param.device, requires_grad=True)
            finest = next(iter(backbone(x.to(param.dtype)).values()))
            h, w = finest.shape[-2:]
            (grad,) = torch.autograd.grad(finest[0, :, h // 2, w // 2].abs().sum(), x)
    finally:
        backbone.train(was_training)
    mass = grad.abs().sum(1)[0].double().cpu().numpy()
    cy, cx = (h // 2 + 0.5) * _PROBE_SIDE / h, (w // 2 + 0.5) * _PROBE_SIDE / w
    yy, xx = np.mgrid[:_PROBE_SIDE, :_PROBE_SIDE]
    radius = np.maximum(np.abs(yy + 0.5 - cy), np.abs(xx + 0.5 - cx)).ravel()
    order = np.argsort(radius, kind="stable")
    total = mass.sum()
    if not total > 0:  # a network blind to its input: no context needed
        return 0
    cumulative = np.cumsum(mass.ravel()[order]) / total
    return int(math.ceil(radius[order][np.searchsorted(cumulative, share)]))


def auto_halo(model, scale: float, tile: int | None = None) -> int:
    """The halo (level-0 px) for ``model`` at resize factor ``scale``: the larger of its
    context and :data:`OBJECT_DIAMETERS` training diameters, divided by ``scale``, rounded up
    to :data:`HALO_STEP`; at most half of ``tile``."""
    need = max(model.context_px, OBJECT_DIAMETERS * model.trained_diameter) / scale
    halo = int(math.ceil(need / HALO_STEP) * HALO_STEP)
    if tile is not None and halo > tile // 2:
        log.warning("the halo these objects need (%d px) is more than half the tile (%d px): "
                    "using %d px; pass a larger --tile to keep larger objects whole", halo,
                    tile, tile // 2)
        halo = tile // 2
    return halo
