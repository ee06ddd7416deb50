"""The measurements dock: a sortable per-object table linked both ways to a labels layer.

The table is shown through a Qt model over the DataFrame (``QAbstractTableModel``): Qt asks
only for the cells on screen, so 200,000 objects appear at once, without one widget item per
cell built on the GUI thread. Every column is shown (all channels and compartments), numbers
formatted for people (``12,345`` rather than ``1.234e+04``), and the labels can be coloured by
any numeric column (an image layer of the objects' values above the labels).
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QAbstractTableModel, QModelIndex, Qt
from qtpy.QtWidgets import (QComboBox, QFileDialog, QHBoxLayout, QLabel, QPushButton,
                            QTableView, QVBoxLayout, QWidget)

#: Columns shown first, when present; the others follow in the table's order.
FIRST = ("label", "area", "centroid-0", "centroid-1", "score", "mask_confidence")
#: Columns that only locate an object (kept in ``layer.features``, not shown).
HIDDEN = ("bbox-0", "bbox-1", "bbox-2", "bbox-3")


def format_number(value) -> str:
    """A value as people read it: integers with thousands separators, floats with 4
    significant digits but never in exponent notation between 1e-3 and 1e15."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not np.isfinite(v):
        return "" if np.isnan(v) else str(v)
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    if abs(v) >= 1000:
        return f"{v:,.1f}"
    if abs(v) >= 1e-3:
        return f"{v:.4g}"
    return f"{v:.3e}"


class TableModel(QAbstractTableModel):
    """A DataFrame as a Qt table model; sorting reorders a row index, not the data."""

    def __init__(self, table, columns: list[str]):
        super().__init__()
        self.table, self.columns = table, columns
        self.values = [table[c].to_numpy() for c in columns]
        self.order = np.arange(len(table))

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: N802 (Qt's name)
        return 0 if parent.isValid() else len(self.order)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.columns)

    def data(self, index, role=Qt.DisplayRole):
        if not index.isValid():
            return None
        value = self.values[index.column()][self.order[index.row()]]
        if role == Qt.DisplayRole:
            return format_number(value)
        if role == Qt.UserRole:
            return value.item() if hasattr(value, "item") else value
        if role == Qt.TextAlignmentRole:
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return None

    def headerData(self, section, orientation, role=Qt.DisplayRole):  # noqa: N802
        if role != Qt.DisplayRole:
            return None
        return self.columns[section] if orientation == Qt.Horizontal else str(section + 1)

    def sort(self, column: int, order=Qt.AscendingOrder) -> None:
        self.layoutAboutToBeChanged.emit()
        keys = self.values[column]
        self.order = np.argsort(keys, kind="stable")
        if order == Qt.DescendingOrder:
            self.order = self.order[::-1]
        self.layoutChanged.emit()

    def label_at(self, row: int) -> int:
        return int(self.table["label"].to_numpy()[self.order[row]])

    def row_of(self, label: int) -> int | None:
        rows = np.flatnonzero(self.table["label"].to_numpy()[self.order] == label)
        return int(rows[0]) if len(rows) else None


class MeasurementsWidget(QWidget):
    """Click a row: the label is selected and the camera centred on it. Select a label in the
    canvas: its row is highlighted. ``layer.features`` holds the table, so napari's own
    tooltips show the values. "colour by" shows the objects coloured by a column."""

    def __init__(self, viewer):
        super().__init__()
        self.viewer = viewer
        self.layer = None
        self.table = None
        self.model: TableModel | None = None
        self.info = QLabel("no measurements yet")
        self.view = QTableView()
        self.view.setMinimumHeight(260)
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QTableView.SelectRows)
        self.view.setEditTriggers(QTableView.NoEditTriggers)
        self.view.clicked.connect(lambda index: self.select_row(index.row()))
        self.colour_by = QComboBox()
        self.colour_by.addItem("colour by: label")
        self.colour_by.currentTextChanged.connect(self._colour_changed)
        export = QPushButton("Export CSV")
        export.clicked.connect(self._export_dialog)
        top = QHBoxLayout()
        top.addWidget(self.info)
        top.addWidget(self.colour_by)
        top.addWidget(export)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.view)
        self._colour_layer = None

    def set_table(self, layer, table) -> None:
        """Show ``table`` (a DataFrame with a ``label`` column) for ``layer``."""
        if self.layer is not None:
            self.layer.events.selected_label.disconnect(self._label_selected)
        self.layer = layer
        self.table = table.reset_index(drop=True)
        layer.features = self.table
        cols = [c for c in FIRST if c in self.table.columns]
        cols += [c for c in self.table.columns if c not in cols and c not in HIDDEN]
        self.model = TableModel(self.table, cols)
        self.view.setModel(self.model)
        self.info.setText(f"{len(self.table):,} objects in {layer.name}")
        self.colour_by.blockSignals(True)
        self.colour_by.clear()
        self.colour_by.addItem("colour by: label")
        numeric = [c for c in cols if c != "label"
                   and np.issubdtype(self.table[c].dtype, np.number)]
        self.colour_by.addItems(numeric)
        self.colour_by.blockSignals(False)
        layer.events.selected_label.connect(self._label_selected)

    def row_count(self) -> int:
        return 0 if self.model is None else self.model.rowCount()

    def _row_label(self, row: int) -> int:
        return self.model.label_at(row)

    def select_row(self, row: int, column: int = 0) -> None:
        """Select the row's label in the layer and centre the camera on the object."""
        if self.layer is None:
            return
        label = self._row_label(row)
        self.layer.selected_label = label
        self.view.selectRow(row)
        rec = self.table.loc[self.table["label"] == label].iloc[0]
        if "centroid-0" in rec:
            point = np.array([rec["centroid-0"], rec["centroid-1"]])
            world = point * np.asarray(self.layer.scale)[-2:] + \
                np.asarray(self.layer.translate)[-2:]
            self.viewer.camera.center = tuple(world)

    def _label_selected(self, event=None) -> None:
        row = self.model.row_of(int(self.layer.selected_label)) if self.model else None
        if row is not None:
            self.view.blockSignals(True)
            self.view.selectRow(row)
            self.view.blockSignals(False)

    def selected_labels(self) -> list[int]:
        rows = {i.row() for i in self.view.selectionModel().selectedIndexes()} \
            if self.view.selectionModel() else set()
        return sorted(self._row_label(r) for r in rows)

    def colour_by_column(self, column: str | None) -> None:
        """Show every object coloured by ``column``: an image layer above the labels whose
        pixels carry their object's value (viridis, 2-98th percentile), computed lazily for
        multiscale or dask labels. None removes it."""
        import dask.array as da

        if self.layer is None:
            return
        if self._colour_layer is not None and self._colour_layer in self.viewer.layers:
            self.viewer.layers.remove(self._colour_layer)
        self._colour_layer = None
        if column is None:
            return
        ids = self.table["label"].to_numpy(np.int64)
        values = self.table[column].to_numpy(np.float64)
        lookup = np.full(int(ids.max()) + 1 if len(ids) else 1, np.nan, np.float32)
        lookup[ids] = values

        def paint(block):
            block = np.asarray(block)
            inside = (block > 0) & (block < len(lookup))
            return np.where(inside, lookup[np.clip(block, 0, len(lookup) - 1)], np.nan)

        levels = self.layer.data if self.layer.multiscale else [self.layer.data]
        data = [da.map_blocks(paint, lv, dtype=np.float32) if isinstance(lv, da.Array)
                else paint(lv) for lv in levels]
        finite = values[np.isfinite(values)]
        lo, hi = (np.percentile(finite, [2, 98]) if len(finite) else (0.0, 1.0))
        self._colour_layer = self.viewer.add_image(
            data if self.layer.multiscale else data[0], multiscale=self.layer.multiscale,
            name=f"{self.layer.name} by {column}", colormap="viridis",
            contrast_limits=(float(lo), float(hi) if hi > lo else float(lo) + 1.0),
            scale=self.layer.scale, translate=self.layer.translate, opacity=0.85)

    def _colour_changed(self, text: str) -> None:
        self.colour_by_column(None if text.startswith("colour by") else text)

    def export_csv(self, path: str) -> None:
        self.table.to_csv(path, index=False)

    def _export_dialog(self) -> None:
        if self.table is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export measurements", "measurements.csv",
                                              "CSV (*.csv)")
        if path:
            self.export_csv(path)
