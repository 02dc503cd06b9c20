"""Asset reads over HTTP(S) that survive a real network: one retry policy for COG and COPC reads.

Cloud stores answer a busy moment with 429/503 (and a `Retry-After`), drop connections mid-body,
stall, and reject expired SAS tokens with 403. Both readers follow one `RetryPolicy`:

- COPC (laspy): `RangeFile` is the file object laspy reads from. Each byte range is one HTTP
  request, retried on its own: exponential backoff with full jitter, a server's `Retry-After`
  as the least wait, 429/5xx/timeouts/short bodies retried, 403 answered by re-signing the href.
  Small reads share a read-ahead block, so a header costs one request, not twenty.
- COG (GDAL `/vsicurl/`): GDAL retries each request itself on the policy's status codes and
  timeouts, `GDAL_HTTP_MAX_RETRY` times from `GDAL_HTTP_RETRY_DELAY` on (`gdal_options`).
  What GDAL does not retry fails the window read, and `read_with_retries` reads the window
  again: after a 403 with a fresh signature, after anything else once a one-byte `RangeFile`
  probe has the server answering (the probe waits out a `Retry-After`), and always with GDAL's
  cache bypassed for the URL, since GDAL remembers failed answers. GDAL 3.10 does not read
  `Retry-After` (measured: it retries after GDAL_HTTP_RETRY_DELAY whatever the header says), so
  the COG side waits at least `base_delay_s` (1 s, the usual Retry-After of cloud stores) and
  2-2.5 times longer at each next retry.

Nothing here downloads a whole file: `RangeFile` refuses a server that ignores `Range`, and GDAL
only fetches the blocks a window needs. When a read runs out of tries or of its time budget,
`AssetReadError` says so in one line; the tile fails with that reason and a rerun of the build
picks it up.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import TypeVar
from urllib.parse import urlparse

import requests

import geoseg
from geoseg.errors import innermost_line
from geoseg.stac.retry import DEFAULT_POLICY, RetryPolicy
from geoseg.stac.signing import NoSigner, Signer, local_path

__all__ = [
    "DEFAULT_POLICY",
    "AssetReadError",
    "RangeFile",
    "RetryPolicy",
    "gdal_options",
    "is_remote",
    "read_with_retries",
]

T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""Answers that mean "not now": timeouts, rate limiting, gateway and backend trouble."""
READ_AHEAD = 16 * 1024
"""Smallest request `RangeFile` makes: LAS headers and VLRs are read in many small pieces."""
USER_AGENT = f"geoseg/{geoseg.__version__}"


class AssetReadError(OSError):
    """An asset could not be read: gave up after retries, or the server said no for good."""


def gdal_options(policy: RetryPolicy = DEFAULT_POLICY) -> dict[str, str]:
    """The GDAL configuration for COG reads over HTTP, every option on purpose (docs/dataset.md)."""
    return {
        # GDAL's retry of single requests, from the same policy as the COPC reads.
        "GDAL_HTTP_MAX_RETRY": str(policy.tries - 1),
        "GDAL_HTTP_RETRY_DELAY": f"{policy.base_delay_s:g}",
        "GDAL_HTTP_RETRY_CODES": ",".join(map(str, sorted(RETRY_STATUSES))),
        "GDAL_HTTP_TIMEOUT": f"{policy.timeout_s:g}",
        "GDAL_HTTP_CONNECTTIMEOUT": f"{policy.connect_timeout_s:g}",
        "GDAL_HTTP_USERAGENT": USER_AGENT,
        # No directory listing and no probing for side-car files (.aux.xml, .ovr, .msk): on a
        # blob store each probe is a request, usually answered 404 or 403.
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
        # Adjacent blocks of a window in one request instead of one request each.
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        # /vsicurl/'s own block cache, per worker process (GDAL's default is 16 MB): headers and
        # blocks that neighbouring tiles share are fetched once. VSI_CACHE would add a second,
        # per-handle copy of the same bytes, so it stays off.
        "CPL_VSIL_CURL_CACHE_SIZE": str(64 * 2**20),
        "VSI_CACHE": "FALSE",
    }


def is_remote(href: str) -> bool:
    return urlparse(href).scheme.lower() in ("http", "https")


_local = threading.local()


def _session() -> requests.Session:
    """One connection pool per thread (laspy and dask may read from several threads)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
    return session


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the HTTP-date form
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _Transient(Exception):
    """One attempt failed in a way worth retrying (with the server's Retry-After, if any)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class RangeFile:
    """A read-only, seekable file over HTTP byte ranges, retried per `RetryPolicy`.

    Keeps the signed URL and re-signs it when the server answers 403, so an expired token
    costs one request, not the read. `budget` seconds of waiting are shared by every request
    of this file object (one asset read); `tries` bounds each request on its own.
    """

    def __init__(
        self, href: str, signer: Signer | None = None, policy: RetryPolicy = DEFAULT_POLICY
    ) -> None:
        self.href = href
        self.signer = signer or NoSigner()
        self.policy = policy
        self.url = self.signer.sign(href)
        self.size: int | None = None
        self.waited = 0.0
        self.requests = 0
        self._pos = 0
        self._buffer = b""
        self._buffer_start = 0

    # -- file object protocol (what laspy uses) --------------------------------------------
    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._pos
        elif whence == 2:
            offset += self._total_size()
        if offset < 0:
            raise ValueError("negative seek position")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._total_size() - self._pos
        if n == 0:
            return b""
        start, end = self._pos, self._pos + n
        lo, hi = self._buffer_start, self._buffer_start + len(self._buffer)
        if not (lo <= start and end <= hi):
            data = self.fetch(start, max(n, READ_AHEAD))
            self._buffer, self._buffer_start = data, start
            lo = start
        out = self._buffer[start - lo : end - lo]
        self._pos += len(out)
        return out

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._buffer = b""

    def __enter__(self) -> RangeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------
    def _total_size(self) -> int:
        if self.size is None:
            self.fetch(0, 1)
        assert self.size is not None
        return self.size

    def probe(self) -> None:
        """One byte from the server, retried like any read: it waits as long as the server
        asks and re-signs on 403; raises AssetReadError when the asset cannot be had."""
        self.fetch(0, 1)

    def fetch(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) (fewer at the end of the file), retried per policy."""
        resigned = False
        last = ""
        for attempt in range(self.policy.tries):
            try:
                return self._get(start, length)
            except _Transient as exc:
                last = str(exc)
                if attempt + 1 < self.policy.tries:
                    self.wait(attempt, exc.retry_after, last)
            except _Forbidden as exc:
                if resigned:
                    raise AssetReadError(
                        f"{_name(self.href)}: {exc} even with a fresh signature"
                    ) from None
                self.url = self.signer.sign(self.href, refresh=True)
                resigned = True
        raise AssetReadError(
            f"{_name(self.href)}: gave up after {self.policy.tries} tries, "
            f"{self.waited:.0f} s of waiting ({last})"
        )

    def wait(self, attempt: int, retry_after: float | None, reason: str) -> None:
        """Sleep before the next attempt, or give up when the time budget would be exceeded."""
        delay = self.policy.delay(attempt, retry_after)
        if self.waited + delay > self.policy.budget_s:
            raise AssetReadError(
                f"{_name(self.href)}: gave up, out of its {self.policy.budget_s:g} s retry "
                f"budget ({reason})"
            )
        time.sleep(delay)
        self.waited += delay

    def _get(self, start: int, length: int) -> bytes:
        end = start + length - 1
        if self.size is not None:
            if start >= self.size:
                return b""
            end = min(end, self.size - 1)
        self.requests += 1
        timeout = (self.policy.connect_timeout_s, self.policy.timeout_s)
        try:
            response = _session().get(
                self.url, headers={"Range": f"bytes={start}-{end}"}, timeout=timeout, stream=True
            )
        except requests.RequestException as exc:
            raise _Transient(_network_reason(exc)) from None
        with response:
            status = response.status_code
            if status == 416:
                return b""
            if status == 403:
                raise _Forbidden("HTTP 403")
            if status in RETRY_STATUSES:
                raise _Transient(f"HTTP {status}", _retry_after(response))
            if status == 200:  # the whole file: fine only if it is no bigger than the range asked
                size = int(response.headers.get("Content-Length") or -1)
                if start != 0 or not 0 <= size <= end + 1:
                    raise AssetReadError(
                        f"{_name(self.href)}: the server ignores byte ranges; refusing to "
                        "download the whole file for one window"
                    )
                response.headers["Content-Range"] = f"bytes 0-{size - 1}/{size}"
            if status != 206:
                raise AssetReadError(f"{_name(self.href)}: HTTP {status}")
            self.size = _total_from(response.headers.get("Content-Range"), self.size)
            want = end - start + 1 if self.size is None else min(end, self.size - 1) - start + 1
            try:
                data = response.raw.read(want, decode_content=True)
            except Exception as exc:  # urllib3 raises several kinds for a dropped connection
                raise _Transient(_network_reason(exc)) from None
            if len(data) < want:
                raise _Transient(f"connection dropped after {len(data)} of {want} bytes")
            return data


class _Forbidden(Exception):
    """HTTP 403: usually an expired signature."""


def _total_from(content_range: str | None, known: int | None) -> int | None:
    """The total size in `Content-Range: bytes a-b/total`."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return known


_QUERY = re.compile(r"\?[^\s'\"]+")


def _scrub(text: str) -> str:
    """Cut URL queries out of a message: they may hold a signature, which has no place in logs
    or reports."""
    return _QUERY.sub("?...", text)


def _network_reason(exc: BaseException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    text = _scrub(" ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__


def _name(href: str) -> str:
    """The file name of an href without its query (no SAS token in messages or reports)."""
    path = urlparse(href).path
    return path.rsplit("/", 1)[-1] or href


def read_with_retries(
    href: str,
    signer: Signer,
    read: Callable[[str], T],
    policy: RetryPolicy = DEFAULT_POLICY,
) -> T:
    """`read(path)` of a GDAL-readable asset, retried per `policy` when `href` is a URL.

    `read` opens the path with rasterio and reads what it needs; it runs inside the GDAL options
    of `gdal_options`. Local hrefs are read once (a corrupt local file stays corrupt).
    """
    import rasterio  # GDAL is only needed by the COG side

    if not is_remote(href):
        return read(local_path(href))
    options = gdal_options(policy)
    probe = RangeFile(href, signer, policy)  # holds the signed URL and the time budget
    for attempt in range(policy.tries):
        url = probe.url
        # After a failure GDAL would reuse its cached answer for the URL: bypass it.
        fresh = {"CPL_VSIL_CURL_NON_CACHED": f"/vsicurl/{url}"} if attempt else {}
        try:
            with rasterio.Env(**options, **fresh):
                return read(url)
        except (OSError, rasterio.errors.RasterioError) as exc:
            reason = _gdal_reason(exc)
        if attempt + 1 == policy.tries:
            break
        if _FORBIDDEN.search(reason):
            probe.url = signer.sign(href, refresh=True)
            continue
        answered = probe.requests
        probe.probe()  # waits out 429/503 as told, re-signs on 403, fails for 404
        if probe.requests == answered + 1:  # the server answered at once: back off anyway
            probe.wait(attempt, None, reason)
    raise AssetReadError(
        f"{_name(href)}: gave up after {policy.tries} tries, {probe.waited:.0f} s of waiting "
        f"({reason})"
    )


_FORBIDDEN = re.compile(r"HTTP response code: 403\b")


def _gdal_reason(exc: BaseException) -> str:
    """The innermost GDAL message of a rasterio error ("Read failed" hides it), scrubbed."""
    return _scrub(innermost_line(exc))[:160]
