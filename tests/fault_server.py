"""A static HTTP file server with byte ranges that misbehaves like a busy cloud store, on purpose.

Run as its own process by the tests (`python tests/fault_server.py --root DIR --port-file F
--log L [faults]`); it serves the files under --root with single byte ranges (206, 416, HEAD,
Accept-Ranges) and injects the faults asked for, each once per file unless said otherwise:

  --first-503         the first request for a file answers 503 with Retry-After
  --every-429 N       every N-th request (over all files) answers 429 with Retry-After
  --token-uses K      requests need `?token=` from GET /sign; a token serves K requests, then 403
  --drop-get N        the N-th ranged GET of a file sends half its body, then drops the connection
  --slow-first-get S  the first ranged GET of a file waits S seconds before answering
  --broken PATH       requests for PATH always answer 503 (a store that stays down)
  --ignore-ranges     answer 200 with the whole file, whatever the Range header says

Every request is logged as one JSON line (method, path, status, range, bytes sent), so a test can
check what a reader really fetched, e.g. that no window read downloaded a whole file. `serve`
starts the server for a test; `TokenSigner` signs hrefs with its tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from urllib.request import ProxyHandler, build_opener

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class FaultState:
    """Counters shared by the handler threads."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.requests = 0
        self.seen: dict[str, set[str]] = {}
        self.gets: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.log = open(args.log, "a", buffering=1)  # noqa: SIM115 (closed at exit)

    def first(self, fault: str, path: str) -> bool:
        """True the first time `fault` is asked about `path`."""
        with self.lock:
            done = self.seen.setdefault(fault, set())
            if path in done:
                return False
            done.add(path)
            return True

    def nth_get(self, path: str) -> int:
        """How many ranged GETs of `path` there have been, this one included."""
        with self.lock:
            self.gets[path] = self.gets.get(path, 0) + 1
            return self.gets[path]

    def count(self) -> int:
        with self.lock:
            self.requests += 1
            return self.requests

    def new_token(self) -> str:
        token = secrets.token_hex(8)
        with self.lock:
            self.tokens[token] = self.args.token_uses
        return token

    def spend(self, token: str | None) -> bool:
        """Use one request of `token`; False if it is unknown or used up (expired)."""
        with self.lock:
            left = self.tokens.get(token or "", 0)
            if left <= 0:
                return False
            self.tokens[token] = left - 1  # type: ignore[index]
            return True

    def record(self, **entry: object) -> None:
        with self.lock:
            self.log.write(json.dumps({"t": round(time.time(), 3), **entry}) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FaultState
    root: Path

    def log_message(self, format: str, *args: object) -> None:
        pass  # the JSON log replaces stderr lines

    def handle(self) -> None:
        # A client that hangs up (e.g. without reading a 429's body) is its own business.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _answer(self, status: int, headers: dict[str, str], payload: bytes = b"") -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)

    def _serve(self, body: bool) -> None:
        url = urlsplit(self.path)
        args = self.state.args
        entry: dict[str, object] = {"method": self.command, "path": url.path}
        range_header = self.headers.get("Range")
        entry["range"] = range_header
        n = self.state.count()
        if url.path == "/sign":
            token = self.state.new_token()
            self.state.record(**entry, status=200, sent=len(token))
            return self._answer(200, {"Content-Type": "text/plain"}, token.encode())
        file = (self.root / url.path.lstrip("/")).resolve()
        if not file.is_relative_to(self.root) or not file.is_file():
            self.state.record(**entry, status=404, sent=0)
            return self._answer(404, {})
        retry_after = {"Retry-After": args.retry_after}
        if url.path.lstrip("/") in args.broken:
            self.state.record(**entry, status=503, sent=0)
            return self._answer(503, retry_after, b"down")
        if args.first_503 and self.state.first("503", url.path):
            self.state.record(**entry, status=503, sent=0)
            return self._answer(503, retry_after, b"busy")
        if args.every_429 and n % args.every_429 == 0:
            self.state.record(**entry, status=429, sent=0)
            return self._answer(429, retry_after, b"slow down")
        if args.token_uses and not self.state.spend(parse_qs(url.query).get("token", [None])[0]):
            self.state.record(**entry, status=403, sent=0)
            return self._answer(403, {}, b"AuthenticationFailed: token expired")
        size = file.stat().st_size
        start, end, status = 0, size - 1, 200
        if range_header and not args.ignore_ranges:
            match = _RANGE.match(range_header.strip())
            if not match or not (match.group(1) or match.group(2)):
                self.state.record(**entry, status=416, sent=0)
                return self._answer(416, {"Content-Range": f"bytes */{size}"})
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            else:
                start, end = max(0, size - int(last)), size - 1
            if start >= size or start > end:
                self.state.record(**entry, status=416, sent=0)
                return self._answer(416, {"Content-Range": f"bytes */{size}"})
            status = 206
        length = end - start + 1
        headers = {
            "Content-Length": str(length),
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        ranged_get = body and range_header is not None
        if ranged_get and args.slow_first_get and self.state.first("slow", url.path):
            time.sleep(args.slow_first_get)
        drop = ranged_get and bool(args.drop_get) and length > 1
        drop = drop and self.state.nth_get(url.path) == args.drop_get
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        sent = 0
        if body:
            with open(file, "rb") as f:
                f.seek(start)
                data = f.read(length)
            if drop:
                data = data[: length // 2]
            try:
                self.wfile.write(data)
                self.wfile.flush()
                sent = len(data)
            except OSError:
                pass
        self.state.record(**entry, status=status, sent=sent, size=size, dropped=bool(drop))
        if drop:
            self.close_connection = True
            self.connection.shutdown(2)  # mid-body: the client sees a short read


@dataclass
class Server:
    url: str
    log: Path

    def requests(self) -> list[dict[str, Any]]:
        """Every request served so far, in order."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


@contextmanager
def serve(root: Path, workdir: Path, *faults: str) -> Iterator[Server]:
    """Run the server on `root` as its own process (faults as command-line flags)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    log = workdir / "requests.jsonl"
    command = [sys.executable, __file__, "--root", str(root), "--port-file", str(port_file),
               "--log", str(log), *faults]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fault server did not start: {command}")
            time.sleep(0.02)
        yield Server(f"http://127.0.0.1:{port_file.read_text()}", log)
    finally:
        process.terminate()
        process.wait(10)


_TOKENS: dict[str, str] = {}
_OPENER = build_opener(ProxyHandler({}))


@dataclass(frozen=True)
class TokenSigner:
    """Appends `?token=` from the server's /sign endpoint, the way a SAS-token service is used:
    one token per server, cached in the process until `refresh=True` (after a 403)."""

    def sign(self, href: str, *, refresh: bool = False) -> str:
        parts = urlsplit(href)
        origin = f"{parts.scheme}://{parts.netloc}"
        if refresh or origin not in _TOKENS:
            with _OPENER.open(f"{origin}/sign", timeout=10) as response:
                _TOKENS[origin] = response.read().decode()
        return f"{href}?token={_TOKENS[origin]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True, help="where the port is written")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--retry-after", default="1", help="Retry-After value (seconds)")
    parser.add_argument("--first-503", action="store_true")
    parser.add_argument("--every-429", type=int, default=0)
    parser.add_argument("--token-uses", type=int, default=0)
    parser.add_argument("--drop-get", type=int, default=0)
    parser.add_argument("--slow-first-get", type=float, default=0.0)
    parser.add_argument("--broken", action="append", default=[])
    parser.add_argument("--ignore-ranges", action="store_true")
    args = parser.parse_args()
    Handler.state = FaultState(args)
    Handler.root = args.root.resolve()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(args.port_file)  # atomically: the test reads the port once it exists
    server.serve_forever()


if __name__ == "__main__":
    main()
