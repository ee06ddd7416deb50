"""The user-facing model: normalise, (optionally) rescale, detect tile by tile, paint labels."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from cellmask.config import ModelConfig
from cellmask.device import pick_device
from cellmask.model import flips
from cellmask.model.network import build_network, set_inference_thresholds
from cellmask.model.paint import Instances, paint
from cellmask.model.registry import is_non_commercial, resolve
from cellmask.model.weights import check_state, load_weights
from cellmask.normalize import InputError

log = logging.getLogger(__name__)


class Model:
    """A loaded cellmask network with its configuration.

    ``segment`` is the one-call API; ``detect`` exposes the box-local instances for tiled
    pipelines and evaluation.
    """

    def __init__(self, net: torch.nn.Module, config: ModelConfig, *, name: str = "",
                 meta: dict[str, str] | None = None, device: torch.device | str = "cpu",
                 precision: str = "auto", calibration: dict[str, torch.Tensor] | None = None,
                 int8_runner: torch.nn.Module | None = None):
        self.device = pick_device(device)
        #: int8 activation ranges stored with the weights (``cellmask calibrate``), or empty.
        self.calibration = dict(calibration or {})
        if precision == "auto":
            precision = auto_precision(self.device, bool(self.calibration))
        if precision not in PRECISIONS:
            raise InputError(f"precision must be auto, {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "mixed" and _half_dtype(self.device) is None:
            raise InputError(f"precision 'mixed' needs bf16 or fp16 arithmetic, which "
                             f"{self.device} lacks: use fp32")
        if precision == "int8":
            from cellmask.model.quantize import int8_supported

            if self.device.type != "cpu" or not int8_supported():
                raise InputError("precision 'int8' runs on CPUs with oneDNN only: use fp32")
            if not self.calibration:
                raise InputError(f"these weights ({name or 'given network'}) carry no int8 "
                                 "calibration: run `cellmask calibrate` on them, or use fp32")
        self.precision = precision
        #: The network as trained (its state is what weights files, fingerprints and workers use).
        self.net = net.to(self.device).eval()
        #: The network that runs: a copy with batch norms folded into the convolutions and, on
        #: the CPU, NHWC activations (faster with oneDNN, measured). Same outputs up to rounding.
        if precision == "int8" and int8_runner is not None:  # a copy for another thread
            from cellmask.model.quantize import copy_runner

            self.runner = copy_runner(int8_runner)
        else:
            self.runner = _inference_copy(self.net, self.device, precision, self.calibration)
        self.config = config
        self.name = name
        self.meta = dict(meta or {})
        flips.views(config.test_views)  # refuses a count other than 1, 2, 4 or 8
        set_inference_thresholds(self.runner, config)
        self._digest: str | None = None
        self._context: int | None = None
        self._copies: list[Model] = []
        self._copies_lock = threading.Lock()

    def with_config(self, **changes) -> "Model":
        """A model sharing these weights with other inference thresholds (for tuning)."""
        config = dataclasses.replace(self.config, **changes)
        model = Model(self.net, config, name=self.name, meta=self.meta, device=self.device,
                      precision=self.precision, calibration=self.calibration,
                      int8_runner=self.runner if self.precision == "int8" else None)
        model._digest, model._context = self._digest, self._context
        return model

    @property
    def weights_digest(self) -> str:
        """SHA-256 (hex, 16 digits) of the weights (and int8 calibration) the running network
        was copied from."""
        if self._digest is None:
            digest = hashlib.sha256()
            for k, v in sorted({**self.net.state_dict(), **self.calibration}.items()):
                digest.update(k.encode())
                digest.update(v.detach().cpu().numpy().tobytes())
            self._digest = digest.hexdigest()[:16]
        return self._digest

    @property
    def context_px(self) -> int:
        """Radius (network px) of the trunk's effective receptive field, which sets the halo
        (:mod:`cellmask.model.context`): from the weights header's ``context_px``, else
        measured once per network and process."""
        if self._context is None:
            from cellmask.model.context import effective_context

            stored = str(self.meta.get("context_px", ""))
            if stored.isdigit() and int(stored) <= 4096:
                self._context = int(stored)
            elif self.weights_digest in _CONTEXTS:
                self._context = _CONTEXTS[self.weights_digest]
            else:
                self._context = effective_context(self.net.backbone, self.config.in_channels)
                _CONTEXTS[self.weights_digest] = self._context
        return self._context

    @property
    def trained_diameter(self) -> float:
        """Median object diameter (px) of the training data; ``segment(diameter=)`` scales to it."""
        return float(self.meta.get("trained_diameter", 20.0))

    @torch.inference_mode()
    def detect_batch(self, images: list[np.ndarray],
                     cores: list[tuple[float, float, float, float] | None] | None = None
                     ) -> list[Instances]:
        """Instances of each normalised float32 ``(3, h, w)`` image, one network pass for all
        (one per view with ``config.test_views`` > 1, the views' detections fused:
        :mod:`cellmask.model.flips`).

        With ``precision`` "mixed", "bf16" or "fp16" (parts of) the network run in half
        precision; boxes, scores and masks come back as float32 either way. ``cores``: per
        image, a region ``(y0, y1, x0, x1)`` of its pixels outside which detections will be
        discarded by the caller (a tile's halo): their masks are not computed (detections
        within 1 px of it are kept, so that the caller's own test decides).
        """
        views = flips.views(self.config.test_views)
        if len(views) == 1:
            return self._detect_once(images, cores)
        cores = cores if cores is not None else [None] * len(images)
        shapes = [im.shape[1:] for im in images]
        thresh = self.config.fused_score_thresh
        per_view = self.config.replace(score_thresh=thresh)
        found: list[list[Instances]] = [[] for _ in images]
        for view in views:  # one view at a time: the memory of a single pass
            seen = self._detect_once(
                [flips.view_image(im, view) for im in images],
                [flips.view_core(c, view, s, flips.CORE_MARGIN) for c, s in zip(cores, shapes)],
                per_view)
            for k, (inst, shape) in enumerate(zip(seen, shapes)):
                found[k].append(flips.unview(inst, view, shape))
        return [flips.fuse(parts, flips.FUSE_IOU, thresh) for parts in found]

    def _detect_once(self, images: list[np.ndarray],
                     cores: list[tuple[float, float, float, float] | None] | None,
                     config: ModelConfig | None = None) -> list[Instances]:
        """One network pass over ``images`` with the thresholds of ``config`` (default: the
        model's own)."""
        pixels = max(im.shape[-2] * im.shape[-1] for im in images) if images else 0
        set_inference_thresholds(self.runner, config or self.config, pixels)
        pin = self.device.type == "cuda"
        inputs = [torch.from_numpy(np.ascontiguousarray(im)) for im in images]
        inputs = [(t.pin_memory() if pin else t).to(self.device, non_blocking=pin)
                  for t in inputs]
        if self.precision in ("fp32", "mixed", "int8"):  # the runner casts for these
            outs = self.runner(inputs, cores)
        else:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(self.device.type, dtype=dtype):
                outs = self.runner(inputs, cores)
        return [Instances(o["boxes"].float().cpu().numpy(), o["scores"].float().cpu().numpy(),
                          o["masks"][:, 0].float().cpu().numpy()) for o in outs]

    def borrow_copy(self) -> "Model":
        """A model with these weights and its own inference network, for one thread at a time
        (return it with :meth:`give_back`); copies are kept for the next run."""
        with self._copies_lock:
            if self._copies:
                return self._copies.pop()
        return self.with_config()

    def give_back(self, copy_: "Model") -> None:
        with self._copies_lock:
            self._copies.append(copy_)

    def default_workers(self) -> int:
        """Tile batches run at once by whole-image runs: on a CPU with several cores, 2 (each
        with half the torch threads), up to 4 on many cores; on a GPU, 2 (one CUDA stream
        each, so that copies and host-side work overlap compute)."""
        if self.device.type == "cuda":
            return 2
        if self.device.type != "cpu":
            return 1
        cores = torch.get_num_threads()
        return 1 if cores < 2 else min(4, max(2, cores // 4))

    def default_batch_size(self) -> int:
        """1 on the CPU (batching saves no time there but multiplies memory), 8 on a GPU."""
        return 1 if self.device.type == "cpu" else 8

    def paint(self, inst: Instances, shape: tuple[int, int]) -> np.ndarray:
        """Label image ``(H, W)`` int32 of ``inst`` with this model's painting thresholds."""
        c = self.config
        return paint(inst, shape, mask_thresh=c.mask_thresh,
                     min_visible_fraction=c.min_visible_fraction, min_area=c.min_area)

    @property
    def pixel_size(self) -> float | None:
        """Pixel size (um) of the training images, if they had one; inputs whose pixel size is
        known are rescaled to it."""
        value = float(self.meta.get("pixel_size_um", 0) or 0)
        return value if value > 0 else None

    def segment(self, image: np.ndarray, scale: float | None = None, *,
                diameter: float | None = None, pixel_size: float | None = None,
                modality: str = "auto", tile: int = 1024, halo: int | None = None,
                batch_size: int | None = None, workers: int | None = None) -> np.ndarray:
        """Instance labels of ``image``.

        ``image``: ``(H, W)`` grey or ``(H, W, 3)`` RGB (``(H, W, 1)`` too), any integer, float or
        bool dtype. ``modality``: "auto" (decided once from the whole image), "fluorescence"
        (each channel normalised by percentiles of the whole image) or "brightfield" (stains
        separated once per image, the hematoxylin channel segmented; grey inverted).
        ``scale``: resize factor applied before the network (0.25 for objects 4x larger than the
        training nuclei); or give ``diameter``, the typical object diameter in pixels, or
        ``pixel_size`` (um), rescaled to the model's training pixel size when it has one.
        ``halo``: context read around each tile (level-0 px); default from the network's
        receptive field and object size (:func:`cellmask.model.context.auto_halo`).
        Returns int32 ``(H, W)`` labels, 0 = background, ids 1..N by decreasing score. The
        stages and arithmetic are those of :func:`cellmask.segment_zarr` (one tile engine,
        :mod:`cellmask.engine`): both give the same labels for the same image and settings.
        """
        from cellmask.engine import segment_array

        return segment_array(self, image, scale=scale, diameter=diameter, pixel_size=pixel_size,
                             modality=modality, tile=tile, halo=halo, batch_size=batch_size,
                             workers=workers)


#: Arithmetic of the network: all float32; "mixed": the trunk, the proposal head's 3x3
#: convolution, the RoI features, the box head's hidden layers and the mask branch in bf16
#: (fp16 on GPUs without bf16), the FPN, the objectness and box-delta layers and the box
#: classifier/regressor in float32 (measured on ``val``: as accurate as fp32, where full bf16
#: is not); all bf16; all fp16; "int8": the trunk (with the FPN, where the file's
#: calibration covers it, as the shipped one does), the proposal head and the mask head in
#: int8 on CPUs, with the activation ranges stored in the weights file
#: (:mod:`cellmask.model.quantize`; measured on ``val`` and ``fluo_test``: within 0.003 AP@0.5
#: of fp32 or above it).
PRECISIONS = ("fp32", "mixed", "bf16", "fp16", "int8")


def _inference_copy(net: torch.nn.Module, device: torch.device, precision: str,
                    calibration: dict[str, torch.Tensor]) -> torch.nn.Module:
    from cellmask.model.inference import build_inference_network

    runner = build_inference_network(net, device,
                                     _half_dtype(device) if precision == "mixed" else None)
    if precision == "int8":
        from cellmask.model.quantize import quantize_runner

        quantize_runner(runner, calibration)
    return runner


def _half_dtype(device: torch.device) -> torch.dtype | None:
    """The half-precision type ``device`` computes natively, or None."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):
            return None
    return None


#: Effective context (px) of the networks measured in this process, by digest.
_CONTEXTS: dict[str, int] = {}

#: Rescaling factors outside this range are refused: they mean a mistyped diameter, scale or
#: pixel size (a factor of 400 turns a 1,000 px image into 400,000 px).
SCALE_LIMITS = (1 / 16, 16.0)


def resolve_scale(model: "Model", scale: float | None = None, diameter: float | None = None,
                  pixel_size: float | None = None) -> float:
    """The resize factor that brings an input to ``model``'s training scale: ``scale`` as
    given; else ``model.trained_diameter / diameter``; else ``pixel_size / model.pixel_size``
    (um per pixel of the input and of the training images) when both are known; else 1."""
    given = [name for name, v in (("scale", scale), ("diameter", diameter)) if v is not None]
    if len(given) > 1:
        raise InputError("give scale or diameter, not both")
    for name, value in (("scale", scale), ("diameter", diameter), ("pixel size", pixel_size)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InputError(f"{name} must be a positive number, got {value}")
    if diameter is not None:
        factor, why = model.trained_diameter / float(diameter), f"diameter {diameter:g} px"
    elif scale is not None:
        factor, why = float(scale), "scale"
    elif pixel_size is not None and model.pixel_size:
        factor = float(pixel_size) / model.pixel_size
        why = f"pixel size {pixel_size:g} um (model: {model.pixel_size:g} um)"
        if abs(factor - 1) < 0.05:  # within 5%: not worth a resampling
            return 1.0
    else:
        return 1.0
    if not SCALE_LIMITS[0] <= factor <= SCALE_LIMITS[1]:
        raise InputError(f"{why} gives a rescaling factor of {factor:.4g}, outside "
                         f"{SCALE_LIMITS[0]:g}..{SCALE_LIMITS[1]:g}: check the value (diameter "
                         f"is in pixels, the model's training diameter is "
                         f"{model.trained_diameter:g} px)")
    return factor


def auto_precision(device: torch.device, calibrated: bool = False) -> str:
    """"mixed" where the hardware computes half precision natively (GPUs; CPUs with AVX-512 BF16
    or AMX); else, on a CPU, "int8" for weights that carry an int8 calibration; else "fp32"."""
    if _half_dtype(device) is not None:
        return "mixed"
    if calibrated and device.type == "cpu":
        from cellmask.model.quantize import int8_supported

        if int8_supported():
            return "int8"
    return "fp32"


def load_model(name_or_path: str | Path = "nuclei", device: str = "auto",
               precision: str = "auto") -> Model:
    """Load a named shipped model (default ``"nuclei"``) or a ``.safetensors`` file.

    ``precision``: one of :data:`PRECISIONS`, or "auto" (:func:`auto_precision`: "mixed" where
    the hardware has native half precision, else "int8" on CPUs for calibrated weights, else
    "fp32").
    """
    from cellmask.model.quantize import split_calibration

    path = resolve(name_or_path)
    state, config, meta = load_weights(path)
    state, calibration = split_calibration(state)
    net = build_network(config)
    check_state(net.state_dict(), state, str(path))
    net.load_state_dict(state)
    log.debug("loaded %s (%s)", path, meta.get("step", "?"))
    if is_non_commercial(meta.get("licence", "")):
        log.warning("model %s is licensed %s (trained on non-commercial data): not for "
                    "commercial use", name_or_path, meta["licence"])
    return Model(net, config, name=str(name_or_path), meta=meta, device=device,
                 precision=precision, calibration=calibration)
