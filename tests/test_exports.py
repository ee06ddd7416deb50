"""QuPath GeoJSON export and batches of images."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

import cellmask
from fixtures import load_fixture
from test_pipeline import _tiny_model, oracle

shapely = pytest.importorskip("shapely")


def _pixels(mask, y0, x0):
    """The pixels of ``mask`` as a shapely geometry (unit squares, corner coordinates)."""
    from shapely.geometry import box
    from shapely.ops import unary_union

    rows, cols = np.nonzero(mask)
    return unary_union([box(x0 + c, y0 + r, x0 + c + 1, y0 + r + 1) for r, c in zip(rows, cols)])


def test_geojson_polygons_match_the_labels(tmp_path):
    from shapely.geometry import shape

    image, truth = load_fixture("fluo_e23e11414ee6")
    result = cellmask.segment_zarr(image, tmp_path / "o.ome.zarr", tile=128, halo=48,
                                   detector=oracle(truth), model=_tiny_model(), progress=False)
    path = cellmask.export_geojson(tmp_path / "o.ome.zarr")
    assert path == tmp_path / "o.geojson"
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    labels = np.asarray(result.labels)
    assert len(features) == len(result.table) == labels.max()
    ious = []
    for feature in features:
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"]
        label = int(feature["id"].split("-")[1])
        row = result.table.loc[result.table["label"] == label].iloc[0]
        assert props["measurements"]["area"] == row["area"]
        geometry = shape(feature["geometry"])
        assert geometry.is_valid
        y0, x0, y1, x1 = (int(row[f"bbox-{k}"]) for k in range(4))
        pixels = _pixels(labels[y0:y1, x0:x1] == label, y0, x0)
        ious.append(geometry.intersection(pixels).area / geometry.union(pixels).area)
    assert min(ious) >= 0.95 and np.mean(ious) > 0.99


def test_tables_are_written_and_read_in_row_groups(tmp_path, monkeypatch):
    """A run's table is written in row groups of ``ROW_GROUP`` rows, and the export reads one
    group at a time, sliced to its batch size (memory flat in the number of objects)."""
    import pyarrow.parquet as pq

    from cellmask import geojson, labels_store

    monkeypatch.setattr(labels_store, "ROW_GROUP", 10)
    image, truth = load_fixture("fluo_e23e11414ee6")
    result = cellmask.segment_zarr(image, tmp_path / "o.ome.zarr", tile=128, halo=48,
                                   detector=oracle(truth), model=_tiny_model(), progress=False)
    table_path = result.path / "measurements.parquet"
    sizes = [pq.ParquetFile(table_path).metadata.row_group(i).num_rows
             for i in range(pq.ParquetFile(table_path).num_row_groups)]
    assert len(sizes) > 2 and max(sizes) == 10 and sum(sizes) == len(result.table)
    parts = list(geojson._parquet_batches(table_path, 4))
    assert max(p.num_rows for p in parts) == 4
    assert np.array_equal(np.concatenate([p.column("label").to_numpy() for p in parts]),
                          result.table["label"].to_numpy())


def test_geojson_of_objects_with_holes_and_pieces():
    from shapely.geometry import shape

    from cellmask.geojson import outline

    mask = np.zeros((9, 14), bool)
    mask[:7, :7] = True
    mask[3, 3] = False  # a hole
    mask[2:4, 9:11] = True  # a second piece
    geometry = shape(outline(mask, 100, 200))
    assert geometry.geom_type == "MultiPolygon" and geometry.is_valid
    pixels = _pixels(mask, 100, 200)
    assert geometry.symmetric_difference(pixels).area < 0.5  # quarter-pixel corner cuts only


def test_export_geojson_command(tmp_path):
    image, _ = load_fixture("fluo_29dd28df98ee")
    tifffile.imwrite(tmp_path / "cells.tif", image)
    cellmask.segment_zarr(tmp_path / "cells.tif", progress=False, tile=256, halo=32)
    store = tmp_path / "cells.cellmask.ome.zarr"
    run = [sys.executable, "-m", "cellmask", "--quiet", "export-geojson", str(store)]
    r = subprocess.run(run, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    features = json.loads((tmp_path / "cells.cellmask.geojson").read_text())["features"]
    assert len(features) > 30
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_batch_of_a_folder_never_collides_and_combines_tables(tmp_path, shipped_model):
    image, _ = load_fixture("fluo_29dd28df98ee")
    other, _ = load_fixture("fluo_e23e11414ee6")
    folder = tmp_path / "plate"
    (folder / "more").mkdir(parents=True)
    tifffile.imwrite(folder / "plate.A1.tif", image)
    tifffile.imwrite(folder / "plate.A2.tif", other)
    (folder / "broken.tif").write_bytes(b"not a tiff")
    tifffile.imwrite(folder / "more" / "plate.A1.tif", image[::-1])
    inputs = [folder, folder / "more" / "plate.A1.tif"]
    batch = cellmask.segment_batch(inputs, tmp_path / "out", model=shipped_model,
                                   progress=False, tile=256, halo=32)
    assert list(batch.failed) == [str(folder / "broken.tif")]
    names = sorted(p.name for p in (tmp_path / "out").glob("*.ome.zarr"))
    assert names == ["more_plate.A1.cellmask.ome.zarr", "plate.A2.cellmask.ome.zarr",
                     "plate_plate.A1.cellmask.ome.zarr"]
    table = pd.read_parquet(tmp_path / "out" / "measurements.parquet")
    assert table["image"].nunique() == 3
    for key, result in batch.results.items():
        assert (table["image"] == key).sum() == result.objects > 20
    single = shipped_model.segment(other, tile=256, halo=32)
    a2 = batch.results[str(folder / "plate.A2.tif")]
    assert np.array_equal(np.asarray(a2.labels), single)
    again = cellmask.segment_batch(inputs, tmp_path / "out", model=shipped_model,
                                   progress=False, tile=256, halo=32)  # resumes each image
    assert {k: r.objects for k, r in again.results.items()} == \
        {k: r.objects for k, r in batch.results.items()}


def test_batch_command_reports_failures_and_needs_an_output_folder(tmp_path):
    image, _ = load_fixture("fluo_29dd28df98ee")
    tifffile.imwrite(tmp_path / "a.tif", image)
    tifffile.imwrite(tmp_path / "b.tif", image[:, ::-1])
    cmd = [sys.executable, "-m", "cellmask", "--quiet", "segment"]
    r = subprocess.run(cmd + [str(tmp_path / "a.tif"), str(tmp_path / "b.tif")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--out FOLDER" in r.stderr
    r = subprocess.run(cmd + [str(tmp_path / "*.tif"), "--out", str(tmp_path / "out"),
                              "--tile", "256"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "out" / "measurements.csv")
    assert sorted(table["image"].unique()) == [str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]


def test_outputs_of_a_tiff_open_as_image_and_labels_everywhere(tmp_path):
    """The store made from a TIFF holds the image too: ome-zarr-py, ome-zarr-models (strict
    NGFF 0.5) and napari-ome-zarr open it with its labels, in the same units."""
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    image, truth = load_fixture("fluo_29dd28df98ee")
    two = np.stack([image, image[::-1]])
    tifffile.imwrite(tmp_path / "in.ome.tif", two, metadata={
        "axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}, "PhysicalSizeX": 0.25,
        "PhysicalSizeY": 0.25})
    out = tmp_path / "o.ome.zarr"
    cellmask.segment_zarr(tmp_path / "in.ome.tif", out, channel=0, tile=128, halo=32,
                          detector=oracle(truth), model=_tiny_model(), progress=False)
    nodes = list(Reader(parse_url(str(out)))())
    assert [n.data[0].shape for n in nodes if n.data] == [(2, 256, 256), (256, 256)]
    img = Image.from_zarr(zarr.open_group(str(out), mode="r"))
    axes = img.attributes.ome.multiscales[0].axes
    lab = ImageLabel.from_zarr(zarr.open_group(str(out / "labels/cellmask"), mode="r"))
    lab_axes = lab.attributes.ome.multiscales[0].axes
    assert [a.unit for a in axes[1:]] == [a.unit for a in lab_axes] == ["micrometer"] * 2
    root = zarr.open_group(str(out), mode="r")
    assert [c["label"] for c in root.attrs["ome"]["omero"]["channels"]] == ["DAPI", "GFP"]
    np.testing.assert_array_equal(root["0"][:], two)
    np.testing.assert_array_equal(root["1"][:], two[:, ::2, ::2])
    from napari_ome_zarr import napari_get_reader

    layers = napari_get_reader(str(out))(str(out))
    kinds = sorted(layer[2] for layer in layers)
    assert kinds == ["image", "labels"]


def test_geojson_cells_carry_their_nucleus_and_every_channel(tmp_path):
    import zarr
    from shapely.geometry import shape

    image, truth = load_fixture("fluo_e23e11414ee6")
    two = np.stack([image, image[::-1, ::-1]])
    result = cellmask.segment_zarr(two, tmp_path / "o.ome.zarr", axes="CYX", channel=0,
                                   tile=128, halo=48, detector=oracle(truth),
                                   model=_tiny_model(), progress=False, pixel_size=0.5,
                                   cell_expansion=2.0)
    features = json.loads(cellmask.export_geojson(tmp_path / "o.ome.zarr").read_text())[
        "features"]
    nuclei = np.asarray(result.labels)
    cells = zarr.open_array(str(tmp_path / "o.ome.zarr/labels/cellmask_cells/0"))[:]
    assert len(features) == nuclei.max()
    for feature in features[::10]:
        props = feature["properties"]
        assert props["objectType"] == "cell" and "cell.mean.ch1" in props["measurements"]
        label = int(feature["id"].split("-")[1])
        for geometry, labels in ((feature["geometry"], cells),
                                 (props["nucleusGeometry"], nuclei)):
            ys, xs = np.nonzero(labels == label)
            y0, x0 = ys.min(), xs.min()
            pixels = _pixels(labels[y0:ys.max() + 1, x0:xs.max() + 1] == label, y0, x0)
            g = shape(geometry)
            assert g.intersection(pixels).area / g.union(pixels).area >= 0.95
    # read in small batches of rows (the tables' row groups of other sizes): the same objects
    import pyarrow as pa
    import pyarrow.parquet as pq

    table_path = tmp_path / "o.ome.zarr/labels/cellmask/compartments.parquet"
    pq.write_table(pa.Table.from_pandas(pd.read_parquet(table_path)), table_path,
                   row_group_size=5)
    batched = json.loads(cellmask.export_geojson(tmp_path / "o.ome.zarr", tmp_path / "b.json",
                                                 batch_rows=7).read_text())["features"]
    assert sorted(map(json.dumps, batched)) == sorted(map(json.dumps, features))
    # tables that disagree are refused, not paired wrongly
    shuffled = pd.read_parquet(table_path).iloc[::-1]
    shuffled.to_parquet(table_path, index=False)
    with pytest.raises(cellmask.InputError, match="same order"):
        cellmask.export_geojson(tmp_path / "o.ome.zarr", tmp_path / "c.json", batch_rows=7)
