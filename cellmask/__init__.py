"""cellmask: instance segmentation of dense cells and nuclei, from a crop to a whole slide.

Public API::

    model = cellmask.load_model()          # the shipped "nuclei" model, or a .safetensors path
    labels = model.segment(image)          # (H, W) int32 labels, 0 = background
    table = cellmask.measure(labels, image)
    result = cellmask.segment_zarr("slide.ome.zarr")   # whole slides, tile by tile, resumable
"""

import importlib

from cellmask.errors import InputError, WeightsError
from cellmask.measure import measure  # eager: the submodule of the same name would shadow it

#: Public names and their modules, imported on first use: ``import cellmask`` stays light, so
#: that the command line can refuse a bad input before torch loads (seconds).
_LAZY = {"metrics": "cellmask.metrics", "ModelConfig": "cellmask.config",
         "TrainConfig": "cellmask.config", "RunConfig": "cellmask.config",
         "list_models": "cellmask.model.registry",
         "Model": "cellmask.model.segmenter", "load_model": "cellmask.model.segmenter",
         "SegmentationResult": "cellmask.pipeline", "open_labels": "cellmask.pipeline",
         "segment_zarr": "cellmask.pipeline", "pipeline": "cellmask.pipeline",
         "segment_batch": "cellmask.batch", "export_geojson": "cellmask.geojson"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cellmask' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name in ("metrics", "pipeline") else getattr(module, name)
    globals()[name] = value
    return value


__all__ = ["InputError", "Model", "ModelConfig", "RunConfig", "SegmentationResult", "TrainConfig",
           "WeightsError", "export_geojson", "list_models", "load_model", "measure", "metrics",
           "open_labels", "segment_batch", "segment_zarr"]
__version__ = "0.1.0"
