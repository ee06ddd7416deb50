"""The "Train from annotations" widget: fine-tune a model on a painted or corrected labels layer.

Training runs in a ``thread_worker`` over :func:`cellmask.train.loop.train_steps`; Cancel stops
it with a checkpoint. The new weights are a ``.safetensors`` file the Segment widget can load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from magicgui.widgets import (ComboBox, Container, FileEdit, Label, ProgressBar, PushButton,
                              SpinBox)
from napari_plugin import import_torch_without_triton

import_torch_without_triton()  # before cellmask loads torch: see its docstring


class TrainWidget(Container):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=lambda w: self._layers("Image"))
        self.labels = ComboBox(label="annotation", choices=lambda w: self._layers("Labels"))
        self.init = FileEdit(label="start from (empty: shipped model)", filter="*.safetensors",
                             value="")
        self.iterations = SpinBox(label="iterations", value=200, min=1, max=100000)
        self.lr = ComboBox(label="learning rate", choices=["1e-4", "3e-4", "1e-3"], value="3e-4")
        self.output = FileEdit(label="save weights to", mode="w", filter="*.safetensors",
                               value="")
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="iterations")
        self.status = Label(value="")
        self.extend([self.image, self.labels, self.init, self.iterations, self.lr, self.output,
                     self.train_button, self.cancel_button, self.progress, self.status])
        self.train_button.changed.connect(self.train)
        self.cancel_button.changed.connect(lambda *_: self.worker and self.worker.quit())
        self.worker = None
        self.saved = None
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(lambda e: self.reset_choices())

    def _layers(self, kind: str):
        import napari.layers

        cls = getattr(napari.layers, kind)
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, cls)]

    def train(self, *_):
        from napari.qt.threading import thread_worker

        from cellmask.config import TrainConfig
        from cellmask.model.registry import resolve
        from cellmask.model.weights import load_weights, save_weights
        from cellmask.train.data import prepare_sample
        from cellmask.train.loop import train_steps

        image, labels = self.image.value, self.labels.value
        if image is None or labels is None:
            self.status.value = "choose an image and its annotation"
            return
        img = np.asarray(image.data[0] if image.multiscale else image.data)
        lab = np.asarray(labels.data[0] if labels.multiscale else labels.data).astype(np.int32)
        if img.shape[:2] != lab.shape:
            self.status.value = f"image {img.shape[:2]} and annotation {lab.shape} differ"
            return
        init = str(self.init.value)
        init = str(resolve("nuclei")) if init in ("", ".") else init
        _, model_cfg, _ = load_weights(init)
        out = str(self.output.value)
        if out in ("", "."):
            out = str(Path(tempfile.mkdtemp(prefix="cellmask-train-")) / "fine_tuned.safetensors")
        run_dir = Path(tempfile.mkdtemp(prefix="cellmask-run-"))
        crop = int(min(256, *lab.shape))
        cfg = TrainConfig(out=str(run_dir), iterations=self.iterations.value, batch_size=2,
                          crop=crop, lr=float(self.lr.value), warmup=min(20, self.iterations.value),
                          checkpoint_minutes=1e9)
        # the same modality and stain mapping as the Segment widget's runs
        samples = [prepare_sample(image.name, img, lab, model_cfg.norm_percentiles,
                                  second_stain=model_cfg.second_stain_weight,
                                  level=model_cfg.brightfield_level)]
        steps = train_steps(cfg, model_cfg, init=init, samples=samples)

        @thread_worker
        def work():
            for row in steps:
                if "weights" in row:
                    state, config, meta = load_weights(row["weights"])
                    meta = {k: v for k, v in meta.items() if k not in ("format", "config")}
                    meta["fine_tuned_on"] = f"napari layers {image.name} / {labels.name}"
                    return save_weights(out, state, config, meta)
                yield row

        self.worker = work()
        self.worker.yielded.connect(self._on_step)
        self.worker.returned.connect(self._on_saved)
        self.worker.errored.connect(lambda e: setattr(self.status, "value", f"error: {e}"))
        self.worker.aborted.connect(lambda: setattr(self.status, "value", "cancelled"))
        self.worker.finished.connect(self._on_finished)
        self.train_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max = cfg.iterations
        self.worker.start()

    def _on_step(self, row) -> None:
        self.progress.value = row["step"]
        self.status.value = f"step {row['step']}: loss {row['loss']:.3f}"

    def _on_saved(self, path) -> None:
        self.saved = Path(path)
        self.status.value = f"saved {path}: pick it as the Segment widget's weights file"

    def _on_finished(self) -> None:
        self.train_button.enabled = True
        self.cancel_button.enabled = False
        self.worker = None
