"""The JSON-lines protocol between a geoseg engine process and its clients (the QGIS plugin).

Standard library only: the QGIS plugin ships a byte-identical copy of this file (the installer
copies it; a test checks the copy), so QGIS's own Python never imports the engine to talk to it.

One request goes in on the engine's stdin; messages come back on its stdout, one per line, each
``PREFIX + json``. Lines without the prefix are library noise and are ignored, so a stray print
from a native library cannot corrupt the stream. Every message carries ``"v"``; a client refuses
messages of another version instead of guessing.

Message types (besides ``v`` and ``type``):
  request   op, args (the CLI options of the op, ``max_steps`` = ``--max-steps``), positional
            (the command's arguments, e.g. the query text of ``search``), device
  progress  percent (0-100 or null), stage
  log       level ("info" | "warning"), message
  result    op, summary (the command's one-line summary), outputs (paths by option name)
  error     code (see ERROR_CODES), message, fix (a command that fixes it, or null)
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
PREFIX = "@geoseg-protocol "
MESSAGE_TYPES = frozenset({"request", "progress", "log", "result", "error"})
# bad_input: the request's values (exit 2 in the CLI); failed: the job ran into a problem (exit 1);
# cancelled: SIGINT/SIGTERM; protocol: malformed or incompatible message; crash: unexpected error.
ERROR_CODES = frozenset({"bad_input", "failed", "cancelled", "protocol", "crash"})


class ProtocolError(ValueError):
    """A line that carries the prefix but is not a valid message of this protocol version."""


def message(kind: str, **fields: Any) -> dict[str, Any]:
    """A message dict of type `kind` at the current protocol version."""
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {kind!r}")
    if kind == "error" and fields.get("code") not in ERROR_CODES:
        raise ProtocolError(f"unknown error code {fields.get('code')!r}")
    return {"v": PROTOCOL_VERSION, "type": kind, **fields}


def request(
    op: str,
    args: dict[str, Any] | None = None,
    device: str = "auto",
    positional: list[str] | None = None,
) -> dict[str, Any]:
    """The request that makes an engine run `op` (a geoseg command name) with CLI options `args`."""
    return message(
        "request", op=op, args=dict(args or {}), positional=list(positional or []), device=device
    )


def encode(msg: dict[str, Any]) -> str:
    """One protocol line (with the trailing newline)."""
    return PREFIX + json.dumps(msg, separators=(",", ":")) + "\n"


def decode(line: str) -> dict[str, Any] | None:
    """The message of a protocol line, or None for a line that is not one (library noise).

    Raises ProtocolError for a prefixed line that is malformed or of another protocol version.
    """
    line = line.rstrip("\r\n")
    if not line.startswith(PREFIX):
        return None
    try:
        msg = json.loads(line[len(PREFIX) :])
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"malformed protocol line: {exc}") from None
    if not isinstance(msg, dict) or msg.get("type") not in MESSAGE_TYPES:
        raise ProtocolError(f"not a protocol message: {line[len(PREFIX) :][:80]}")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {msg.get('v')!r} does not match this side's {PROTOCOL_VERSION}"
        )
    return msg
