"""napari plugin for cellmask: Segment and Train widgets, a measurements dock, a reader for
OME-Zarr / TIFF / SVS, labels writers, and sample data.

This package only wires :mod:`cellmask` to the viewer; the core never imports it (nor napari).
"""

import sys

# With CUDA builds of PyTorch, importing torchvision's operators loads Triton's bundled LLVM.
# When napari has already created an OpenGL context on Mesa (software rendering, VMs, Xvfb),
# Mesa's own LLVM is loaded, and Triton's static constructors then crash the process
# (segmentation fault in llvm::DebugCounter). The plugin never compiles kernels, so inside the
# viewer Triton is marked unavailable before torch looks for it; torch then runs without it.
if "triton" not in sys.modules and "torch._dynamo" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]
