"""`python -m geoseg.engine`: run one protocol request for an outside client.

The engine sits above the CLI (it imports `geoseg.cli`; the CLI never imports it).

The QGIS plugin cannot import torch or geoseg in QGIS's own Python (their native libraries crash
it), so it starts this module in the geoseg environment and speaks `geoseg.protocol` to it. The
request names a geoseg command and its options; the engine runs that very click command (no twin
logic), turns tqdm bars into progress messages, Python-level output into log messages and the
command's outcome into one result or error message.

The protocol gets a private copy of the original stdout; fd 1 itself is pointed at stderr, so
whatever native code prints lands there and never in the protocol stream. SIGINT/SIGTERM cancel
the job like Ctrl+C does (builds and training keep what they finished and resume on rerun).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from geoseg.errors import first_line
from geoseg.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode,
    encode,
    message,
)

# Commands a client must not run through the engine: they touch QGIS.
NOT_OPS = frozenset({"qgis"})
EXIT_CODES = {"bad_input": 2, "failed": 1, "cancelled": 130, "protocol": 2, "crash": 3}
# Files of a finished op worth reporting, relative to its --out folder.
OUT_FILES = {
    "build-dataset": {"tiles": "tiles.geojson", "report": "report.md"},
    "train": {"checkpoint": "checkpoints/last.ckpt", "config": "config.yaml"},
    "evaluate": {"metrics": "metrics.json"},
}
PROGRESS_INTERVAL_S = 0.5
CLI_ERROR = "geoseg: error: "

Emit = Callable[[dict[str, Any]], None]


def last_error_path() -> Path:
    """Where the engine keeps its last error for `diagnostics` (per user, survives restarts)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "geoseg" / "engine-last-error.json"


class _LogLines(io.TextIOBase):
    """A text stream that turns each written line into a log message and remembers the last few.

    Splits on carriage returns too, so tqdm-style redraws become separate lines.
    """

    def __init__(self, emit: Emit, level: str, fd: int) -> None:
        super().__init__()
        self._emit, self._level, self._fd = emit, level, fd
        self._partial = ""
        self.tail: deque[str] = deque(maxlen=50)

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.replace("\r", "\n").split("\n")
        for line in lines:
            if line.strip():
                self.tail.append(line)
                self._emit(message("log", level=self._level, message=line))
        return len(text)

    def flush(self) -> None:
        """Lines are sent when complete; a partial line waits for its newline."""

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


def _channel() -> Emit:
    """Move the real stdout aside for the protocol and point fd 1 at stderr."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    lock = threading.Lock()

    def emit(msg: dict[str, Any]) -> None:
        with lock:
            stream.write(encode(msg))
            stream.flush()

    return emit


def _report_progress(emit: Emit, default_stage: str) -> None:
    """Make every tqdm bar in this process send progress messages instead of drawing itself."""
    from tqdm import std

    sent: dict[int, float] = {}

    def display(bar: std.tqdm, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        done = bool(bar.total) and bar.n >= bar.total
        if not done and now - sent.get(id(bar), 0.0) < PROGRESS_INTERVAL_S:
            return True
        sent[id(bar)] = now
        percent = round(100.0 * bar.n / bar.total, 1) if bar.total else None
        stage = str(bar.desc or "").rstrip(": ") or default_stage
        emit(message("progress", percent=percent, stage=stage))
        return True

    std.tqdm.display = display  # type: ignore[method-assign]
    # Lightning draws with rich when it can; its tqdm bar is the one we can observe.
    from lightning.pytorch.trainer.connectors import callback_connector

    callback_connector._RICH_AVAILABLE = False


def options_argv(args: dict[str, Any]) -> list[str]:
    """CLI options from request args: {"max_steps": 4, "no_progress": True} -> --max-steps 4 ..."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def diagnostics() -> dict[str, Any]:
    """Versions, the torch device a job would really use (by running on it) and the last error."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from geoseg.cli import main as cli
    from geoseg.device import resolve_device

    versions = {}
    for name in ("geoseg", "torch", "torchgeo", "lightning", "rasterio", "transformers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    device = resolve_device()
    used, device_error = None, None
    try:  # a GPU that is seen but unusable shows here, not as a silent CPU fallback later
        used = (torch.ones(2, device=device) * 2).device
    except RuntimeError as exc:
        device_error = f"{device}: {first_line(exc)}"
    path = last_error_path()
    return {
        "protocol": PROTOCOL_VERSION,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "versions": versions,
        "device": str(used) if used else None,
        "device_error": device_error,
        "gpu": torch.cuda.get_device_name(used) if used and used.type == "cuda" else None,
        "ops": ["diagnostics", *sorted(set(cli.commands) - NOT_OPS)],
        "last_error": json.loads(path.read_text()) if path.exists() else None,
    }


def _outputs(op: str, args: dict[str, Any]) -> dict[str, str]:
    found = {key: str(args[key]) for key in ("out", "vector") if args.get(key)}
    out = args.get("out")
    for key, relative in OUT_FILES.get(op, {}).items():
        if out and (Path(out) / relative).exists():
            found[key] = str(Path(out) / relative)
    return found


def run_request(
    req: dict[str, Any], emit: Emit, stdout: _LogLines, stderr: _LogLines
) -> dict[str, Any]:
    """Run one request; returns the result or error message (never raises for job failures).

    `stdout`/`stderr` are the streams the command writes to: its last stdout line is the
    summary, its last `geoseg: error:` line the error message.
    """
    import click

    from geoseg.cli import main as cli

    op, args, positional = req.get("op"), req.get("args") or {}, list(req.get("positional") or [])
    if op == "diagnostics":
        return message("result", op=op, summary="engine ok", outputs=diagnostics())
    if op not in set(cli.commands) - NOT_OPS or not isinstance(args, dict):
        known = ", ".join(["diagnostics", *sorted(set(cli.commands) - NOT_OPS)])
        return message(
            "error",
            code="bad_input",
            message=f"this engine has no op {op!r} (it knows: {known})",
            fix="pip install -U geoseg  # in the engine environment, then: geoseg qgis install",
        )
    _report_progress(emit, op)
    stdout.tail.clear()
    try:
        argv = [op, *options_argv(args)]
        if positional:
            argv += ["--", *(str(a) for a in positional)]
        cli.main(args=argv, prog_name="geoseg", standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            errors = [x[len(CLI_ERROR) :] for x in stderr.tail if x.startswith(CLI_ERROR)]
            text = errors[-1] if errors else (stderr.tail[-1] if stderr.tail else f"exit {exc}")
            code = "bad_input" if exc.code == 2 else "failed"
            return message("error", code=code, message=text, fix=None)
    except click.ClickException as exc:  # usage errors: unknown option, bad value
        return message("error", code="bad_input", message=exc.format_message(), fix=None)
    summary = stdout.tail[-1] if stdout.tail else "done"
    return message("result", op=op, summary=summary, outputs=_outputs(op, args))


def _device_problem(name: str) -> str | None:
    """Apply the request's device: `cpu` hides the GPUs from every library the job loads, `auto`
    runs where `resolve_device` says, any other device must exist here (else the reason)."""
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif name != "auto":
        from geoseg.device import DeviceError, resolve_device

        try:
            resolve_device(name)
        except DeviceError as exc:
            return str(exc)
    return None


def _read_request(stdin: TextIO) -> dict[str, Any]:
    line = stdin.readline()
    try:
        req = decode(line) if line.startswith("@") else json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"the request is not JSON: {exc}") from None
    if not isinstance(req, dict) or req.get("type") != "request":
        raise ProtocolError("expected one request message on stdin")
    if req.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"request speaks protocol {req.get('v')!r}, this engine speaks {PROTOCOL_VERSION}"
        )
    return req


def _remember(error: dict[str, Any], req: dict[str, Any] | None) -> None:
    from geoseg.builder.writers import write_json

    with contextlib.suppress(OSError):  # then diagnostics can't show it; the client has it
        write_json(last_error_path(), {**error, "op": (req or {}).get("op"), "time": time.time()})


def main() -> int:
    """Serve one request from stdin; the exit code mirrors the CLI's (130 when cancelled)."""
    emit = _channel()
    stdout, stderr = _LogLines(emit, "info", 2), _LogLines(emit, "warning", 2)
    sys.stdout, sys.stderr = stdout, stderr
    cancelled = threading.Event()

    def cancel(signum: int, frame: FrameType | None) -> None:
        cancelled.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    req: dict[str, Any] | None = None
    try:
        req = _read_request(sys.stdin)
        problem = _device_problem(req.get("device", "auto"))
        if problem:  # a GPU this machine lacks: say so rather than quietly run on the CPU
            fix = "choose auto or cpu as the device in geoseg's Settings"
            reply = message("error", code="bad_input", message=problem, fix=fix)
        else:
            reply = run_request(req, emit, stdout, stderr)
    except ProtocolError as exc:
        reply = message("error", code="protocol", message=str(exc), fix=None)
    except (KeyboardInterrupt, SystemExit) as exc:
        if not cancelled.is_set() and isinstance(exc, SystemExit):
            raise
        reply = message("error", code="cancelled", message="cancelled", fix=None)
    except Exception as exc:
        traceback.print_exc(file=sys.__stderr__)
        reply = message("error", code="crash", message=first_line(exc), fix=None)
    if cancelled.is_set() and reply["type"] == "error":
        reply.update(code="cancelled", message="cancelled; finished work is kept")
    if reply["type"] == "error":
        _remember(reply, req)
    emit(reply)
    return 0 if reply["type"] == "result" else EXIT_CODES[reply["code"]]


if __name__ == "__main__":
    sys.exit(main())
