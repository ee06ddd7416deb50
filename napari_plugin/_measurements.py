"""The measurements dock: a sortable per-object table linked both ways to a labels layer."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QPushButton, QTableWidget,
                            QTableWidgetItem, QVBoxLayout, QWidget)

COLUMNS = ("label", "area", "centroid-0", "centroid-1", "intensity_mean", "eccentricity",
           "solidity", "perimeter")


class _NumberItem(QTableWidgetItem):
    """Sorts by value, not by text."""

    def __lt__(self, other):
        return self.data(Qt.UserRole) < other.data(Qt.UserRole)


class MeasurementsWidget(QWidget):
    """Click a row: the label is selected and the camera centred on it. Select a label in the
    canvas: its row is highlighted. ``layer.features`` holds the table, so napari's own
    tooltips show the values."""

    def __init__(self, viewer):
        super().__init__()
        self.viewer = viewer
        self.layer = None
        self.table = None
        self.info = QLabel("no measurements yet")
        self.view = QTableWidget()
        self.view.setMinimumHeight(260)
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QTableWidget.SelectRows)
        self.view.setEditTriggers(QTableWidget.NoEditTriggers)
        self.view.cellClicked.connect(self.select_row)
        export = QPushButton("Export CSV")
        export.clicked.connect(self._export_dialog)
        top = QHBoxLayout()
        top.addWidget(self.info)
        top.addWidget(export)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.view)

    def set_table(self, layer, table) -> None:
        """Show ``table`` (a DataFrame with a ``label`` column) for ``layer``."""
        if self.layer is not None:
            self.layer.events.selected_label.disconnect(self._label_selected)
        self.layer = layer
        self.table = table.reset_index(drop=True)
        layer.features = self.table
        cols = [c for c in COLUMNS if c in self.table.columns] or list(self.table.columns)
        self.view.setSortingEnabled(False)
        self.view.clear()
        self.view.setColumnCount(len(cols))
        self.view.setRowCount(len(self.table))
        self.view.setHorizontalHeaderLabels(cols)
        values = self.table[cols].to_numpy()
        for r in range(values.shape[0]):
            for c, v in enumerate(values[r]):
                item = _NumberItem(f"{v:.4g}" if isinstance(v, float) else str(v))
                item.setData(Qt.UserRole, float(v))
                self.view.setItem(r, c, item)
        self.view.setSortingEnabled(True)
        self.info.setText(f"{len(self.table)} objects in {layer.name}")
        layer.events.selected_label.connect(self._label_selected)

    def _row_label(self, row: int) -> int:
        return int(self.view.item(row, 0).data(Qt.UserRole))

    def select_row(self, row: int, column: int = 0) -> None:
        """Select the row's label in the layer and centre the camera on the object."""
        if self.layer is None:
            return
        label = self._row_label(row)
        self.layer.selected_label = label
        rec = self.table.loc[self.table["label"] == label].iloc[0]
        if "centroid-0" in rec:
            point = np.array([rec["centroid-0"], rec["centroid-1"]])
            world = point * np.asarray(self.layer.scale)[-2:] + \
                np.asarray(self.layer.translate)[-2:]
            self.viewer.camera.center = tuple(world)

    def _label_selected(self, event=None) -> None:
        label = int(self.layer.selected_label)
        for row in range(self.view.rowCount()):
            if self._row_label(row) == label:
                self.view.blockSignals(True)
                self.view.selectRow(row)
                self.view.blockSignals(False)
                return

    def selected_labels(self) -> list[int]:
        return sorted({self._row_label(i.row()) for i in self.view.selectedIndexes()})

    def export_csv(self, path: str) -> None:
        self.table.to_csv(path, index=False)

    def _export_dialog(self) -> None:
        if self.table is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export measurements", "measurements.csv",
                                              "CSV (*.csv)")
        if path:
            self.export_csv(path)
