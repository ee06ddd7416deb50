"""The user-facing model: normalise, (optionally) rescale, detect tile by tile, paint labels."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cellmask.config import ModelConfig
from cellmask.device import pick_device
from cellmask.model.network import build_network, set_inference_thresholds
from cellmask.model.paint import Instances, paint
from cellmask.model.registry import resolve
from cellmask.model.weights import check_state, load_weights
from cellmask.normalize import InputError, apply_range, as_channels_first, percentile_range
from cellmask.tiling import plan_tiles

log = logging.getLogger(__name__)


class Model:
    """A loaded cellmask network with its configuration.

    ``segment`` is the one-call API; ``detect`` exposes the box-local instances for tiled
    pipelines and evaluation.
    """

    def __init__(self, net: torch.nn.Module, config: ModelConfig, *, name: str = "",
                 meta: dict[str, str] | None = None, device: torch.device | str = "cpu",
                 precision: str = "fp32"):
        self.device = pick_device(device)
        if precision == "auto":
            precision = auto_precision(self.device)
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
        self.precision = precision
        self.net = net.to(self.device).eval()
        if self.device.type == "cpu":  # NHWC convolutions are faster with oneDNN (measured)
            self.net.backbone.channels_last = True
            self.net.backbone.to(memory_format=torch.channels_last)
        self.config = config
        self.name = name
        self.meta = dict(meta or {})
        set_inference_thresholds(self.net, config)

    def with_config(self, **changes) -> "Model":
        """A model sharing these weights with other inference thresholds (for tuning)."""
        config = dataclasses.replace(self.config, **changes)
        return Model(self.net, config, name=self.name, meta=self.meta, device=self.device,
                     precision=self.precision)

    @property
    def trained_diameter(self) -> float:
        """Median object diameter (px) of the training data; ``segment(diameter=)`` scales to it."""
        return float(self.meta.get("trained_diameter", 20.0))

    @torch.inference_mode()
    def detect_batch(self, images: list[np.ndarray]) -> list[Instances]:
        """Instances of each normalised float32 ``(3, h, w)`` image, one network pass for all.

        With ``precision`` "bf16" or "fp16" the network runs under autocast; boxes, scores and
        masks come back as float32 either way.
        """
        pixels = max(im.shape[-2] * im.shape[-1] for im in images) if images else 0
        set_inference_thresholds(self.net, self.config, pixels)  # the net may be shared
        pin = self.device.type == "cuda"
        inputs = [torch.from_numpy(np.ascontiguousarray(im)) for im in images]
        inputs = [(t.pin_memory() if pin else t).to(self.device, non_blocking=pin)
                  for t in inputs]
        if self.precision == "fp32":
            outs = self.net(inputs)
        else:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(self.device.type, dtype=dtype):
                outs = self.net(inputs)
        return [Instances(o["boxes"].float().cpu().numpy(), o["scores"].float().cpu().numpy(),
                          o["masks"][:, 0].float().cpu().numpy()) for o in outs]

    def default_batch_size(self) -> int:
        """1 on the CPU (batching saves no time there but multiplies memory), 8 on a GPU."""
        return 1 if self.device.type == "cpu" else 8

    def detect(self, chw: np.ndarray, *, tile: int = 1024, halo: int = 64,
               batch_size: int | None = None) -> Instances:
        """Instances of a normalised float32 ``(3, H, W)`` image, in its pixel frame.

        Images larger than ``tile`` are cut into tiles (core + ``halo``); each instance is kept
        only by the tile whose core holds its box centre, so none is lost or counted twice when
        objects are smaller than the halo. ``batch_size`` tiles go through the network at once.
        """
        batch_size = batch_size or self.default_batch_size()
        tiles = plan_tiles(chw.shape[1:], tile, halo)
        parts = []
        for start in range(0, len(tiles), batch_size):
            batch = tiles[start:start + batch_size]
            crops = [chw[:, t.window[0]:t.window[1], t.window[2]:t.window[3]] for t in batch]
            for t, inst in zip(batch, self.detect_batch(crops)):
                parts.append(inst.shifted(t.window[0], t.window[2]).owned_by(t))
        return Instances.concatenate(parts, 2 * self.config.mask_roi_size)

    def paint(self, inst: Instances, shape: tuple[int, int]) -> np.ndarray:
        """Label image ``(H, W)`` int32 of ``inst`` with this model's painting thresholds."""
        c = self.config
        return paint(inst, shape, mask_thresh=c.mask_thresh,
                     min_visible_fraction=c.min_visible_fraction, min_area=c.min_area)

    def segment(self, image: np.ndarray, scale: float | None = None, *,
                diameter: float | None = None, tile: int = 1024, halo: int = 64,
                batch_size: int | None = None) -> np.ndarray:
        """Instance labels of ``image``.

        ``image``: ``(H, W)`` grey or ``(H, W, 3)`` RGB (``(H, W, 1)`` too), any integer, float or
        bool dtype; intensities are normalised per channel by percentiles of the whole image.
        ``scale``: resize factor applied before the network (0.25 for objects 4x larger than the
        training nuclei); or give ``diameter``, the typical object diameter in pixels.
        Returns int32 ``(H, W)`` labels, 0 = background, ids 1..N by decreasing score.
        """
        chw = as_channels_first(image)
        lo, hi = percentile_range(chw, self.config.norm_percentiles)
        norm = apply_range(chw, lo, hi)
        scale = _resolve_scale(scale, diameter, self.trained_diameter)
        shape = norm.shape[1:]
        if scale != 1.0:
            size = (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))
            norm = F.interpolate(torch.from_numpy(norm)[None], size=size, mode="bilinear",
                                 antialias=scale < 1, align_corners=False)[0].numpy()
        inst = self.detect(norm, tile=max(32, int(tile)), halo=halo, batch_size=batch_size)
        if scale != 1.0:
            fy, fx = shape[0] / norm.shape[1], shape[1] / norm.shape[2]
            inst = Instances(inst.boxes * np.array([fx, fy, fx, fy], np.float32), inst.scores,
                             inst.masks)
        return self.paint(inst, shape)


def _resolve_scale(scale: float | None, diameter: float | None, trained: float) -> float:
    if scale is not None and diameter is not None:
        raise InputError("give scale or diameter, not both")
    if diameter is not None:
        if not diameter > 0:
            raise InputError(f"diameter must be positive, got {diameter}")
        return trained / float(diameter)
    if scale is None:
        return 1.0
    if not (np.isfinite(scale) and scale > 0):
        raise InputError(f"scale must be a positive number, got {scale}")
    return float(scale)


def auto_precision(device: torch.device) -> str:
    """bf16 where the hardware computes it natively (recent GPUs; CPUs with AVX-512 BF16 or
    AMX), else fp32 (fp16 on GPUs without bf16)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        try:
            return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        except (AttributeError, RuntimeError):
            return "fp32"
    return "fp32"


def load_model(name_or_path: str | Path = "nuclei", device: str = "auto",
               precision: str = "fp32") -> Model:
    """Load a named shipped model (default ``"nuclei"``) or a ``.safetensors`` file.

    ``precision``: "fp32", "bf16" or "fp16" (the network under autocast), or "auto"
    (:func:`auto_precision`).
    """
    path = resolve(name_or_path)
    state, config, meta = load_weights(path)
    net = build_network(config)
    check_state(net.state_dict(), state, str(path))
    net.load_state_dict(state)
    log.debug("loaded %s (%s)", path, meta.get("step", "?"))
    return Model(net, config, name=str(name_or_path), meta=meta, device=device,
                 precision=precision)
