"""Run one geoseg engine request in a subprocess (standard library only, no QGIS imports).

The engine lives in its own Python environment (torch, rasterio, ...) that QGIS's interpreter must
never import; this module starts `<engine python> -m geoseg.engine`, sends the request and relays
progress/log messages while it polls a cancel flag. Cancel interrupts the engine's whole process
group (like Ctrl+C, so finished work is kept) and kills it if it has not stopped after a grace
period.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal

# The engine is our own module, started with a fixed argv and no shell.
import subprocess  # nosec B404
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

from .protocol import PROTOCOL_VERSION, ProtocolError, decode, message

GRACE_S = 10.0
POLL_S = 0.1
INSTALL_FIX = "in the geoseg environment run: geoseg qgis install  (or set the engine in Settings)"
UPDATE_FIX = "update both sides: pip install -U geoseg && geoseg qgis install"


class EngineError(RuntimeError):
    """The engine could not run the request; `fix` is a command or step that helps, if any."""

    def __init__(self, text: str, code: str = "failed", fix: str | None = None) -> None:
        super().__init__(text)
        self.code, self.fix = code, fix

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\nFix: {self.fix}" if self.fix else text


def engine_argv(python: str) -> list[str]:
    """The engine command for an engine interpreter path (`-m`, so no console script needed)."""
    return [python, "-m", "geoseg.engine"]


def _pump(stream: IO[str], name: str, out: queue.Queue[tuple[str, str | None]]) -> None:
    for line in stream:
        out.put((name, line))
    out.put((name, None))


def _interrupt(proc: subprocess.Popen[str], sig: int) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)
        else:  # Windows: no process groups to signal
            proc.kill()
    except ProcessLookupError:
        pass  # already gone


def run_engine(
    python: str,
    request: dict[str, Any],
    on_message: Callable[[dict[str, Any]], None],
    is_cancelled: Callable[[], bool] = lambda: False,
    *,
    env: dict[str, str] | None = None,
    grace_s: float = GRACE_S,
) -> dict[str, Any]:
    """Run `request` in the engine at `python`; return its result message.

    Progress and log messages go to `on_message` (engine stderr lines arrive as warning logs).
    Raises EngineError: code "cancelled" after a cancel, "missing" when there is no engine,
    "protocol" for a version mismatch, "crash" when the engine died without an answer, or the
    engine's own error code.
    """
    if not python or not (os.path.isfile(python) or shutil.which(python)):
        raise EngineError(f"no geoseg engine at {python!r}", "missing", INSTALL_FIX)
    proc = subprocess.Popen(  # nosec B603
        engine_argv(python),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        start_new_session=True,
    )
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    for stream, name in ((proc.stdout, "out"), (proc.stderr, "err")):
        threading.Thread(target=_pump, args=(stream, name, lines), daemon=True).start()
    try:
        proc.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    except BrokenPipeError:
        pass  # died at start; its stderr says why
    reply, tail, open_streams = None, deque(maxlen=20), 2
    deadline: float | None = None
    problem: EngineError | None = None
    while open_streams:
        if deadline is None and (is_cancelled() or problem):
            _interrupt(proc, signal.SIGINT)
            deadline = time.monotonic() + grace_s
        elif deadline is not None and time.monotonic() > deadline:
            _interrupt(proc, signal.SIGKILL)
        try:
            name, line = lines.get(timeout=POLL_S)
        except queue.Empty:
            continue
        if line is None:
            open_streams -= 1
        elif name == "err":
            tail.append(line.rstrip())
            on_message(message("log", level="warning", message=line.rstrip()))
        else:
            try:
                msg = decode(line)
            except ProtocolError as exc:
                problem = problem or EngineError(
                    f"incompatible engine: {exc}", "protocol", UPDATE_FIX
                )
                continue
            if msg is None:
                continue  # noise that slipped onto stdout
            if msg["type"] in ("result", "error"):
                reply = msg
            else:
                on_message(msg)
    code = proc.wait()
    if problem:
        raise problem
    if is_cancelled():
        raise EngineError("cancelled; the engine was stopped (finished work is kept)", "cancelled")
    if reply is None:
        last = next((x for x in reversed(tail) if x.strip()), f"exit code {code}")
        if "No module named geoseg" in last:
            raise EngineError(f"{python} has no geoseg installed", "missing", INSTALL_FIX)
        raise EngineError(f"the engine stopped without an answer: {last}", "crash")
    if reply["type"] == "error":
        fix = reply.get("fix") or (UPDATE_FIX if reply.get("code") == "protocol" else None)
        raise EngineError(reply.get("message", "engine error"), reply.get("code", "failed"), fix)
    return reply


__all__ = ["PROTOCOL_VERSION", "EngineError", "engine_argv", "run_engine"]
