"""Signers, signer selection and href resolution; no network anywhere (re-signing on a real
HTTP 403 is tested against a server in test_remote_reads.py)."""

from __future__ import annotations

import pickle
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from planetary_computer import sas

from geoseg.stac.errors import StacError
from geoseg.stac.signing import (
    NoSigner,
    PlanetaryComputerSigner,
    load_signer,
    local_path,
    signer_for,
)

BLOB = "https://naipeuwest.blob.core.windows.net/naip/v002/ca/2022/ca_060cm_2022/33118/m.tif"


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


def test_load_signer_names_and_import_paths() -> None:
    pc = "https://planetarycomputer.microsoft.com/api/stac/v1"
    assert isinstance(load_signer("auto", pc), PlanetaryComputerSigner)
    assert isinstance(load_signer("auto", "http://127.0.0.1:8080"), NoSigner)
    assert isinstance(load_signer("none", pc), NoSigner)
    assert isinstance(load_signer("planetary-computer", "http://x"), PlanetaryComputerSigner)
    assert isinstance(load_signer("geoseg.stac.signing:NoSigner", pc), NoSigner)
    for spec, message in (
        ("token-service", "use auto, none, planetary-computer or package.module:Name"),
        ("nowhere.module:Signer", "cannot be imported"),
        ("geoseg.stac.signing:Nothing", "cannot be imported"),
        ("pathlib:PurePath", "has no sign(href, refresh=False) method"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            load_signer(spec, pc)
