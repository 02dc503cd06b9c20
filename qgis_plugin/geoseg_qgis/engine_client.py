"""Talk to geoseg engine processes (standard library only, no QGIS imports).

The engine lives in its own Python environment (torch, rasterio, ...) that QGIS's interpreter must
never import; `EngineProcess` starts `<engine python> -m geoseg.engine`, sends requests one after
another and relays progress/log messages while it polls a cancel flag. `WARM` is the session's one
persistent engine: started on first use, reused while it lives (torch imported once, the last
model and index kept loaded), restarted after a crash or a cancel, closed with QGIS. A job that
arrives while the warm engine is busy gets a one-shot engine of its own.

Cancel interrupts the engine's whole process group (like Ctrl+C, so finished work is kept) and
kills it if it has not stopped after a grace period. A result that arrives before the engine
has stopped is kept: the work finished before the cancel took effect.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import re
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
CLOSE_S = 5.0
POLL_S = 0.1
INSTALL_FIX = "in the geoseg environment run: geoseg qgis install  (or set the engine in Settings)"
UPDATE_FIX = "update both sides: pip install -U geoseg && geoseg qgis install"
NO_GEOSEG = re.compile(r"No module named '?geoseg(\.engine)?'?")

Relay = Callable[[dict[str, Any]], None]


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


class EngineProcess:
    """One engine subprocess that answers requests one after another until `close()`."""

    def __init__(self, python: str, env: dict[str, str] | None = None) -> None:
        if not python or not (os.path.isfile(python) or shutil.which(python)):
            raise EngineError(f"no geoseg engine at {python!r}", "missing", INSTALL_FIX)
        self.python = python
        self.proc = subprocess.Popen(  # nosec B603
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
        self.lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.open_streams = 2
        self.reusable = True
        self.served = 0
        self.pumps = [
            threading.Thread(target=_pump, args=(stream, name, self.lines), daemon=True)
            for stream, name in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))
        ]
        for pump in self.pumps:
            pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.open_streams == 2 and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        try:
            if hasattr(os, "killpg"):
                os.killpg(self.proc.pid, sig)
            else:  # Windows: no process groups to signal
                self.proc.kill()
        except (ProcessLookupError, PermissionError):
            pass  # already gone

    def _drain(self) -> None:
        """Drop lines left over from the previous request (late stderr), keep stream ends."""
        while True:
            try:
                _, line = self.lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self.open_streams -= 1

    def request(
        self,
        req: dict[str, Any],
        on_message: Relay,
        is_cancelled: Callable[[], bool] = lambda: False,
        *,
        last: bool = False,
        grace_s: float = GRACE_S,
    ) -> dict[str, Any]:
        """Send `req` and wait for its result (see `run_engine`); `last` closes stdin after it."""
        if self.served:
            self._drain()
        self.served += 1
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            if last:
                self.proc.stdin.close()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError, ValueError):
            pass  # died at start or earlier; its stderr says why
        reply, tail = None, deque(maxlen=20)
        deadline: float | None = None
        problem: EngineError | None = None
        while reply is None and self.open_streams:
            if deadline is None and (is_cancelled() or problem):
                self.reusable = False  # an interrupted engine answers and exits
                self._signal(signal.SIGINT)
                deadline = time.monotonic() + grace_s
            elif deadline is not None and time.monotonic() > deadline:
                self._signal(signal.SIGKILL)
            try:
                name, line = self.lines.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if line is None:
                self.open_streams -= 1
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
        if problem:
            self.reusable = False
            raise problem
        if reply is not None and reply["type"] == "result":
            return reply  # finished before a cancel could stop it: the work is kept
        if deadline is not None or (reply is None and is_cancelled()):
            raise EngineError(
                "cancelled; the engine was stopped (finished work is kept)", "cancelled"
            )
        if reply is None:
            self.reusable = False
            self.close()
            last_line = next((x for x in reversed(tail) if x.strip()), None)
            if last_line and NO_GEOSEG.search(last_line):
                raise EngineError(
                    f"{self.python} has no geoseg installed ({last_line.strip()})",
                    "missing",
                    INSTALL_FIX,
                )
            last_line = last_line or f"exit code {self.proc.returncode}"
            raise EngineError(f"the engine stopped without an answer: {last_line}", "crash")
        fix = reply.get("fix") or (UPDATE_FIX if reply.get("code") == "protocol" else None)
        raise EngineError(reply.get("message", "engine error"), reply.get("code", "failed"), fix)

    def close(self, timeout_s: float = CLOSE_S) -> None:
        """Let the engine finish (stdin closed = no more requests), kill it if it lingers, end
        what it left running in its process group (data-loader or dask workers), and release
        its pipes."""
        if self.proc.stdin and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)
        self._signal(signal.SIGKILL)
        self.proc.wait()
        for pump in self.pumps:
            pump.join(timeout=timeout_s)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def run_engine(
    python: str,
    request: dict[str, Any],
    on_message: Relay,
    is_cancelled: Callable[[], bool] = lambda: False,
    *,
    env: dict[str, str] | None = None,
    grace_s: float = GRACE_S,
) -> dict[str, Any]:
    """Run `request` in a fresh one-shot engine at `python`; return its result message.

    Progress and log messages go to `on_message` (engine stderr lines arrive as warning logs).
    Raises EngineError: code "cancelled" after a cancel that stopped the job, "missing" when
    there is no engine, "protocol" for a version mismatch, "crash" when the engine died without
    an answer, or the engine's own error code.
    """
    engine = EngineProcess(python, env)
    try:
        return engine.request(request, on_message, is_cancelled, last=True, grace_s=grace_s)
    finally:
        engine.close(timeout_s=grace_s)


class WarmEngine:
    """The session's persistent engine (one per QGIS process), shared by every job.

    It is keyed by interpreter and device: changing either in Settings starts a new one.
    """

    def __init__(self) -> None:
        self._busy = threading.Lock()
        self._engine: EngineProcess | None = None
        self._key: tuple[str, str] | None = None

    @property
    def pid(self) -> int | None:
        """The warm engine's process id while it lives (tests, diagnostics)."""
        engine = self._engine
        return engine.pid if engine is not None and engine.alive() else None

    def run(
        self,
        python: str,
        request: dict[str, Any],
        on_message: Relay,
        is_cancelled: Callable[[], bool] = lambda: False,
        *,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """`run_engine` on the warm engine, or on a one-shot one while the warm one is busy."""
        if not self._busy.acquire(blocking=False):
            return run_engine(python, request, on_message, is_cancelled, env=env)
        try:
            key = (python, str(request.get("device", "auto")))
            if self._engine is None or not self._engine.alive() or self._key != key:
                self._close_engine()
                self._engine, self._key = EngineProcess(python, env), key
            engine = self._engine
            try:
                return engine.request(request, on_message, is_cancelled)
            finally:
                if not (engine.reusable and engine.alive()):  # crashed, cancelled, mismatched
                    self._close_engine()
        finally:
            self._busy.release()

    def _close_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def close(self) -> None:
        """Stop the warm engine (QGIS quits, the plugin unloads); a later job starts a new one."""
        got = self._busy.acquire(timeout=CLOSE_S)  # a running job finishes its request first
        try:
            self._close_engine()
        finally:
            if got:
                self._busy.release()


WARM = WarmEngine()
atexit.register(WARM.close)

__all__ = [
    "PROTOCOL_VERSION",
    "WARM",
    "EngineError",
    "EngineProcess",
    "WarmEngine",
    "engine_argv",
    "run_engine",
]
