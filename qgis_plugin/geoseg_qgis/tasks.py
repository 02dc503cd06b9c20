"""Run a geoseg algorithm as a QGIS background task and hand its outcome to the GUI.

Every plugin window (Segment, Train, Evaluate, the search dock, Diagnostics) runs its work this
way, so each shows the same things: real percentages from the engine's progress messages, the
stage, one error message with its cause and fix, and results finished before a cancel (kept).
The task never touches widgets; the feedback's signals reach them queued on the GUI thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsProcessingAlgRunnerTask,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProject,
)
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject, pyqtSignal

Params = dict[str, Any]


class Feedback(QgsProcessingFeedback):
    """Processing feedback that also signals the stage and keeps the errors it was given."""

    stageChanged = pyqtSignal(str)

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    def setProgressText(self, text: str) -> None:
        super().setProgressText(text)
        self.stageChanged.emit(text)

    def reportError(self, error: str, fatalError: bool = False) -> None:
        super().reportError(error, fatalError)
        self.errors.append(error)


class Outcome:
    """What a finished run left: results (possibly finished before a cancel) or an error."""

    def __init__(self, ok: bool, results: Params, feedback: Feedback) -> None:
        self.cancelled = feedback.isCanceled()
        # A run cancelled after its engine answered still has its results: keep them.
        self.ok = ok or (self.cancelled and bool(results))
        self.results = results if self.ok else {}
        self.error = "" if self.ok else _message(feedback)


def _message(feedback: Feedback) -> str:
    if feedback.isCanceled():
        return "cancelled; finished work is kept (rerun to resume)"
    return feedback.errors[-1].strip() if feedback.errors else "failed; see the log"


class AlgorithmRun:
    """One background run of `geoseg:<name>`; `done(outcome)` is called on the GUI thread."""

    def __init__(
        self,
        name: str,
        params: Params,
        done: Callable[[Outcome], None],
        progress: Callable[[float], None] | None = None,
        stage: Callable[[str], None] | None = None,
    ) -> None:
        registry = QgsApplication.processingRegistry()
        self.algorithm = registry.createAlgorithmById(f"geoseg:{name}")
        self.context = QgsProcessingContext()
        self.context.setProject(QgsProject.instance())
        self.feedback = Feedback()
        if progress is not None:
            self.feedback.progressChanged.connect(progress)
        if stage is not None:
            self.feedback.stageChanged.connect(stage)
        self.params, self._done = params, done
        self.task: QgsProcessingAlgRunnerTask | None = None

    def check(self) -> str:
        """The algorithm's own checks (checkpoint, parameter values): "" when all is well."""
        ok, problem = self.algorithm.checkParameterValues(self.params, self.context)
        return "" if ok else problem

    def start(self) -> None:
        self.task = QgsProcessingAlgRunnerTask(
            self.algorithm, self.params, self.context, self.feedback
        )
        self.task.executed.connect(self._executed)
        QgsApplication.taskManager().addTask(self.task)

    def cancel(self) -> None:
        self.feedback.cancel()

    def _executed(self, ok: bool, results: Params) -> None:
        self.task = None
        window = getattr(self._done, "__self__", None)
        if isinstance(window, QObject) and sip.isdeleted(window):
            return  # its window was closed and deleted while it ran (the plugin unloaded)
        self._done(Outcome(ok, dict(results or {}), self.feedback))
