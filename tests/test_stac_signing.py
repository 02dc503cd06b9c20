"""Signers, re-signing on HTTP 403 and href resolution; no network anywhere."""

from __future__ import annotations

import pickle
import urllib.error
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from planetary_computer import sas
from rasterio.errors import RasterioIOError

from geoseg.stac.errors import StacError
from geoseg.stac.signing import (
    NoSigner,
    PlanetaryComputerSigner,
    is_forbidden,
    local_path,
    signer_for,
    with_resign,
)

BLOB = "https://naipeuwest.blob.core.windows.net/naip/v002/ca/2022/ca_060cm_2022/33118/m.tif"


class RecordingSigner:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    def sign(self, href: str, *, refresh: bool = False) -> str:
        self.calls.append(refresh)
        return f"{href}?token={len(self.calls)}"


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)


def failing_first(error: Exception):
    seen: list[str] = []

    def read(href: str) -> str:
        seen.append(href)
        if len(seen) == 1:
            raise error
        return f"read {href}"

    return read, seen


def wrapped_403() -> Exception:
    try:
        try:
            raise http_error(403)
        except requests.HTTPError as inner:
            raise OSError("range request failed") from inner
    except OSError as outer:
        return outer


@pytest.mark.parametrize(
    "error",
    [
        http_error(403),  # requests, as raised by laspy's HTTP reader
        urllib.error.HTTPError(BLOB, 403, "Forbidden", None, None),  # type: ignore[arg-type]
        RasterioIOError("HTTP response code: 403"),
        wrapped_403(),
    ],
    ids=["requests", "urllib", "rasterio", "wrapped"],
)
def test_with_resign_refreshes_once_on_403(error: Exception) -> None:
    signer = RecordingSigner()
    read, seen = failing_first(error)
    assert with_resign("x.tif", signer, read) == "read x.tif?token=2"
    assert signer.calls == [False, True]
    assert seen == ["x.tif?token=1", "x.tif?token=2"]


@pytest.mark.parametrize(
    "error",
    [http_error(404), RasterioIOError("x.tif: No such file or directory"), ValueError("403")],
)
def test_with_resign_does_not_retry_other_errors(error: Exception) -> None:
    signer = RecordingSigner()
    read, _ = failing_first(error)
    with pytest.raises(type(error)):
        with_resign("x.tif", signer, read)
    assert signer.calls == [False]


def test_with_resign_gives_up_after_one_refresh() -> None:
    signer = RecordingSigner()

    def always_forbidden(href: str) -> str:
        raise http_error(403)

    with pytest.raises(requests.HTTPError):
        with_resign("x.tif", signer, always_forbidden)
    assert signer.calls == [False, True]


def test_is_forbidden_message_forms() -> None:
    assert is_forbidden(RasterioIOError("'/vsicurl/x.tif': HTTP error code : 403"))
    assert not is_forbidden(RasterioIOError("m_4030_ne.tif not recognized as a supported format"))


def test_no_signer_and_signer_for() -> None:
    assert NoSigner().sign(BLOB) == BLOB == NoSigner().sign(BLOB, refresh=True)
    assert isinstance(
        signer_for("https://planetarycomputer.microsoft.com/api/stac/v1"), PlanetaryComputerSigner
    )
    assert isinstance(signer_for("http://127.0.0.1:7822"), NoSigner)
    assert isinstance(signer_for("https://earth-search.aws.element84.com/v1"), NoSigner)


def test_signers_are_picklable() -> None:
    for signer in (NoSigner(), PlanetaryComputerSigner()):
        assert pickle.loads(pickle.dumps(signer)) == signer


class FakeTokenSession:
    """Stands in for the requests.Session planetary_computer uses to fetch SAS tokens."""

    issued = 0

    def mount(self, *args: object) -> None:
        pass

    def get(self, url: str, headers: object = None) -> FakeTokenSession:
        FakeTokenSession.issued += 1
        return self

    def raise_for_status(self) -> None:
        pass

    def json(self) -> dict:
        expiry = datetime.now(UTC) + timedelta(minutes=45)
        return {"token": f"sig=new{FakeTokenSession.issued}", "msft:expiry": expiry.isoformat()}


def test_pc_signer_refresh_bypasses_token_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sas, "TOKEN_CACHE", {})
    monkeypatch.setattr(sas.requests, "Session", FakeTokenSession)
    FakeTokenSession.issued = 0
    signer = PlanetaryComputerSigner()

    assert signer.sign(BLOB) == f"{BLOB}?sig=new1"
    assert signer.sign(BLOB) == f"{BLOB}?sig=new1"  # cached: still valid for 45 min
    assert signer.sign(BLOB, refresh=True) == f"{BLOB}?sig=new2"
    assert signer.sign(BLOB) == f"{BLOB}?sig=new2"
    assert FakeTokenSession.issued == 2
    # non-blob hrefs are left alone, refresh or not
    assert signer.sign("https://example.com/a.tif", refresh=True) == "https://example.com/a.tif"
    assert FakeTokenSession.issued == 2


def test_pc_signer_token_failure_is_a_stac_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(sas, "TOKEN_CACHE", {})
    monkeypatch.setattr(sas, "get_token", refuse)
    with pytest.raises(StacError, match="could not get a Planetary Computer token"):
        PlanetaryComputerSigner().sign(BLOB)


def test_local_path(tmp_path: Path) -> None:
    assert local_path(BLOB) == BLOB
    assert local_path("file:///data/a%20b.tif") == "/data/a b.tif"
    assert local_path("file://localhost/data/a.tif") == "/data/a.tif"
    assert local_path("/data/a.tif") == "/data/a.tif"
    assert local_path("relative/a.tif") == "relative/a.tif"
    for href, message in [
        ("s3://bucket/a.tif", "unsupported scheme 's3'"),
        ("az://container/a.tif", "unsupported scheme 'az'"),
        ("file://server/share/a.tif", "another host"),
    ]:
        with pytest.raises(StacError, match=message):
            local_path(href)


def test_local_path_rejects_inputs_inside_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    inside = (out / "tiles" / "a.tif").as_uri()
    with pytest.raises(StacError, match="inside the output folder"):
        local_path(inside, out_root=out)
    assert local_path((tmp_path / "in.tif").as_uri(), out_root=out) == str(tmp_path / "in.tif")
