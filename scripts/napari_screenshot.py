"""Render docs/napari.png: the viewer with the Segment widget, a segmented sample and the
measurements dock. Needs a display: run under Xvfb, e.g.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/napari_screenshot.py
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")

import napari  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_plugin._widget import SegmentWidget  # noqa: E402


def main(out: str = "docs/napari.png") -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 900)
    viewer.open_sample("cellmask", "nuclei")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment nuclei", area="right")
    widget.image.value = viewer.layers["nuclei"]
    widget.run()
    deadline = time.time() + 300
    while widget.last_result_layer is None and time.time() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    if widget.last_result_layer is None:
        sys.exit("segmentation did not finish")
    widget.measurements.select_row(0)
    viewer.reset_view()
    viewer.layers["nuclei annotation"].visible = False
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(out, canvas_only=False)
    print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
