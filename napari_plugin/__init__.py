"""napari plugin for cellmask (widgets, reader, writer and sample data are being built).

The core package never imports napari; this package only wires the core to the viewer.
"""
