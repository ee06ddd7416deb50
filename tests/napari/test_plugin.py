"""The napari plugin in a real (virtual-display) viewer."""

import subprocess
import sys

import dask.array as da
import numpy as np
import pytest

from cellmask.metrics import Evaluation
from cellmask.samples import load_sample

pytest.importorskip("napari")


def ap50(gt, pred):
    ev = Evaluation(thresholds=(0.5,))
    ev.add(gt, pred)
    return ev.table()["ap"][0]


@pytest.fixture
def segment_widget(make_napari_viewer):
    from napari_plugin._widget import SegmentWidget

    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def test_manifest_is_valid():
    r = subprocess.run([sys.executable, "-m", "npe2", "validate", "cellmask"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "valid" in r.stdout + r.stderr


def test_core_imports_without_qt_or_napari():
    code = ("import sys, cellmask; cellmask.load_model; "
            "bad = [m for m in ('napari', 'qtpy', 'PyQt6', 'magicgui') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_segment_sample_gives_the_nuclei(segment_widget, qtbot):
    viewer, widget = segment_widget
    image, truth = load_sample()
    layer = viewer.add_image(image, name="sample")
    other = viewer.add_image(np.zeros((32, 32)), name="distractor")
    widget.image.value = layer
    widget.run()
    viewer.layers.selection.active = other  # the user looks elsewhere while it runs
    qtbot.waitUntil(lambda: widget.last_result_layer is not None, timeout=120_000)
    labels = viewer.layers["sample cellmask"]
    assert labels.metadata["cellmask_source"] == "sample"
    assert labels.data.shape == image.shape
    assert ap50(truth, np.asarray(labels.data)) >= 0.8
    assert len(labels.features) == labels.data.max()
    dock = widget.measurements
    assert dock.row_count() == labels.data.max()
    dock.select_row(3)
    chosen = dock._row_label(3)
    assert labels.selected_label == chosen
    rec = labels.features.loc[labels.features["label"] == chosen].iloc[0]
    assert np.allclose(viewer.camera.center[-2:], (rec["centroid-0"], rec["centroid-1"]),
                       atol=1)
    labels.selected_label = dock._row_label(7)
    assert dock.selected_labels() == [dock._row_label(7)]


def test_cancel_leaves_no_half_layer_and_frees_the_output(segment_widget, qtbot, tmp_path):
    from napari_plugin._sample_data import nuclei_mosaic

    viewer, widget = segment_widget
    (mosaic, meta, _), = nuclei_mosaic(2048)
    widget.image.value = viewer.add_image(mosaic, **meta)
    widget.tile.value = 256
    widget.output.value = tmp_path / "m.ome.zarr"
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=60_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    assert widget.status.value == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["nuclei mosaic"]
    widget.run()  # the same output again: the cancelled run has released it
    qtbot.waitUntil(lambda: widget.last_result_layer is not None, timeout=120_000)
    assert int(np.asarray(widget.last_result_layer.data).max()) > 100


def test_a_second_run_keeps_the_first_result_readable(segment_widget, qtbot):
    from napari_plugin._sample_data import nuclei_mosaic

    viewer, widget = segment_widget
    (mosaic, _, _), = nuclei_mosaic(1024)
    shown = []
    for name in ("first", "second"):  # dask layers: results stay on disk, in temporary folders
        widget.image.value = viewer.add_image(da.from_array(mosaic, chunks=512), name=name)
        widget.last_result_layer = None
        widget.run()
        qtbot.waitUntil(lambda: widget.last_result_layer is not None, timeout=120_000)
        qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
        shown.append(widget.last_result_layer)
    first = np.asarray(shown[0].data[0])
    assert first.max() > 50 and np.array_equal(first, np.asarray(shown[1].data[0]))
    path = shown[0].metadata["cellmask_path"]
    viewer.layers.remove(shown[0])  # no layer shows it now: its temporary folder goes
    assert not __import__("os").path.exists(path)
    assert np.asarray(shown[1].data[0]).max() > 50


def test_multiscale_dask_path_stays_lazy(segment_widget, qtbot, tmp_path):
    from napari_plugin._sample_data import nuclei_mosaic

    viewer, widget = segment_widget
    (mosaic, _, _), = nuclei_mosaic(4096)
    big = da.from_array(mosaic, chunks=1024)
    layer = viewer.add_image([big, big[::2, ::2]], multiscale=True, name="big")
    assert isinstance(layer.data[0], da.Array)
    widget.image.value = layer
    widget.output.value = tmp_path / "big.ome.zarr"
    widget.run()
    qtbot.waitUntil(lambda: widget.last_result_layer is not None, timeout=600_000)
    labels = viewer.layers["big cellmask"]
    assert labels.multiscale and isinstance(labels.data[0], da.Array)
    assert labels.data[0].shape == (4096, 4096)
    assert int(labels.data[2][::16, ::16].max().compute()) > 100


def test_reader_writer_round_trip(make_napari_viewer, tmp_path):
    from napari_plugin._reader import napari_get_reader
    from napari_plugin._writer import write_labels_tiff, write_labels_zarr

    _, truth = load_sample()
    truth = truth.astype(np.int32)
    path = str(tmp_path / "labels.ome.zarr")
    write_labels_zarr(path, truth, {"name": "nuclei"})
    reader = napari_get_reader(path)
    (data, meta, kind), = reader(path)
    assert kind == "labels" and meta["name"] == "nuclei"
    assert np.array_equal(np.asarray(data[0]), truth)
    write_labels_tiff(str(tmp_path / "l.tif"), truth, {})
    (tdata, _, _), = napari_get_reader(str(tmp_path / "l.tif"))(str(tmp_path / "l.tif"))
    assert np.array_equal(np.asarray(tdata), truth)
    assert napari_get_reader(str(tmp_path / "nothing.xyz")) is None
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    assert napari_get_reader(str(tmp_path / "bad.tif")) is None


def test_reader_opens_a_cellmask_output_as_image_and_labels(make_napari_viewer, tmp_path):
    import cellmask
    from cellmask.io import write_ome_zarr

    image, truth = load_sample()
    store = tmp_path / "img.ome.zarr"
    write_ome_zarr(store, image, np.zeros_like(truth, dtype=np.int32), name="blank")
    cellmask.segment_zarr(store, tile=512, progress=False)  # adds labels/cellmask
    viewer = make_napari_viewer()
    layers = viewer.open(str(store), plugin="cellmask")
    kinds = {type(layer).__name__: layer for layer in layers}
    assert {"Image", "Labels"} <= set(kinds)
    names = [layer.name for layer in layers]
    assert "cellmask" in names and "blank" in names
    cm = [layer for layer in layers if layer.name == "cellmask"][0]
    assert cm.multiscale and "area" in cm.features.columns


def test_sample_data_and_docking_both_widgets(make_napari_viewer):
    from napari_plugin._train_widget import TrainWidget
    from napari_plugin._widget import SegmentWidget

    viewer = make_napari_viewer()
    viewer.open_sample("cellmask", "nuclei")
    assert viewer.layers["nuclei"].data.shape == (512, 512)
    viewer.window.add_dock_widget(SegmentWidget(viewer))
    viewer.window.add_dock_widget(TrainWidget(viewer))
    assert len(viewer.window._dock_widgets) >= 2


def test_train_widget_fine_tunes_and_saves(make_napari_viewer, qtbot, tmp_path):
    import cellmask
    from napari_plugin._train_widget import TrainWidget

    viewer = make_napari_viewer()
    image, truth = load_sample()
    viewer.add_image(image, name="img")
    viewer.add_labels(truth.astype(np.int32), name="annotation")
    widget = TrainWidget(viewer)
    widget.image.value = viewer.layers["img"]
    widget.labels.value = viewer.layers["annotation"]
    widget.iterations.value = 3
    widget.output.value = tmp_path / "tuned.safetensors"
    widget.train()
    qtbot.waitUntil(lambda: widget.saved is not None, timeout=120_000)
    model = cellmask.load_model(widget.saved, device="cpu")
    assert "fine_tuned_on" in model.meta


def test_measurements_dock_is_fast_readable_and_colours_by_a_column(make_napari_viewer):
    import time

    import pandas as pd

    from napari_plugin._measurements import MeasurementsWidget, format_number

    viewer = make_napari_viewer()
    n = 200_000
    labels = viewer.add_labels(np.arange(n, dtype=np.int32).reshape(400, 500) + 1)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"label": np.arange(1, n + 1), "area": rng.integers(20, 400, n),
                          "centroid-0": rng.uniform(0, 30000, n),
                          "centroid-1": rng.uniform(0, 30000, n),
                          "intensity_mean-0": rng.uniform(0, 1, n),
                          "intensity_mean-1": rng.uniform(0, 1, n),
                          "intensity_mean-2": rng.uniform(0, 1, n),
                          "touches_border": rng.uniform(0, 1, n) > 0.9})
    dock = MeasurementsWidget(viewer)
    t0 = time.perf_counter()
    dock.set_table(labels, table)
    assert time.perf_counter() - t0 < 3.0  # was 17 s with one widget item per cell
    assert dock.row_count() == n
    from qtpy.QtCore import Qt

    headers = [dock.model.headerData(c, Qt.Horizontal) for c in range(dock.model.columnCount())]
    assert {"intensity_mean-0", "intensity_mean-1", "intensity_mean-2"} <= set(headers)
    assert format_number(12345.0) == "12,345" and format_number(10234.56) == "10,234.6"
    assert format_number(0.12345) == "0.1235" and "e+" not in format_number(2.5e7)
    dock.model.sort(headers.index("area"), Qt.DescendingOrder)
    assert table.set_index("label").loc[dock._row_label(0), "area"] == table["area"].max()
    dock.colour_by_column("intensity_mean-1")
    shown = viewer.layers[f"{labels.name} by intensity_mean-1"]
    value = table.set_index("label")["intensity_mean-1"]
    np.testing.assert_allclose(np.asarray(shown.data)[7, 9], value[labels.data[7, 9]],
                               rtol=1e-6)
    dock.colour_by_column(None)
    assert f"{labels.name} by intensity_mean-1" not in viewer.layers


def test_cells_grown_in_the_widget_are_shown_under_the_nuclei(segment_widget, qtbot):
    from skimage.segmentation import expand_labels

    viewer, widget = segment_widget
    image, _ = load_sample()
    widget.image.value = viewer.add_image(image, name="sample")
    widget.pixel_size.value = 0.5
    widget.cell_expansion.value = 2.0  # 4 px
    widget.run()
    qtbot.waitUntil(lambda: widget.last_result_layer is not None, timeout=120_000)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    nuclei = np.asarray(viewer.layers["sample cellmask"].data)
    cells = np.asarray(viewer.layers["sample cells"].data)
    assert np.array_equal(cells, expand_labels(nuclei, 4.0))
    assert (cells > 0).sum() > 1.3 * (nuclei > 0).sum()
    names = [layer.name for layer in viewer.layers]
    assert names.index("sample cellmask") > names.index("sample cells")  # nuclei on top
    assert viewer.layers.selection.active.name == "sample cellmask"


def test_eight_views_in_the_widget_reach_the_run(segment_widget, qtbot, monkeypatch):
    from cellmask import pipeline

    seen = []
    real_run = pipeline.run
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: seen.append(k["model"]) or
                        real_run(*a, **k))
    viewer, widget = segment_widget
    image, truth = load_sample()
    widget.image.value = viewer.add_image(image, name="sample")
    widget.views.value = 8
    widget.run()
    qtbot.waitUntil(lambda: widget.last_result_layer is not None, timeout=120_000)
    assert seen[0].config.test_views == 8
    assert ap50(truth, np.asarray(viewer.layers["sample cellmask"].data)) >= 0.8
