"""Reader: OME-Zarr images with their labels (cellmask outputs included), TIFF and SVS, all lazy.

``napari_get_reader`` returns ``None`` for anything it cannot read and never raises into napari.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _ome_meta(group) -> dict:
    attrs = group.attrs.asdict()
    return attrs.get("ome", attrs)


def _is_ome_zarr(path: Path) -> bool:
    if not path.is_dir():
        return False
    if not any((path / f).is_file() for f in ("zarr.json", ".zattrs", ".zgroup")):
        return False
    import zarr

    group = zarr.open_group(str(path), mode="r")
    meta = _ome_meta(group)
    return "multiscales" in meta or "labels" in meta or "labels" in group


def napari_get_reader(path):
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        p = Path(str(path))
        if _is_ome_zarr(p):
            return read_ome_zarr
        if p.is_file() and p.suffix.lower() in (".tif", ".tiff", ".svs"):
            import tifffile

            with tifffile.TiffFile(p) as tif:
                if tif.series:
                    return read_tiff
    except Exception:  # a reader must never raise into napari: say no instead
        log.debug("cellmask reader declines %s", path, exc_info=True)
    return None


def _levels(group, meta):
    import dask.array as da

    ms = meta["multiscales"][0]
    levels = [da.from_zarr(group[d["path"]]) for d in ms["datasets"]]
    axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
    scale = None
    for tr in ms["datasets"][0].get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            scale = tr["scale"]
    return levels, axes, scale


def read_ome_zarr(path):
    import zarr

    root = Path(str(path[0] if isinstance(path, (list, tuple)) else path))
    group = zarr.open_group(str(root), mode="r")
    layers = []
    meta = _ome_meta(group)
    if "multiscales" in meta and "image-label" not in meta:
        levels, axes, scale = _levels(group, meta)
        kwargs = {"name": root.name.split(".")[0], "multiscale": len(levels) > 1}
        if "c" in axes:
            c = axes.index("c")
            kwargs["channel_axis"] = c
            if scale is not None:
                scale = [s for i, s in enumerate(scale) if i != c]
        if scale is not None:
            kwargs["scale"] = scale
        layers.append((levels if len(levels) > 1 else levels[0], kwargs, "image"))
    label_groups = []
    if "image-label" in meta:
        label_groups = [(root.name, group)]
    elif "labels" in group:
        lg = group["labels"]
        for name in _ome_meta(lg).get("labels", []):
            if name in lg:
                label_groups.append((name, lg[name]))
    for name, g in label_groups:
        levels, _, scale = _levels(g, _ome_meta(g))
        kwargs = {"name": name, "multiscale": len(levels) > 1}
        if scale is not None:
            kwargs["scale"] = scale
        table = Path(str(root)) / "labels" / name / "measurements.parquet"
        if table.is_file():
            import pandas as pd

            kwargs["features"] = pd.read_parquet(table)
        layers.append((levels if len(levels) > 1 else levels[0], kwargs, "labels"))
    return layers or [(None,)]


def read_tiff(path):
    from cellmask.sources import open_image

    p = Path(str(path[0] if isinstance(path, (list, tuple)) else path))
    src = open_image(p) if _single_channel_or_rgb(p) else None
    if src is None:
        import dask.array as da
        import tifffile
        import zarr

        series = tifffile.TiffFile(p).series[0]
        arr = da.from_zarr(zarr.open(series.aszarr(), mode="r"))
        return [(arr, {"name": p.stem}, "image")]
    levels = [lv[..., 0] if lv.shape[2] == 1 else lv for lv in src.levels]
    return [(levels if len(levels) > 1 else levels[0],
             {"name": p.stem, "rgb": src.array.shape[2] == 3, "multiscale": len(levels) > 1},
             "image")]


def _single_channel_or_rgb(p: Path) -> bool:
    import tifffile

    with tifffile.TiffFile(p) as tif:
        axes = tif.series[0].axes
    return set(axes) <= set("YXS")
