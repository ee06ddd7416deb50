"""The "Segment nuclei" widget.

Every run goes through :func:`cellmask.pipeline.run` in a ``thread_worker``, tile by tile, so the
viewer stays responsive and Cancel stops at the next tile (a second or two). Small images come
back as an in-memory Labels layer; large, dask or multiscale ones stay on disk in an OME-Zarr
(chosen, or temporary) and are shown lazily as a multiscale Labels layer. The result is bound to
the layer that was segmented when Run was pressed, whatever is selected later.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
from magicgui.widgets import (ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar,
                              PushButton, SpinBox)

from cellmask.appearance import MODALITIES
from cellmask.model.registry import DEFAULT, MODELS
from napari_plugin import import_torch_without_triton

import_torch_without_triton()  # before cellmask loads torch: see its docstring

log = logging.getLogger(__name__)

#: Images up to this many pixels (and not multiscale or dask) are loaded as in-memory labels.
IN_MEMORY_PIXELS = 4096 * 4096


class SegmentWidget(Container):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.model_name = ComboBox(label="model", choices=list(MODELS), value=DEFAULT)
        self.modality = ComboBox(label="modality", choices=list(MODALITIES), value="auto")
        self.pixel_size = FloatSpinBox(label="pixel size (um, 0 = from the layer/none)",
                                       value=0.0, min=0.0, max=100.0, step=0.01)
        self.weights = FileEdit(label="or weights file", filter="*.safetensors", value="")
        self.diameter = FloatSpinBox(label="diameter (px, 0 = as trained)", value=0.0, min=0.0,
                                     max=2000.0)
        self.cell_expansion = FloatSpinBox(label="cells: grow nuclei by (um, 0 = nuclei only)",
                                           value=0.0, min=0.0, max=100.0, step=0.5)
        self.views = ComboBox(label="views per tile (more: finer outlines, slower)",
                              choices=[1, 2, 4, 8], value=1)
        self.tile = SpinBox(label="tile", value=1024, min=128, max=8192, step=128)
        self.halo = SpinBox(label="halo (px, -1 = from the model)", value=-1, min=-1,
                            max=1024, step=16)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda"], value="auto")
        self.output = FileEdit(label="OME-Zarr for large images (empty: temporary)", mode="w",
                               value="")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="tiles")
        self.status = Label(value="")
        self.extend([self.image, self.model_name, self.weights, self.modality, self.diameter,
                     self.pixel_size, self.cell_expansion, self.views, self.tile,
                     self.halo, self.device, self.output, self.run_button, self.cancel_button,
                     self.progress, self.status])
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.worker = None
        self._events = None
        self.last_result_layer = None
        self._models: dict = {}
        self._measurements = None
        #: temporary outputs by labels path, removed when no layer shows them any more
        self._temporary: dict[str, tempfile.TemporaryDirectory] = {}
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(lambda e: self.image.reset_choices())
        self.viewer.layers.events.removed.connect(self._release_temporary)
        self.image.reset_choices()

    def _image_layers(self, widget=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _model(self):
        from cellmask import load_model

        key = (str(self.weights.value) if str(self.weights.value) not in ("", ".")
               else self.model_name.value, self.device.value)
        if key not in self._models:
            self._models[key] = load_model(key[0], device=key[1])
        return self._models[key]

    def run(self, *_):
        from napari.qt.threading import thread_worker

        from cellmask.pipeline import SegmentationResult, run

        layer = self.image.value
        if layer is None:
            self.status.value = "add an image layer first"
            return
        data = layer.data[0] if layer.multiscale else layer.data
        lazy = layer.multiscale or not isinstance(data, np.ndarray)
        small = not lazy and data.shape[0] * data.shape[1] <= IN_MEMORY_PIXELS
        out = str(self.output.value)
        if out in ("", "."):  # a new folder per run: an earlier result may still be shown
            tmp = tempfile.TemporaryDirectory(prefix="cellmask-")
            out = str(Path(tmp.name) / "labels.ome.zarr")
            self._temporary[str(Path(out) / "labels" / "cellmask")] = tmp
        model = self._model()
        if self.views.value != model.config.test_views:  # shares the loaded weights
            model = model.with_config(test_views=self.views.value)
        kwargs = dict(model=model, tile=self.tile.value,
                      halo=self.halo.value if self.halo.value >= 0 else None,
                      axes="YXS" if layer.rgb else "YX", modality=self.modality.value)
        if self.diameter.value > 0:
            kwargs["diameter"] = self.diameter.value
        if self.pixel_size.value > 0:
            kwargs["pixel_size"] = self.pixel_size.value
        if self.cell_expansion.value > 0:  # needs a pixel size: the layer's or the one given
            kwargs["cell_expansion"] = self.cell_expansion.value
        events = run(data, out, **kwargs)

        @thread_worker
        def work():
            for event in events:
                if isinstance(event, SegmentationResult):
                    return event
                yield event

        self._events = events
        self.worker = work()
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(lambda result: self._show(result, layer, small))
        self.worker.errored.connect(self._on_error)
        self.worker.aborted.connect(lambda: setattr(self.status, "value", "cancelled"))
        self.worker.finished.connect(self._on_finished)
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"segmenting {layer.name}..."
        self.worker.start()

    def _release_temporary(self, *_) -> None:
        """Delete temporary outputs that no layer reads any more (never one still shown)."""
        shown = {layer.metadata.get("cellmask_path") for layer in self.viewer.layers}
        running = self.worker is not None
        for path in list(self._temporary):
            if path not in shown and not running:
                self._temporary.pop(path).cleanup()

    def cancel(self, *_):
        if self.worker is not None:
            self.worker.quit()

    def _on_progress(self, event) -> None:
        if event.stage == "tiles":
            self.progress.max = event.total
            self.progress.value = event.done
            self.status.value = f"{event.done}/{event.total} tiles, {event.objects} objects"

    def _on_error(self, err) -> None:
        self.status.value = f"error: {err}"
        log.error("segmentation failed: %s", err)

    def _on_finished(self) -> None:
        # a cancelled worker leaves the run suspended at a tile: end it now (its lock, threads
        # and files are released) before Run can be pressed again
        if self._events is not None:
            self._events.close()
            self._events = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.worker = None

    def _show(self, result, layer, small: bool) -> None:
        import dask.array as da
        import zarr

        def read(group_path):
            if small:
                return np.asarray(zarr.open_array(str(group_path / "0"), mode="r")), False
            group = zarr.open_group(str(group_path), mode="r")
            return [da.from_zarr(group[p]) for p in ("0", "1", "2")], True

        # nuclei, and the cells grown from them when asked (labels/<name>_cells, same ids)
        shown = [(f"{layer.name} cellmask", Path(result.path))]
        cells = Path(result.path).parent / f"{Path(result.path).name}_cells"
        if (cells / "0").exists():
            shown.append((f"{layer.name} cells", cells))
        layers_data = [(name, *read(path)) for name, path in shown]
        for name, _, _ in layers_data:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        if small:  # in memory now: its temporary folder is not needed
            tmp = self._temporary.pop(str(result.path), None)
            if tmp is not None:
                tmp.cleanup()
        added = []
        for name, data, multiscale in layers_data:  # nuclei first; moved on top below
            added.append(self.viewer.add_labels(
                data, name=name, multiscale=multiscale, scale=layer.scale[-2:],
                translate=layer.translate[-2:], opacity=0.4 if added else 0.7,
                metadata={"cellmask_source": layer.name, "cellmask_path": str(result.path)}))
        labels = added[0]
        if len(added) > 1:
            self.viewer.layers.move(self.viewer.layers.index(labels),
                                    len(self.viewer.layers))
            self.viewer.layers.selection.active = labels
        self.last_result_layer = labels
        self.status.value = f"{result.objects} objects in {layer.name}"
        if result.table is not None:
            self.measurements.set_table(labels, result.table)

    @property
    def measurements(self):
        from napari_plugin._measurements import MeasurementsWidget

        if self._measurements is None:
            self._measurements = MeasurementsWidget(self.viewer)
            self.viewer.window.add_dock_widget(self._measurements, name="cellmask measurements",
                                               area="right")
        return self._measurements
