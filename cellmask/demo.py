"""The demo: segment the shipped sample with the shipped model and write every kind of output."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cellmask.errors import OutputConflict
from cellmask.io import write_ome_zarr
from cellmask.measure import measure
from cellmask.metrics import Evaluation
from cellmask.model.segmenter import load_model
from cellmask.overlay import save_overlay
from cellmask.samples import load_sample

log = logging.getLogger(__name__)

#: File the demo leaves in its ``sample.ome.zarr``, so that it only ever replaces its own.
DEMO_MARK = ".cellmask-demo"


@dataclass(frozen=True)
class DemoResult:
    objects: int
    seconds: float
    ap50: float
    zarr: Path
    csv: Path
    png: Path


def run_demo(out: str | Path = "demo_output", model: str = "nuclei",
             device: str = "auto") -> DemoResult:
    """Write ``OUT/sample.ome.zarr`` (image + labels/cellmask), ``OUT/measurements.csv`` and
    ``OUT/overlay.png``; an earlier demo output in ``OUT`` is replaced (it carries the demo's
    mark), anything else there is refused."""
    out = Path(out)
    for name in ("sample.ome.zarr", "measurements.csv", "overlay.png"):
        path = out / name
        if path.exists() and not (out / "sample.ome.zarr" / DEMO_MARK).exists():
            raise OutputConflict(f"{path} exists and is not an earlier demo output: the demo "
                                 "never replaces your files; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    image, truth = load_sample()
    m = load_model(model, device=device)
    t0 = time.perf_counter()
    labels = m.segment(image)
    seconds = time.perf_counter() - t0
    ev = Evaluation()
    ev.add(truth, labels)
    zarr_path = out / "sample.ome.zarr"
    if zarr_path.exists():
        import shutil

        shutil.rmtree(zarr_path)
    write_ome_zarr(zarr_path, image, labels)
    (zarr_path / DEMO_MARK).write_text("written by cellmask demo; replaced by the next demo\n")
    csv = out / "measurements.csv"
    measure(labels, image).to_csv(csv, index=False)
    png = save_overlay(out / "overlay.png", image, labels)
    return DemoResult(int(labels.max()), seconds, ev.summary()["ap@0.50"], zarr_path, csv, png)
