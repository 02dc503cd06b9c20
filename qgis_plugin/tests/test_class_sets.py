"""A checkpoint trained on another class set than N3C (ISPRS Vaihingen, `geoseg prepare`) segments
a scene in QGIS and is styled with that class set's names and colours, from the prediction's
STAC item (the plugin has no class table of its own)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ENGINE, ROOT, run_alg
from qgis.core import QgsRasterLayer

pytestmark = pytest.mark.timeout(600)

VAIHINGEN = {  # name: colour of the ISPRS reference (geoseg.prepare.vaihingen.VAIHINGEN)
    "impervious_surfaces": "#ffffff",
    "building": "#0000ff",
    "low_vegetation": "#00ffff",
    "tree": "#00ff00",
    "car": "#ffff00",
    "clutter": "#ff0000",
}


def _engine(*args: str) -> None:
    subprocess.run([ENGINE, *args], check=True, timeout=300, capture_output=True)


@pytest.fixture(scope="module")
def vaihingen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded Vaihingen fixture release, prepared with the engine's geoseg."""
    root = tmp_path_factory.mktemp("vaihingen")
    _engine(str(ROOT / "tests" / "data" / "vaihingen" / "data.py"), str(root / "release"))
    _engine("-m", "geoseg.cli", "prepare", "vaihingen", "--src", str(root / "release"),
            "--out", str(root / "build"), "--tile-size", "32", "--no-progress")  # fmt: skip
    return root


def test_vaihingen_checkpoint_segments_with_its_palette(
    provider: Any, vaihingen: Path, tmp_path: Path
) -> None:
    cfg = yaml.safe_load((ROOT / "configs" / "ikdnet-tiny.yaml").read_text())
    cfg["model"] = {"name": "unet", "kwargs": {"widths": [8, 16, 32, 64]}}
    cfg["data"]["bands"] = ["nir", "red", "green"]  # the TOP's IR-R-G
    config = tmp_path / "unet-vaihingen.yaml"
    config.write_text(yaml.safe_dump(cfg))
    params = {"CONFIG": str(config), "DATA": str(vaihingen / "build"), "MAX_STEPS": 2,
              "OUTPUT": str(tmp_path / "run")}  # fmt: skip
    checkpoint = run_alg("train", params)["CHECKPOINT"]

    # A test-area orthophoto as a scene: the release's TOPs carry no CRS (docs/datasets.md).
    scene = tmp_path / "area2.tif"
    code = (
        "import sys, rasterio; src = rasterio.open(sys.argv[1]); p = src.profile; "
        "p.update(crs='EPSG:32632'); dst = rasterio.open(sys.argv[2], 'w', **p); "
        "dst.write(src.read()); dst.close()"
    )
    top = vaihingen / "release" / "top" / "top_mosaic_09cm_area2.tif"
    _engine("-c", code, str(top), str(scene))
    out = tmp_path / "classes.tif"
    result = run_alg("segment", {"CHECKPOINT": checkpoint, "INPUT": str(scene), "OUTPUT": str(out)})
    layer = QgsRasterLayer(result["OUTPUT"], "classes")
    assert layer.isValid() and layer.width() == QgsRasterLayer(str(scene), "s").width()

    from geoseg_qgis.styling import style_classes

    style_classes(layer, str(out.with_suffix(".json")))
    renderer = layer.renderer()
    assert renderer.type() == "paletted"
    styled = {c.label: c.color.name() for c in renderer.classes()}
    assert styled == VAIHINGEN
