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
        return cls(**{k: _tuplify(v) for k, v in values.items()})

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


#: The settings of :class:`ModelConfig` that change inference only (not the weights' shapes).
INFERENCE_SETTINGS = ("rpn_pre_nms_test", "rpn_post_nms_test", "detections_per_image",
                      "proposals_per_mpx", "rpn_pre_nms_ratio", "rpn_score_thresh",
                      "rpn_nms_thresh", "score_thresh",
                      "nms_thresh", "mask_thresh", "min_visible_fraction", "min_area")


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
    extra: dict = field(default_factory=dict, compare=False)
