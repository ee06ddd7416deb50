"""napari plugin for cellmask: Segment and Train widgets, a measurements dock, a reader for
OME-Zarr / TIFF / SVS, labels writers, and sample data.

This package only wires :mod:`cellmask` to the viewer; the core never imports it (nor napari).
"""

import importlib.util
import sys


def import_torch_without_triton() -> None:
    """Import torch and torchvision with Triton hidden, then leave ``sys.modules`` as it was.

    With CUDA builds of PyTorch, importing torchvision's operators loads Triton's bundled LLVM.
    When napari has already created an OpenGL context on Mesa (software rendering, VMs, Xvfb),
    Mesa's own LLVM is loaded, and Triton's static constructors then crash the process
    (segmentation fault in llvm::DebugCounter). The plugin never compiles kernels, so while
    torch and torchvision load, Triton is marked unavailable; the mark is removed afterwards,
    so other code in the process imports Triton as it would without the plugin. Nothing is
    touched where Triton is not installed or already loaded, or torchvision's operators are
    (torch alone may be loaded already, by the user or another plugin: torchvision's import
    is the one that reaches Triton).
    """
    if "triton" in sys.modules or "torchvision.ops" in sys.modules \
            or importlib.util.find_spec("triton") is None:
        return
    sys.modules["triton"] = None  # type: ignore[assignment]
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        import torchvision.ops  # noqa: F401
    finally:
        if "triton" in sys.modules and sys.modules["triton"] is None:
            del sys.modules["triton"]
