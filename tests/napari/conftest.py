import os
import shutil

import pytest

# napari needs a real X display here: Qt's offscreen platform cannot create its OpenGL canvas.
# pytest-xvfb starts Xvfb for the session; without Xvfb (or a display) these tests are skipped
# rather than aborting the whole run (xcb with no display kills the process).
HAVE_DISPLAY = bool(shutil.which("Xvfb") or os.environ.get("DISPLAY"))
if HAVE_DISPLAY:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")


def pytest_collection_modifyitems(config, items):
    if HAVE_DISPLAY:
        return
    skip = pytest.mark.skip(reason="no X display and no Xvfb (apt-get install xvfb)")
    for item in items:
        if "napari" in str(item.fspath):
            item.add_marker(skip)
