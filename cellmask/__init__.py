"""cellmask: instance segmentation of dense cells and nuclei, from a crop to a whole slide.

Public API::

    model = cellmask.load_model()          # the shipped "nuclei" model, or a .safetensors path
    labels = model.segment(image)          # (H, W) int32 labels, 0 = background
    table = cellmask.measure(labels, image)
    result = cellmask.segment_zarr("slide.ome.zarr")   # whole slides, tile by tile, resumable
"""

from cellmask import metrics
from cellmask.config import ModelConfig, TrainConfig
from cellmask.measure import measure
from cellmask.model.registry import list_models
from cellmask.model.segmenter import Model, load_model
from cellmask.model.weights import WeightsError
from cellmask.normalize import InputError
from cellmask.pipeline import SegmentationResult, open_labels, segment_zarr

__all__ = ["InputError", "Model", "ModelConfig", "SegmentationResult", "TrainConfig",
           "WeightsError", "list_models", "load_model", "measure", "metrics", "open_labels",
           "segment_zarr"]
__version__ = "0.1.0"
