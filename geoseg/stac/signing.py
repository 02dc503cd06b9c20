"""Asset-href signing and resolution, done just before each read.

Planetary Computer SAS tokens live about 45 minutes, shorter than a state-wide build, so items keep
unsigned hrefs and workers sign at read time. Signers are small frozen dataclasses: they are
pickled into dask tasks, while the token cache stays per process (inside `planetary_computer`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

import planetary_computer
import requests
from planetary_computer import sas
from planetary_computer.settings import Settings
from planetary_computer.utils import parse_blob_url

from geoseg.stac.errors import StacError

PLANETARY_COMPUTER_HOST = "planetarycomputer.microsoft.com"


class Signer(Protocol):
    """Turns an unsigned asset href into a readable one."""

    def sign(self, href: str, *, refresh: bool = False) -> str:
        """Sign `href`; `refresh=True` must not reuse a cached (possibly expired) credential."""
        ...


@dataclass(frozen=True)
class NoSigner:
    """For APIs whose assets are public or local (`--stac-url`, the sample catalog)."""

    def sign(self, href: str, *, refresh: bool = False) -> str:
        return href


@dataclass(frozen=True)
class PlanetaryComputerSigner:
    """Appends a PC SAS token to Azure blob hrefs (other hrefs pass through unchanged)."""

    def sign(self, href: str, *, refresh: bool = False) -> str:
        if refresh:
            _forget_token(href)
        try:
            return planetary_computer.sign_url(href)
        except requests.RequestException as err:
            raise StacError(f"could not get a Planetary Computer token for {href}: {err}") from err


def _forget_token(href: str) -> None:
    """Drop the cached token of href's container, so the next sign fetches a fresh one.

    `planetary_computer.get_token` keys its cache by `<sas_url>/<account>/<container>` and only
    renews a token in its last minute, which does not help when the server already rejects it.
    """
    parsed = urlparse(href.rstrip("/"))
    if not parsed.netloc.endswith(sas.BLOB_STORAGE_DOMAIN):
        return
    account, container = parse_blob_url(parsed)
    sas.TOKEN_CACHE.pop(f"{Settings.get().sas_url}/{account}/{container}", None)


def signer_for(stac_url: str) -> Signer:
    """The signer matching the API the items came from."""
    host = (urlparse(stac_url).hostname or "").lower()
    if host == PLANETARY_COMPUTER_HOST or host.endswith("." + PLANETARY_COMPUTER_HOST):
        return PlanetaryComputerSigner()
    return NoSigner()


def load_signer(spec: str, stac_url: str) -> Signer:
    """The signer named by `--signer`; ValueError (one line) for a bad name.

    `auto`: the API's own (Planetary Computer signs, other APIs need nothing); `none`;
    `planetary-computer`; or `package.module:Name` for a store with its own tokens: `Name()` is
    called without arguments and must have `sign(href, *, refresh=False)`, and it travels to the
    dask workers by pickle, so it must be importable there too.
    """
    if spec == "auto":
        return signer_for(stac_url)
    if spec == "none":
        return NoSigner()
    if spec == "planetary-computer":
        return PlanetaryComputerSigner()
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(
            f"signer {spec!r}: use auto, none, planetary-computer or package.module:Name"
        )
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"signer {spec!r} cannot be imported ({err})") from None
    signer = factory()
    if not callable(getattr(signer, "sign", None)):
        raise ValueError(f"signer {spec!r} has no sign(href, refresh=False) method")
    return signer


def local_path(href: str, out_root: Path | None = None) -> str:
    """A location rasterio/laspy can open: http(s) URLs as is, `file://` URIs as local paths.

    Other schemes (s3, az, gs, ...) are rejected: the builder has no credentials for them. With
    `out_root` (the build's output folder), a local input inside it is rejected too, since the
    builder may overwrite files there while still reading them.
    """
    parsed = urlparse(href)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return href
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StacError(f"asset href {href!r} points to another host; only local files work")
        path = url2pathname(parsed.path)
    elif scheme == "":
        path = href
    else:
        raise StacError(
            f"asset href {href!r} has unsupported scheme {scheme!r}; "
            "use http(s)://, file:// or a local path"
        )
    if out_root is not None and Path(path).resolve().is_relative_to(Path(out_root).resolve()):
        raise StacError(f"asset {path} lies inside the output folder {out_root}; move the inputs")
    return path
