"""QuPath-compatible GeoJSON of a cellmask output: one Feature per object, streamed.

Each object becomes a ``Feature`` whose geometry is the outline of its pixels (a ``Polygon``,
with holes, or a ``MultiPolygon`` when the painted object is in pieces) in level-0 pixel
coordinates with the origin at the top-left corner of the top-left pixel, as QuPath reads
them; ``properties`` carry ``objectType: "detection"``, a ``classification`` and the object's
row of the measurements table (and of the per-compartment table, when there is one) under
``measurements`` (QuPath shows them in its measurement table). When cells were grown, each
object is a QuPath ``cell``: the cell's outline is its ``geometry``, the nucleus's its
``nucleusGeometry``. The tables are read in batches of rows (``batch_rows``, in label order)
and each batch's objects tile by tile (the tile holding the top-left corner of an object's
box reads the region of its objects), so a slide with millions of objects is exported with
the memory of one batch and one tile; the file is written under a temporary name and renamed
when complete.

Outlines are exact pixel boundaries: the mask is doubled in size and traced by marching squares
(:func:`skimage.measure.find_contours`) at 0.5, which runs along the pixel edges except for a
quarter-pixel cut at each corner; collinear points are dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cellmask.errors import InputError

log = logging.getLogger(__name__)

DATASET = "0"
#: Measurement columns that locate an object rather than describe it (not exported).
_LOCATION = ("bbox-0", "bbox-1", "bbox-2", "bbox-3")


def outline(mask: np.ndarray, y0: int = 0, x0: int = 0) -> dict | None:
    """GeoJSON geometry of the pixels of ``mask`` ``(h, w)`` bool whose top-left pixel is at
    row ``y0``, column ``x0``; None for an empty mask."""
    from skimage.measure import find_contours

    if not mask.any():
        return None
    h, w = mask.shape
    up = np.zeros((2 * h + 2, 2 * w + 2), np.uint8)  # each pixel as 2 x 2, 1 px of padding
    up[1:-1, 1:-1] = mask.repeat(2, 0).repeat(2, 1)
    rings = []
    for contour in find_contours(up, 0.5):
        # upsampled index u (with 1 px of padding) -> pixel-corner coordinate (u - 1 + 0.5) / 2
        xy = np.stack([x0 + contour[:, 1] / 2 - 0.25, y0 + contour[:, 0] / 2 - 0.25], 1)
        xy = _drop_collinear(np.round(xy, 3))
        if len(xy) >= 4:
            rings.append(xy)
    if not rings:
        return None
    rings.sort(key=lambda r: -abs(_area(r)))
    polygons: list[list[np.ndarray]] = []
    for ring in rings:  # a ring inside an earlier exterior is its hole, otherwise a new piece
        home = next((p for p in polygons if _inside(ring[0], p[0])), None)
        if home is not None and len(home) and not any(_inside(ring[0], h) for h in home[1:]):
            home.append(_oriented(ring, clockwise=True))
        else:
            polygons.append([_oriented(ring, clockwise=False)])
    coords = [[r.tolist() for r in p] for p in polygons]
    if len(coords) == 1:
        return {"type": "Polygon", "coordinates": coords[0]}
    return {"type": "MultiPolygon", "coordinates": coords}


def _drop_collinear(xy: np.ndarray) -> np.ndarray:
    """A closed ring without the points that lie on the line through their neighbours."""
    pts = xy[:-1] if np.array_equal(xy[0], xy[-1]) else xy
    if len(pts) < 3:
        return xy
    prev = np.concatenate([pts[-1:], pts[:-1]])
    nxt = np.concatenate([pts[1:], pts[:1]])
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - \
        (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    kept = pts[np.abs(cross) > 1e-9]
    return np.vstack([kept, kept[:1]]) if len(kept) else xy


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _oriented(ring: np.ndarray, clockwise: bool) -> np.ndarray:
    """GeoJSON (RFC 7946) wants exteriors counter-clockwise and holes clockwise (in x-right,
    y-up axes; QuPath accepts either)."""
    return ring[::-1] if (_area(ring) < 0) != clockwise else ring


def _inside(point: np.ndarray, ring: np.ndarray) -> bool:
    """Even-odd rule: whether ``point`` (x, y) lies inside the closed ``ring``."""
    x, y = point
    xs, ys = ring[:-1, 0], ring[:-1, 1]
    xe, ye = ring[1:, 0], ring[1:, 1]
    crosses = (ys > y) != (ye > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = xs + (y - ys) * (xe - xs) / (ye - ys)
    return bool(np.count_nonzero(crosses & (x < at)) % 2)


def _features(labels, table, tile: int, object_type: str, classification: str,
              cells=None, grow: int = 0):
    """``(label, feature)`` of every object in the table, tile by tile; with ``cells`` (cell
    labels, each nucleus grown by at most ``grow`` px) QuPath cells: the cell's outline as
    ``geometry``, the nucleus's as ``nucleusGeometry``."""
    h, w = labels.shape
    by = (table["bbox-0"].to_numpy() // tile).astype(np.int64)
    bx = (table["bbox-1"].to_numpy() // tile).astype(np.int64)
    order = np.lexsort((bx, by))
    columns = [c for c in table.columns if c not in _LOCATION and c != "label"]
    values = table[columns].to_numpy(np.float64)
    ids = table["label"].to_numpy()
    boxes = table[list(_LOCATION)].to_numpy(np.int64)
    starts = np.flatnonzero(np.r_[True, (by[order][1:] != by[order][:-1])
                                  | (bx[order][1:] != bx[order][:-1])])
    for s, e in zip(starts, np.r_[starts[1:], len(order)]):
        rows = order[s:e]
        ry0, rx0 = boxes[rows, 0].min(), boxes[rows, 1].min()
        ry1, rx1 = boxes[rows, 2].max(), boxes[rows, 3].max()
        region = np.asarray(labels[ry0:ry1, rx0:rx1])
        if cells is not None:
            gy0, gx0 = max(0, ry0 - grow), max(0, rx0 - grow)
            cell_region = np.asarray(cells[gy0:min(h, ry1 + grow), gx0:min(w, rx1 + grow)])
        for k in rows:
            y0, x0, y1, x1 = boxes[k]
            mask = region[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] == ids[k]
            geometry = outline(mask, int(y0), int(x0))
            if geometry is None:
                continue
            measurements = {c: (None if not np.isfinite(v) else float(v))
                            for c, v in zip(columns, values[k])}
            props = {"objectType": object_type, "name": f"{classification} {int(ids[k])}",
                     "classification": {"name": classification}, "isLocked": False,
                     "measurements": measurements}
            if cells is not None:
                cy0, cx0 = max(gy0, y0 - grow), max(gx0, x0 - grow)
                cy1, cx1 = min(h, y1 + grow), min(w, x1 + grow)
                cell_mask = cell_region[cy0 - gy0:cy1 - gy0, cx0 - gx0:cx1 - gx0] == ids[k]
                cell_geometry = outline(cell_mask, int(cy0), int(cx0))
                if cell_geometry is not None:
                    props["objectType"] = "cell"
                    props["nucleusGeometry"] = geometry
                    geometry = cell_geometry
            yield int(ids[k]), {"type": "Feature", "id": f"cellmask-{int(ids[k])}",
                                "geometry": geometry, "properties": props}


def _parquet_batches(path: Path, rows: int):
    """The table in ``path`` as pyarrow tables of at most ``rows`` rows, read one row group at
    a time. (``ParquetFile.iter_batches`` pre-buffers: its memory grew by 200 MB from 100,000
    to 1,000,000 rows; a row group at a time stays flat. cellmask writes row groups of
    :data:`cellmask.labels_store.ROW_GROUP` rows.)"""
    import pyarrow.parquet as pq

    table_file = pq.ParquetFile(path)
    for i in range(table_file.num_row_groups):
        group = table_file.read_row_group(i)
        for start in range(0, group.num_rows, rows):
            yield group.slice(start, rows)


def _row_batches(group_dir: Path, batch_rows: int):
    """The measurements table (joined with the per-compartment table, when there is one) as
    DataFrames of at most ``batch_rows`` rows, in the tables' order (by label)."""
    import pandas as pd

    more = None
    if (group_dir / "compartments.parquet").is_file():  # every channel, every compartment
        more = _parquet_batches(group_dir / "compartments.parquet", batch_rows)
    pending: list = []
    for batch in _parquet_batches(group_dir / "measurements.parquet", batch_rows):
        table = batch.to_pandas()
        if more is None:
            yield table
            continue
        have = sum(len(p) for p in pending)
        while have < len(table):  # the two files need not share row-group boundaries
            part = next(more, None)
            if part is None:
                break
            pending.append(part.to_pandas())
            have += len(pending[-1])
        extra = pd.concat(pending, ignore_index=True) if pending else pd.DataFrame()
        pending = [extra.iloc[len(table):]] if len(extra) > len(table) else []
        extra = extra.iloc[:len(table)].reset_index(drop=True)
        if len(extra) != len(table) or not np.array_equal(extra["label"].to_numpy(),
                                                          table["label"].to_numpy()):
            raise InputError(f"{group_dir}: compartments.parquet does not list the objects of "
                             "measurements.parquet in the same order; segment again with "
                             "--overwrite to rewrite both")
        yield pd.concat([table, extra.drop(columns="label")], axis=1)


def export_geojson(path: str | Path, out: str | Path | None = None, *, name: str = "cellmask",
                   object_type: str = "detection", classification: str = "Nucleus",
                   overwrite: bool = False, batch_rows: int = 50_000) -> Path:
    """Write the objects of the cellmask output ``path`` (the store, or its labels group) as a
    QuPath GeoJSON ``FeatureCollection``; returns the file. Default ``out``: beside the store,
    ``<store name>.geojson``. Needs the run's measurements table (its boxes locate each object;
    its columns become the measurements), read ``batch_rows`` rows at a time."""
    from cellmask.labels_store import labels_level0, write_atomic

    labels = labels_level0(path, name)
    group_dir = Path(path)
    for candidate in (group_dir, group_dir / name, group_dir / "labels" / name):
        if (candidate / "measurements.parquet").is_file():
            group_dir = candidate
            break
    else:
        raise InputError(f"{path} has no measurements table (labels/{name}/"
                         "measurements.parquet): segment with measurements to export objects")
    if batch_rows < 1:
        raise InputError(f"batch_rows must be positive, got {batch_rows}")
    cells, grow = None, 0
    cells_dir = group_dir.parent / f"{name}_cells"
    if (cells_dir / DATASET).exists():
        import math

        import zarr

        record = zarr.open_group(str(group_dir), mode="r").attrs.get("cellmask", {})
        cells = zarr.open_array(str(cells_dir / DATASET), mode="r")
        grow = int(math.ceil(float(record.get("cell_expansion_px", 0)))) + 1
    if out is None:
        store = group_dir.parent.parent
        stem = store.name[:-len(".ome.zarr")] if store.name.endswith(".ome.zarr") else store.stem
        out = store.with_name(stem + ".geojson")
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists: pass --overwrite (overwrite=True) or another --out")
    tile = int(labels.chunks[0]) if labels.chunks else 1024
    count = 0

    def write(fh) -> None:
        nonlocal count
        fh.write(b'{"type": "FeatureCollection", "features": [\n')
        for table in _row_batches(group_dir, batch_rows):
            for _, feature in _features(labels, table, max(256, tile), object_type,
                                        classification, cells, grow):
                fh.write((",\n" if count else "").encode() + json.dumps(feature).encode())
                count += 1
        fh.write(b"\n]}\n")

    write_atomic(out, write)
    log.info("%d objects written to %s", count, out)
    return out
