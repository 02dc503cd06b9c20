"""`python -m geoseg.engine`: serve protocol requests for an outside client.

The engine sits above the CLI (it imports `geoseg.cli`; the CLI never imports it).

The QGIS plugin cannot import torch or geoseg in QGIS's own Python (their native libraries crash
it), so it starts this module in the geoseg environment and speaks `geoseg.protocol` to it. Each
request names a geoseg command and its options; the engine runs that very click command (no twin
logic), turns tqdm bars into progress messages, Python-level output into log messages and the
command's outcome into one result or error message.

The engine answers requests one after another until its stdin closes, so a client may keep one
*warm* engine: torch and the other imports are paid once, and the last model and search index
stay loaded while their files are unchanged (`_keep_last`). A one-shot client simply closes stdin
after its request. Checkpoint arguments are checked with `geoseg.checkpoint_info` (no torch)
before anything heavy, so a wrong path is answered at once even by a cold engine.

The protocol gets a private copy of the original stdout; fd 1 itself is pointed at stderr, so
whatever native code prints lands there and never in the protocol stream. SIGINT/SIGTERM cancel
the job like Ctrl+C does (builds and training keep what they finished and resume on rerun); a
cancelled engine answers and exits, so no half-unwound state is ever reused.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
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

from geoseg.checkpoint_info import FIX, CheckpointError, describe, read_contract
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
# Ops of the engine itself (not CLI commands).
ENGINE_OPS = ("describe", "diagnostics")
EXIT_CODES = {"bad_input": 2, "failed": 1, "cancelled": 130, "protocol": 2, "crash": 3}
# Files of a finished op worth reporting, relative to its --out folder.
OUT_FILES = {
    "build-dataset": {"tiles": "tiles.vrt", "report": "report.md"},
    "train": {"checkpoint": "checkpoints/last.ckpt", "config": "config.yaml"},
    "evaluate": {"metrics": "metrics.json"},
}
# Ops that train or test through Lightning, whose rich progress bar must give way to tqdm's.
LIGHTNING_OPS = frozenset({"train", "evaluate"})
# Loaders whose last result a serving engine keeps, per op: the module that uses them (imported
# first, so its own reference gets the cached loader too) and (module, attribute) of each.
KEEP_LAST = {
    "predict": ("geoseg.predict.sliding", [("geoseg.train.task", "load_model")]),
    "evaluate": ("geoseg.train.evaluate", [("geoseg.train.task", "load_model")]),
    "search": (
        "retrieval.search",
        [("retrieval.index", "open_embedder"), ("retrieval.index", "TileIndex.open")],
    ),
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

    Splits on carriage returns too, so tqdm-style redraws become separate lines. The CLI's own
    `geoseg: error:` line is only remembered: it comes back once, as the error message.
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
                if not line.startswith(CLI_ERROR):
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


def _report_progress(emit: Emit, op: str) -> None:
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
        stage = str(bar.desc or "").rstrip(": ") or op
        emit(message("progress", percent=percent, stage=stage))
        return True

    std.tqdm.display = display  # type: ignore[method-assign]
    if op in LIGHTNING_OPS:  # Lightning draws with rich when it can; its tqdm bar we observe
        from lightning.pytorch.trainer.connectors import callback_connector

        callback_connector._RICH_AVAILABLE = False


def _file_key(path: Any) -> tuple[str, int, int] | None:
    """(path, mtime, size) of a file or folder argument: a changed file is a new key."""
    try:
        stat = Path(path).stat()
    except (OSError, TypeError, ValueError):
        return None
    return str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size


def _folder_key(path: Any) -> tuple[Any, ...] | None:
    """Key of a folder argument (an index): its files' keys, so a rebuilt index is reloaded."""
    folder = Path(path) if isinstance(path, str | Path) else None
    if folder is None or not folder.is_dir():
        return _file_key(path)
    return tuple(_file_key(p) for p in sorted(folder.iterdir()) if p.is_file())


def _keep_last(loader: Callable[..., Any]) -> Callable[..., Any]:
    """`loader` that returns its last result again while called with the same arguments and
    their files are unchanged (what makes a warm engine's second search or prediction fast)."""
    last: dict[str, Any] = {}

    @functools.wraps(loader)
    def cached(*args: Any, **kwargs: Any) -> Any:
        key = (
            tuple(_folder_key(a) or repr(a) for a in args),
            tuple(sorted((k, _folder_key(v) or repr(v)) for k, v in kwargs.items())),
        )
        if last.get("key") != key:
            last.clear()
            last.update(key=key, value=loader(*args, **kwargs))
        return last["value"]

    cached.__wrapped_by_engine__ = True  # type: ignore[attr-defined]
    return cached


def _install_keep_last(op: str) -> None:
    """Route the op's loaders through `_keep_last` in every module that holds them (once)."""
    if op not in KEEP_LAST:
        return
    user, loaders = KEEP_LAST[op]
    with contextlib.suppress(ImportError):  # an engine without retrieval still serves the rest
        importlib.import_module(user)
    for module_name, attribute in loaders:
        module = sys.modules.get(module_name)
        owner_name, _, name = attribute.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module
        original = getattr(owner, name, None)
        if original is None or getattr(original, "__wrapped_by_engine__", False):
            continue
        if owner_name:  # a classmethod, e.g. TileIndex.open: wrap the bound function
            setattr(owner, name, classmethod(_keep_last(original.__func__)))
            continue
        cached = _keep_last(original)
        for other in list(sys.modules.values()):
            if getattr(other, name, None) is original:
                setattr(other, name, cached)


def options_argv(args: dict[str, Any], multiple: frozenset[str] = frozenset()) -> list[str]:
    """CLI options from request args: {"max_steps": 4, "no_progress": True} -> --max-steps 4 ...

    A list is one multi-value option (`--bbox W S E N`), or, for the `multiple` options, the
    option repeated (`--points a.laz --points b.laz`).
    """
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple) and key in multiple:
            argv += [part for v in value for part in (flag, str(v))]
        elif isinstance(value, list | tuple):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def _ops() -> list[str]:
    from geoseg.cli import main as cli

    return [*ENGINE_OPS, *sorted(set(cli.commands) - NOT_OPS)]


def diagnostics() -> dict[str, Any]:
    """Versions, the torch device a job would really use (by running on it) and the last error."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

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
        "ops": _ops(),
        "pid": os.getpid(),
        "last_error": json.loads(path.read_text()) if path.exists() else None,
    }


def describe_checkpoint(path: str) -> dict[str, Any]:
    """`checkpoint_info.describe` plus what only geoseg can tell: whether it reads LiDAR."""
    from geoseg.predict.sliding import needs_points

    info = describe(path)
    if info["needs_points"] is None:
        info["needs_points"] = needs_points(read_contract(path))
    return info


def _outputs(op: str, args: dict[str, Any]) -> dict[str, str]:
    found = {key: str(args[key]) for key in ("out", "vector") if args.get(key)}
    out = args.get("out")
    for key, relative in OUT_FILES.get(op, {}).items():
        if out and (Path(out) / relative).exists():
            found[key] = str(Path(out) / relative)
    return found


def _checkpoint_problem(args: dict[str, Any]) -> dict[str, Any] | None:
    """The error for a `checkpoint` argument that is not a geoseg checkpoint (no torch needed)."""
    if not args.get("checkpoint"):
        return None
    try:
        read_contract(args["checkpoint"])
    except CheckpointError as exc:
        return message("error", code="bad_input", message=str(exc), fix=FIX)
    return None


def run_request(
    req: dict[str, Any], emit: Emit, stdout: _LogLines, stderr: _LogLines
) -> dict[str, Any]:
    """Run one request; returns the result or error message (never raises for job failures).

    `stdout`/`stderr` are the streams the command writes to: its last stdout line is the
    summary, its last `geoseg: error:` line the error message.
    """
    op, args, positional = req.get("op"), req.get("args") or {}, list(req.get("positional") or [])
    if not isinstance(args, dict):
        args = {"": args}  # refused below as an unknown op shape
    problem = _checkpoint_problem(args)
    if problem:
        return problem
    if op == "diagnostics":
        return message("result", op=op, summary="engine ok", outputs=diagnostics())
    if op == "describe":
        if not args.get("checkpoint"):
            text = "describe needs a checkpoint"
            return message("error", code="bad_input", message=text, fix=FIX)
        outputs = describe_checkpoint(args["checkpoint"])
        return message("result", op=op, summary=outputs["model"], outputs=outputs)
    import click

    from geoseg.cli import main as cli

    if op not in set(cli.commands) - NOT_OPS or "" in args:
        return message(
            "error",
            code="bad_input",
            message=f"this engine has no op {op!r} (it knows: {', '.join(_ops())})",
            fix="pip install -U geoseg  # in the engine environment, then: geoseg qgis install",
        )
    _report_progress(emit, op)
    _install_keep_last(op)
    stdout.tail.clear()
    stderr.tail.clear()
    try:
        multiple = frozenset(p.name for p in cli.commands[op].params if getattr(p, "multiple", 0))
        argv = [op, *options_argv(args, multiple)]
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


def _read_request(stdin: TextIO) -> dict[str, Any] | None:
    """The next request, or None when the client closed stdin."""
    line = stdin.readline()
    if not line:
        return None
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


def _serve(req: dict[str, Any], emit: Emit, stdout: _LogLines, stderr: _LogLines) -> dict[str, Any]:
    """The reply to one request (device check, then the op)."""
    problem = _device_problem(req.get("device", "auto"))
    if problem:  # a GPU this machine lacks: say so rather than quietly run on the CPU
        fix = "choose auto or cpu as the device in geoseg's Settings"
        return message("error", code="bad_input", message=problem, fix=fix)
    return run_request(req, emit, stdout, stderr)


def main() -> int:
    """Serve requests from stdin until it closes; the exit code is the last reply's (the CLI's
    codes; 130 when cancelled, after which the engine stops)."""
    emit = _channel()
    stdout, stderr = _LogLines(emit, "info", 2), _LogLines(emit, "warning", 2)
    sys.stdout, sys.stderr = stdout, stderr
    cancelled = threading.Event()

    def cancel(signum: int, frame: FrameType | None) -> None:
        cancelled.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    code = 0
    while not cancelled.is_set():
        req: dict[str, Any] | None = None
        try:
            req = _read_request(sys.stdin)
            if req is None:  # the client is done: leave at once (no job is running)
                sys.__stderr__.flush()
                os._exit(code)  # skips torch's slow interpreter teardown (seconds)
            reply = _serve(req, emit, stdout, stderr)
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
        code = 0 if reply["type"] == "result" else EXIT_CODES[reply["code"]]
    return code


if __name__ == "__main__":
    sys.exit(main())
