"""Per-split statistics (contracts.md #1): stats.json keeps every split apart, and training
normalises and weights classes with the train split alone, so val and test never leak in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoseg.builder.tile import MANIFEST
from geoseg.classes import CLASS_NAMES
from geoseg.datasets import N3CCalifornia, PointConfig
from geoseg.datasets.splits import split_stats
from tests.utils import checksums, cli, geoseg, one_line_error

TINY = Path(__file__).parents[1] / "configs" / "ikdnet-tiny.yaml"
CFG = PointConfig(num_points=2048)


def test_stats_json_has_each_split_and_they_add_up(sample_build: Path):
    stats = json.loads((sample_build / "stats.json").read_text())
    index = pd.read_parquet(sample_build / "index.parquet")
    manifests = {
        m["tile_id"]: m
        for m in (json.loads(p.read_text()) for p in sample_build.glob(f"tiles/*/{MANIFEST}"))
    }
    assert set(stats["splits"]) == {"train", "val", "test"}
    for split, part in stats["splits"].items():
        assert set(part) == {"bands", "pixels", "points", "asprs"}, split
        tiles = [manifests[t] for t in index.loc[index["split"] == split, "tile_id"]]
        assert part["bands"]["red"]["count"] == sum(m["stats"]["image"]["count"][0] for m in tiles)
        for name in CLASS_NAMES:
            assert part["pixels"][name] == sum(m["pixels"].get(name, 0) for m in tiles)
    buffer = [manifests[t] for t in index.loc[index["split"] == "buffer", "tile_id"]]
    for name, total in stats["pixels"].items():
        summed = sum(stats["splits"][s]["pixels"][name] for s in stats["splits"])
        assert summed + sum(m["pixels"].get(name, 0) for m in buffer) == total, name
    # The splits differ in kind: test holds only NEON TEAK (no buildings), train both sites.
    train, test = stats["splits"]["train"], stats["splits"]["test"]
    assert train["pixels"]["building"] > 0 and test["pixels"]["building"] == 0
    assert train["bands"]["red"]["mean"] != pytest.approx(stats["bands"]["red"]["mean"])


def test_every_split_is_normalised_with_the_train_statistics(sample_build: Path):
    train = split_stats(sample_build, "train")["bands"]
    for split in ("train", "val", "test"):
        ds = N3CCalifornia(sample_build, split, "rgbn", CFG)
        assert ds.mean.tolist() == pytest.approx([train[b]["mean"] for b in ds.bands])
        assert ds.std.tolist() == pytest.approx([train[b]["std"] for b in ds.bands])
    given = N3CCalifornia(sample_build, "test", "rgb", CFG, mean_std=([1, 2, 3], [4, 5, 0]))
    np.testing.assert_array_equal(given.std, [4, 5, 1])  # a zero std only centres


def test_an_old_build_is_refused_until_build_dataset_rewrites_its_stats(
    sample_build: Path, tmp_path: Path
):
    """A stats.json without `splits` (written by an older geoseg): `geoseg train` fails in one
    line telling to rerun build-dataset; that rerun rebuilds no tile and restores the splits."""
    build = Path(
        shutil.copytree(sample_build, tmp_path / "old", ignore=shutil.ignore_patterns("cache"))
    )
    stats = json.loads((build / "stats.json").read_text())
    expected = stats.pop("splits")
    (build / "stats.json").write_text(json.dumps(stats))
    res = cli("train", "--config", TINY, "--data", build, "--out", tmp_path / "run",
              "--max-steps", "1", "--no-progress")  # fmt: skip
    error = one_line_error(res)
    assert "no per-split statistics" in error and "rerun geoseg build-dataset" in error
    assert not (tmp_path / "run").exists()

    before = checksums(build)
    res = geoseg("build-dataset", "--catalog", "sample", "--workers", "1", "--no-progress",
                 "--out", str(build))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads((build / "report.json").read_text())["tiles"]["built"] == 0
    assert checksums(build) == before
    assert json.loads((build / "stats.json").read_text())["splits"] == expected
