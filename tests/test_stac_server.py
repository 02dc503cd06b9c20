"""Lifecycle of the local rustac STAC API used for `--catalog sample` and the tests."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from geoseg.stac.errors import StacError
from geoseg.stac.server import sample_catalog_dir, serve_catalog


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/collections", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_served_collections_and_file_hrefs(stac_api: str, stac_catalog: Path) -> None:
    with urllib.request.urlopen(f"{stac_api}/collections") as response:
        served = {c["id"] for c in json.load(response)["collections"]}
    assert served == {"naip", "3dep-lidar-copc"}
    url = f"{stac_api}/collections/naip/items/ca_m_3311805_ne_11_060_20220511"
    with urllib.request.urlopen(url) as response:
        href = json.load(response)["assets"]["image"]["href"]
    assert href == (stac_catalog / "assets/naip/m_3311805_ne_11_060_20220511.tif").as_uri()
    # the source catalog itself is left untouched (relative hrefs stay relative)
    source = json.loads((stac_catalog / "items" / "naip.json").read_text())
    assert source["features"][-1]["assets"]["image"]["href"].startswith("../assets/")


def test_server_stops_on_exit_and_on_error(stac_catalog: Path) -> None:
    with serve_catalog(stac_catalog) as url:
        assert answers(url)
    assert not answers(url)
    with pytest.raises(RuntimeError, match="boom"), serve_catalog(stac_catalog) as url:
        raise RuntimeError("boom")
    assert not answers(url)


def test_port_in_use_is_a_clear_error(stac_catalog: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        expected = r"rustac serve exited with code 1: .*Address already in use"
        with pytest.raises(StacError, match=expected), serve_catalog(stac_catalog, port=port):
            pass


def test_bad_catalogs(tmp_path: Path) -> None:
    with pytest.raises(StacError, match="has no collections"), serve_catalog(tmp_path):
        pass
    (tmp_path / "collections").mkdir()
    (tmp_path / "collections" / "c.json").write_text('{"type": "Collection", "id": "c"}')
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "c.json").write_text('{"type": "Feature", "id": "x"}')
    with pytest.raises(StacError, match="not a GeoJSON FeatureCollection"), serve_catalog(tmp_path):
        pass


def test_sample_catalog_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GEOSEG_DATA_CATALOG", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert sample_catalog_dir() == repo / "data_catalog" / "sample"
    monkeypatch.setenv("GEOSEG_DATA_CATALOG", str(tmp_path))
    assert sample_catalog_dir() == tmp_path / "sample"
