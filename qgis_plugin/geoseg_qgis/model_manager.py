"""The model manager: the user's runs and checkpoints with their model cards.

It lists what `models.list_models` finds (runs under the outputs folder, imported checkpoints,
zoo entries), shows each one's card (data, splits, classes with their colours, metrics per split,
bands, pixel size, intended use, limits), imports a checkpoint from a file and marks the one to
use, which Segment and Evaluate then preselect.
"""

from __future__ import annotations

from html import escape
from typing import Any

from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSplitter,
    QTextBrowser,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import models, settings
from .checkpoint_info import CheckpointError, hex_color
from .widgets import _miou

COLUMNS = ("Name", "Model", "Classes", "Quality", "Source")


def card_html(entry: models.ModelEntry) -> str:
    """The details pane: the model card (or the contract's part of it) as HTML."""
    info: dict[str, Any] = entry.info or entry.contract or {}
    rows = [("Checkpoint", entry.path or "(not downloaded)")]
    if entry.url:
        rows += [("Download", entry.url), ("sha256", entry.sha256)]
    if entry.error:
        rows.append(("Problem", entry.error))
    data = info.get("data")
    if isinstance(data, dict):
        data = ", ".join(f"{k}: {v}" for k, v in data.items())
    needs = info.get("needs_points")
    rows += [
        ("Model", info.get("model")),
        ("Data", data),
        ("Bands", ", ".join(info.get("bands", []))),
        ("Pixel size", f"{info['gsd']} m" if info.get("gsd") else None),
        ("Tile size", f"{info['tile_size']} px" if info.get("tile_size") else None),
        ("Reads LiDAR", None if needs is None else ("yes" if needs else "no")),
    ]
    splits = info.get("splits")
    if isinstance(splits, dict):
        rows.append(("Tiles", ", ".join(f"{k} {v}" for k, v in splits.items())))
    for key in ("intended_use", "limits", "created", "seed"):
        value = info.get(key)
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        if value is not None:
            rows.append((key.replace("_", " ").capitalize(), value))
    html = ["<table cellspacing=4>"]
    html += [
        f"<tr><td><b>{escape(k)}</b></td><td>{escape(str(v))}</td></tr>"
        for k, v in rows
        if v not in (None, "")
    ]
    html.append("</table><p><b>Classes</b><br>")
    for c in info.get("classes", []):
        color = hex_color(c.get("color", "#888888"))
        html.append(
            f"<span style='background:{color}'>&nbsp;&nbsp;&nbsp;&nbsp;</span> "
            f"{escape(str(c.get('value')))} {escape(str(c.get('name')))}<br>"
        )
    metrics = info.get("metrics") or {}
    if metrics:
        html.append("</p><p><b>Metrics</b> (pixels; kappa 0 = chance agreement)<br>")
        for split, values in metrics.items():
            if isinstance(values, dict):
                shown = _scores(values)
                base = values.get("baseline")
                if isinstance(base, dict):
                    shown += f"; baseline (always {base.get('predicts')}): {_scores(base)}"
                html.append(f"{escape(str(split))}: {escape(shown)}<br>")
    elif entry.available:
        html.append(
            "</p><p><i>No model card: evaluate this checkpoint, or retrain with a geoseg that "
            "writes model_card.json, to see its data and metrics here.</i>"
        )
    return "".join(html) + "</p>"


def _scores(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {values[k]:.3f}"
        for k in ("miou", "oa", "kappa")
        if isinstance(values.get(k), int | float)
    )


class ModelManagerDialog(QDialog):
    """List, inspect, import and choose models; `chosen(path)` when the user picks one."""

    chosen = pyqtSignal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("geoseg models")
        self.resize(900, 520)
        self.tree = QTreeWidget(self)
        self.tree.setHeaderLabels(COLUMNS)
        self.tree.setRootIsDecorated(False)
        self.tree.currentItemChanged.connect(self._show)
        self.tree.itemDoubleClicked.connect(lambda *_: self.use())
        self.details = QTextBrowser(self)
        split = QSplitter(Qt.Orientation.Horizontal, self)
        split.addWidget(self.tree)
        split.addWidget(self.details)
        split.setSizes([480, 420])
        self.status = QLabel(self)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        buttons = QHBoxLayout()
        self.import_button = QPushButton("Import checkpoint...", self)
        self.import_button.clicked.connect(lambda: self.import_file())
        self.use_button = QPushButton("Use this model", self)
        self.use_button.clicked.connect(self.use)
        self.forget_button = QPushButton("Remove from list", self)
        self.forget_button.clicked.connect(self.forget)
        close = QPushButton("Close", self)
        close.clicked.connect(self.close)
        for button in (self.import_button, self.use_button, self.forget_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addWidget(split, 1)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self.entries: list[models.ModelEntry] = []
        self.refresh()

    def refresh(self, select: str | None = None) -> None:
        select = select or settings.remembered("checkpoint")
        self.entries = models.list_models()
        self.tree.clear()
        current = None
        for entry in self.entries:
            info = entry.info or entry.contract or {}
            item = QTreeWidgetItem(
                [
                    entry.name,
                    str(info.get("model", "?")),
                    ", ".join(c["name"] for c in info.get("classes", [])),
                    _miou(info.get("metrics") or {}),
                    entry.source + ("" if entry.available or entry.url else " (unreadable)"),
                ]
            )
            self.tree.addTopLevelItem(item)
            if entry.path and entry.path == select:
                current = item
        for column in range(len(COLUMNS)):
            self.tree.resizeColumnToContents(column)
        if self.tree.topLevelItemCount():
            self.tree.setCurrentItem(current or self.tree.topLevelItem(0))
        else:
            self.details.setHtml(
                "<p>No models yet. Train one (toolbar: Train), or import a checkpoint "
                "(<code>RUN/checkpoints/last.ckpt</code> of a <code>geoseg train</code> run).</p>"
            )

    def selected(self) -> models.ModelEntry | None:
        index = self.tree.indexOfTopLevelItem(self.tree.currentItem())
        return self.entries[index] if 0 <= index < len(self.entries) else None

    def _show(self, *_: Any) -> None:
        entry = self.selected()
        self.details.setHtml(card_html(entry) if entry else "")
        self.use_button.setEnabled(bool(entry and entry.available))
        self.forget_button.setEnabled(bool(entry and entry.source in ("imported", "zoo")))

    def import_file(self, path: str | None = None) -> models.ModelEntry | None:
        """Import a checkpoint (asks for the file unless `path` is given)."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(
                self, "Import a geoseg checkpoint", "", "Checkpoints (*.ckpt)"
            )
        if not path:
            return None
        try:
            entry = models.import_checkpoint(path)
        except CheckpointError as exc:
            self.status.setText(f"not imported: {exc}")
            return None
        self.status.setText(f"imported {entry.name}")
        self.refresh(entry.path)
        return entry

    def use(self) -> None:
        entry = self.selected()
        if entry is None or not entry.available:
            return
        settings.remember("checkpoint", entry.path)
        self.status.setText(f"using {entry.name} in Segment and Evaluate")
        self.chosen.emit(entry.path)

    def forget(self) -> None:
        entry = self.selected()
        if entry is not None and entry.source in ("imported", "zoo"):
            models.forget(entry)
            self.refresh()
