"""Shared fixtures: Planetary Computer example JSON and a local STAC API served by rustac."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from geoseg.stac.server import serve_catalog
from tests.utils import geoseg

STAC_EXAMPLES = Path(__file__).parent / "data" / "stac_examples"
CATALOG_COLLECTIONS = ("naip", "3dep-lidar-copc")
ASSET_KEYS = {"naip": "image", "3dep-lidar-copc": "data"}


def load_example(relative: str) -> dict[str, Any]:
    """One JSON document of tests/data/stac_examples, e.g. `items/naip/<id>.json`."""
    return json.loads((STAC_EXAMPLES / relative).read_text())


def example_items(collection: str) -> list[dict[str, Any]]:
    """All example items of a collection, sorted by file name."""
    return [
        json.loads(path.read_text())
        for path in sorted((STAC_EXAMPLES / "items" / collection).glob("*.json"))
    ]


def write_catalog(root: Path, items: dict[str, list[dict[str, Any]]]) -> Path:
    """Write a `serve_catalog` folder with a fake local file behind every item's main asset.

    Hrefs take all three local forms the server must rewrite: relative to the items file (most),
    an absolute path and a `file://` URI (the first two items of each collection).
    """
    (root / "collections").mkdir(parents=True)
    (root / "items").mkdir()
    for collection, features in items.items():
        (root / "collections" / f"{collection}.json").write_text(
            json.dumps(load_example(f"collections/{collection}.json"))
        )
        key = ASSET_KEYS[collection]
        for index, item in enumerate(features):
            asset = root / "assets" / collection / Path(item["assets"][key]["href"]).name
            asset.parent.mkdir(parents=True, exist_ok=True)
            asset.write_bytes(b"fake asset")
            href = {0: str(asset), 1: asset.as_uri()}.get(index)
            item["assets"][key]["href"] = href or f"../assets/{collection}/{asset.name}"
        (root / "items" / f"{collection}.json").write_text(
            json.dumps({"type": "FeatureCollection", "features": features})
        )
    return root


@pytest.fixture(scope="session")
def stac_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog of the naip (10 items) and 3dep-lidar-copc (4 items) PC examples."""
    root = tmp_path_factory.mktemp("catalog") / "catalog"
    return write_catalog(root, {c: example_items(c) for c in CATALOG_COLLECTIONS})


@pytest.fixture(scope="session")
def stac_api(stac_catalog: Path) -> Iterator[str]:
    """URL of a rustac STAC API serving `stac_catalog` for the whole session."""
    with serve_catalog(stac_catalog) as url:
        yield url


@pytest.fixture(scope="session")
def sample_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "sample"
    res = geoseg(
        "build-dataset", "--catalog", "sample", "--workers", "2", "--no-progress", "--out", str(out)
    )
    assert res.returncode == 0, res.stderr
    return out
