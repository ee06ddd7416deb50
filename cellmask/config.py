"""Frozen configuration dataclasses.

Every tunable number of the model and of inference lives here, typed and documented once.
A :class:`ModelConfig` is stored as JSON inside each weights file, so a file always carries the
architecture and the thresholds it was tuned with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and inference thresholds of the dense-nuclei Mask R-CNN.

    Sizes are in pixels of the network input (after the optional ``scale`` of ``segment``).
    """

    #: Channels of the network input; grey images are replicated to this many channels.
    in_channels: int = 3
    #: Widths of the ResNet stages returned to the FPN (strides 4, 8, 16).
    stage_widths: tuple[int, int, int] = (32, 64, 128)
    #: Residual blocks per stage.
    stage_blocks: tuple[int, int, int] = (2, 2, 2)
    #: Channels of every FPN level.
    fpn_channels: int = 64
    #: Anchor sizes per FPN level (strides 4, 8, 16, 32); each level gets every ratio.
    anchor_sizes: tuple[tuple[int, ...], ...] = ((8, 12), (16, 24), (32, 48), (64, 128))
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    #: Width of the two fully connected layers of the box head.
    box_head_width: int = 256
    #: Conv layers (and their width) of the mask head.
    mask_head_layers: tuple[int, ...] = (64, 64, 64, 64)
    #: Side of the RoIAlign window of the mask head; predicted masks are twice this.
    mask_roi_size: int = 14
    # --- training-time sampling
    rpn_pre_nms_train: int = 1000
    rpn_post_nms_train: int = 600
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_batch_per_image: int = 128
    box_positive_fraction: float = 0.5
    # --- inference
    #: Proposals kept per FPN level before NMS, and in all after NMS.
    rpn_pre_nms_test: int = 6000
    rpn_post_nms_test: int = 4000
    #: Detections kept per image (thousands: dense tiles hold thousands of nuclei).
    detections_per_image: int = 4000
    #: If > 0, the proposal and detection budgets above are replaced by this many per megapixel
    #: of the input (at least 500): a tile and the whole image then get the same budget per
    #: area, so that tiled and whole-image results agree.
    proposals_per_mpx: float = 6144.0
    #: With ``proposals_per_mpx``: proposals kept per FPN level before their NMS, as a multiple
    #: of the budget after it (the NMS is the costliest step of the region proposals).
    rpn_pre_nms_ratio: float = 1.5
    #: Minimum objectness of a region proposal. Proposals are then set by the image content
    #: rather than only by the per-area budget (background costs nothing), and the budget
    #: stays a cap for the densest tiles.
    rpn_score_thresh: float = 0.0
    #: IoU of the region proposals' NMS (per FPN level).
    rpn_nms_thresh: float = 0.7
    #: Minimum class score of a detection.
    score_thresh: float = 0.5
    #: IoU of the per-class box NMS.
    nms_thresh: float = 0.4
    #: Probability above which a mask pixel belongs to the object.
    mask_thresh: float = 0.5
    #: A painted object keeping less than this fraction of its mask (the rest being taken by
    #: higher-scoring objects) is dropped.
    min_visible_fraction: float = 0.5
    #: Objects smaller than this many pixels are dropped.
    min_area: int = 6
    #: Percentiles used to normalise each channel of the input to about [0, 1].
    norm_percentiles: tuple[float, float] = (1.0, 99.8)
    #: RGB brightfield input: hematoxylin + this fraction of the second stain (0: hematoxylin
    #: alone). Pale nuclei of single-dye stains lie partly along the second direction.
    second_stain_weight: float = 0.0
    #: Brightfield: the highest value the 75th percentile of the normalised nuclear signal may
    #: take; a brighter image has its range widened to it (:mod:`cellmask.appearance`). Set to
    #: where the model's brightfield training images sit (``scripts/brightfield_level.py``);
    #: 0: no cap.
    brightfield_level: float = 0.0
    #: Views of each tile the network sees, whose detections are fused
    #: (:mod:`cellmask.model.flips`): 1 (the tile only), 2, 4 (with its mirror images) or 8
    #: (also transposed). Costs as many network passes; 8 is the ``--augment`` of the CLI.
    test_views: int = 1
    #: With ``test_views`` > 1, the minimum class score of a detection in each view and after
    #: the fusion, in place of ``score_thresh`` (tuned for one view: fused scores are averages
    #: over the views, and a doubtful object seen in one view only is already scored down).
    fused_score_thresh: float = 0.5

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown model configuration keys {unknown}: the weights file was "
                             "written by a newer cellmask; upgrade cellmask to load it")
        if not isinstance(values, dict):
            raise ValueError("the model configuration is not a JSON object")
        values = {k: _tuplify(v) for k, v in values.items()}
        defaults = cls()
        for name, value in values.items():
            _check_field(name, value, getattr(defaults, name))
        return cls(**values)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


#: The settings of :class:`ModelConfig` that change inference only (not the weights' shapes).
INFERENCE_SETTINGS = ("rpn_pre_nms_test", "rpn_post_nms_test", "detections_per_image",
                      "proposals_per_mpx", "rpn_pre_nms_ratio", "rpn_score_thresh",
                      "rpn_nms_thresh", "score_thresh",
                      "nms_thresh", "mask_thresh", "min_visible_fraction", "min_area",
                      "second_stain_weight", "brightfield_level", "test_views",
                      "fused_score_thresh")


#: Ranges of the numbers of a :class:`ModelConfig` read from a file: a weights header is
#: untrusted input, and a network is built from it (widths of 10^9 would allocate without
#: bound). Inclusive; fields not named here must be non-negative and below 10^6.
_RANGES: dict[str, tuple[float, float]] = {
    "in_channels": (1, 16), "stage_widths": (1, 2048), "stage_blocks": (1, 64),
    "fpn_channels": (1, 2048), "anchor_sizes": (1, 4096), "anchor_ratios": (0.01, 100),
    "box_head_width": (1, 8192), "mask_head_layers": (1, 2048), "mask_roi_size": (1, 64),
    "rpn_positive_fraction": (0, 1), "box_positive_fraction": (0, 1),
    "rpn_score_thresh": (0, 1), "rpn_nms_thresh": (0, 1), "score_thresh": (0, 1),
    "nms_thresh": (0, 1), "mask_thresh": (0, 1), "min_visible_fraction": (0, 1),
    "norm_percentiles": (0, 100), "rpn_pre_nms_ratio": (1, 100),
    "second_stain_weight": (0, 2), "brightfield_level": (0, 1), "test_views": (1, 8), "fused_score_thresh": (0, 1),
}


def _check_field(name: str, value: Any, default: Any) -> None:
    """Refuse a configuration value of another structure than the default's, or out of range."""
    lo, hi = _RANGES.get(name, (0, 1e6))

    def check(v: Any, d: Any, where: str) -> None:
        if isinstance(d, tuple):
            fixed = where in ("stage_widths", "stage_blocks", "norm_percentiles", "anchor_sizes")
            if not isinstance(v, tuple) or not 1 <= len(v) <= 64 or (fixed and len(v) != len(d)):
                raise ValueError(f"model configuration {where} must be a list like {list(d)}")
            for k, item in enumerate(v):
                check(item, d[0] if d else 0, f"{where}[{k}]")
            return
        ok_type = isinstance(v, (int, float)) and not isinstance(v, bool)
        if isinstance(d, int) and not isinstance(d, bool):
            ok_type = ok_type and float(v).is_integer()
        if not ok_type or not (lo <= float(v) <= hi):
            raise ValueError(f"model configuration {where} = {v!r} is not a number in "
                             f"[{lo:g}, {hi:g}]: the weights file is corrupt or not cellmask's")

    check(value, default, name)
    if name == "norm_percentiles" and not value[0] < value[1]:
        raise ValueError(f"model configuration norm_percentiles {list(value)} must increase")


def _tuplify(value: Any) -> Any:
    """JSON turns tuples into lists; frozen dataclasses want them back as (nested) tuples."""
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Iteration-based, so that a run is reproducible and resumable."""

    data: str = "../shared/data/dsb2018"
    split: str = "splits/train.txt"
    out: str = "runs/nuclei"
    iterations: int = 4000
    batch_size: int = 4
    crop: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    #: Gradient norm clip (training from scratch diverges without it).
    clip_grad: float = 5.0
    seed: int = 0
    #: Minutes between checkpoints.
    checkpoint_minutes: float = 5.0
    #: Scale jitter range of the zoom augmentation.
    zoom: tuple[float, float] = (0.75, 1.33)
    #: Stop (with a checkpoint) after this many minutes even if ``iterations`` are not done;
    #: 0 = no limit. The schedule still assumes ``iterations``, so ``--resume`` continues it.
    max_minutes: float = 0.0
    device: str = "auto"
    threads: int = 0
    #: Data-loading worker processes (0: load in the training process, best on 2 CPU cores;
    #: a GPU wants several so that augmentation keeps up).
    workers: int = 0
    #: Fine-tune only the parameters whose names start with one of these prefixes (e.g.
    #: ``roi_heads.mask_head``); the rest is frozen and runs as at inference (batch norms
    #: keep their running statistics). Empty: train everything.
    train_only: tuple[str, ...] = ()
    #: Further annotated sets ``(data folder, split, share)``: each gives that share of the
    #: crops (its images drawn uniformly); ``data``/``split`` give the rest.
    more_data: tuple[tuple[str, str, float], ...] = ()
    #: Probability that a fluorescence crop is drawn with H&E-like tissue around its nuclei
    #: (:mod:`cellmask.train.synthetic_tissue`); 0: never.
    tissue_aug: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class RunConfig:
    """One whole-image run (:func:`cellmask.pipeline.run`): how the image is read, tiled and
    mapped, and what is written. The run's fingerprint is derived from it
    (:meth:`arithmetic`), so a resumed run computes exactly what the first one did."""

    #: Side of a tile's core and of the output chunks (level-0 pixels).
    tile: int = 1024
    #: Pixels read around each core; objects up to this size are never cut at a seam. None:
    #: from the network's receptive field and the objects' size at the run's scale
    #: (:func:`cellmask.model.context.auto_halo`; 64 for the shipped models at scale 1).
    halo: int | None = None
    #: Name of the labels image (``labels/<name>``).
    name: str = "cellmask"
    batch_size: int | None = None
    #: Tile batches in the network at once (default: the model's choice).
    workers: int | None = None
    axes: str | None = None
    channel: int | None = None
    z: int | None = None
    t: int | None = None
    #: Resize factor before the network; or ``diameter`` (px), or the pixel size (um).
    scale: float | None = None
    diameter: float | None = None
    pixel_size: float | None = None
    modality: str = "auto"
    tissue_mask: bool = True
    measure: bool = True
    skip_corrupt: bool = False
    #: Replace cellmask's own earlier labels of this name whatever they hold.
    overwrite: bool = False
    #: Micrometres each nucleus grows into its cell (0: nuclei only); labels ``<name>_cells``
    #: and ``<name>_cytoplasm`` and a per-compartment table (:mod:`cellmask.compartments`).
    cell_expansion: float = 0.0
    #: A channel (index or name) of a membrane or cytoplasm stain that bounds the cells: each
    #: nucleus claims the pixels it reaches at least cost over it, within ``cell_expansion``
    #: (:func:`cellmask.compartments.grow_cells`); None grows them by distance alone.
    #: ``cell_boundary_kind``: what it shows.
    cell_boundary: int | str | None = None
    cell_boundary_kind: str = "membrane"
    #: Which morphology and statistics the per-compartment table holds (default all).
    measurements: tuple[str, ...] | None = None
    #: In a new store, write the input image (every channel, 3 levels) beside the labels.
    write_image: bool = True

    def arithmetic(self) -> dict:
        """The settings of this configuration that change the labels (for the fingerprint)."""
        return {"tile": self.tile, "halo": self.halo, "modality": self.modality,
                "tissue_mask": self.tissue_mask, "cell_expansion": self.cell_expansion,
                "cell_boundary": self.cell_boundary,
                "cell_boundary_kind": self.cell_boundary_kind}
