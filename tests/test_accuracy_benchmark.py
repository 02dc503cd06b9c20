"""benchmarks/accuracy.py's plumbing (not its numbers): every variant is a valid config of the
model it names, the chance row is a constant map, summaries are mean ± std over seeds."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from geoseg.datasets.splits import split_tiles
from geoseg.models import create_model
from geoseg.train.config import config_from_dict
from geoseg.train.fit import resolve_model_kwargs

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("accuracy", ROOT / "benchmarks" / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(accuracy)


@pytest.mark.parametrize("name", sorted(accuracy.VARIANTS))
def test_every_variant_is_a_valid_run_of_its_model(name: str) -> None:
    base = yaml.safe_load(accuracy.BASE.read_text())
    values = accuracy.variant_config(base, name, seed=2)
    cfg = config_from_dict(values)
    assert cfg.seed == 2 and cfg.data == config_from_dict(base).data  # same data for all
    kwargs = resolve_model_kwargs(cfg, num_bands=4, num_classes=5, num_point_features=2)
    kwargs.pop("weights", None)  # the packaged weights are tested in test_pretrained.py
    model = create_model(cfg.model.name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0
    if name == "ikdnet":
        assert values["model"] == base["model"] and values["loss"] == base["loss"]


def test_chance_row_and_summaries(sample_build: Path) -> None:
    chance = accuracy.majority_row(sample_build)
    stats = json.loads((sample_build / "stats.json").read_text())["splits"]["test"]["pixels"]
    assert chance["pixels"]["predicts"] == "ground"
    labelled = sum(v for k, v in stats.items() if k != "unlabeled")
    assert chance["pixels"]["oa"] == pytest.approx(stats["ground"] / labelled)
    runs = [
        {"steps": 10, "train_cpu_s": 5.0, "train_wall_s": 9.0, "test": {"pixels": {"miou": v}},
         "val": {}}
        for v in (0.5, 0.7)
    ]  # fmt: skip
    summary = accuracy.summarise(runs)
    assert summary["test"]["pixels"]["miou"]["mean"] == pytest.approx(0.6)
    assert summary["test"]["pixels"]["miou"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert "± " in accuracy._pm(summary["test"]["pixels"]["miou"])
    runs[0]["test_last"] = {"pixels": {"miou": 0.4}}
    summary = accuracy.summarise(runs)  # `last` scored in one run only: its own mean
    assert summary["test_last"]["pixels"]["miou"]["mean"] == pytest.approx(0.4)
    results = {"chance": chance, "summary": {"x": {"seeds": 2, "what": "a model"} | summary}}
    best = accuracy.table(results)  # best checkpoint: `last`'s mIoU and the val mIoU beside
    assert "| x | 2 | 0.600 ± 0.141 | 0.400 ± 0.000 | n/a |" in best
    assert "| constant map (ground) | – |" in best
    assert "| x | 2 | 0.400 ± 0.000 | n/a |" in accuracy.table(results, key="test_last")
    assert "| x |" not in accuracy.table(results, kind="points")  # a variant without points
    assert accuracy.tables(results).count("| constant map (ground) |") == 4
    assert "| `x` | a model |" in accuracy.tables(results)


def test_site_views_hold_one_site_each_in_test(sample_build: Path, tmp_path: Path) -> None:
    data = tmp_path / "sample"
    shutil.copytree(sample_build, data, copy_function=os.link)
    index = pd.read_parquet(data / "index.parquet")
    test = index[index["split"] == "test"]
    views = accuracy.site_views(data)
    assert sorted(views) == sorted(str(e) for e in test["epsg"].unique()) and len(views) == 2
    for site, view in views.items():
        mine = pd.read_parquet(view / "index.parquet").set_index("tile_id")["split"]
        assert list(split_tiles(view, "test")["tile_id"]) == sorted(
            test.loc[test["epsg"] == int(site), "tile_id"]
        )  # and their paths are inside the view
        assert (mine == "train").sum() == (index["split"] == "train").sum()
    assert pd.read_parquet(data / "index.parquet").equals(index)  # the build's own is untouched
    made = {site: (view / "index.parquet").stat().st_ino for site, view in views.items()}
    accuracy.site_views(data)  # kept while the build is the same
    assert {site: (v / "index.parquet").stat().st_ino for site, v in views.items()} == made
    fresh = data / "stats.json.new"  # a new build writes a new stats.json
    fresh.write_text((data / "stats.json").read_text())
    os.replace(fresh, data / "stats.json")
    accuracy.site_views(data)
    assert all((v / "stats.json").samefile(data / "stats.json") for v in views.values())
    chance = {"predicts": "ground", "miou": 0.45, "oa": 0.9, "kappa": 0.0}
    runs = [
        {"steps": 1, "train_cpu_s": 1.0, "train_wall_s": 1.0, "test": {},
         "sites": {"32611": {"test": {"pixels": {"miou": v, "iou/tree": v}},
                             "test_last": {"pixels": {"miou": 0.3}},
                             "chance": {"pixels": chance}}}}
        for v in (0.5, 0.7)
    ]  # fmt: skip
    table = accuracy.site_table({"summary": {"x": {"seeds": 2} | accuracy.summarise(runs)}})
    assert "| 32611 | constant map (ground) | – | 0.450 | – | 0.900 | 0.000 | – | – |" in table
    row = "| 32611 | x | 2 | 0.600 ± 0.141 | 0.300 ± 0.000 | n/a | n/a | n/a | 0.600 ± 0.141 |"
    assert row in table


def test_val_scores_come_from_the_model_card() -> None:
    card = {"miou": 0.5, "oa": 0.9, "kappa": 0.4, "iou": {"ground": 0.9, "tree": None},
            "points": None}  # fmt: skip
    assert accuracy._card_scores(card) == {
        "pixels": {"miou": 0.5, "oa": 0.9, "kappa": 0.4, "iou/ground": 0.9, "iou/tree": None}
    }


def test_two_instances_share_one_results_file(tmp_path: Path) -> None:
    """save_run merges into what the file holds now, so `--only` runs in parallel add up."""
    path = tmp_path / "accuracy.json"
    run = {"steps": 1, "train_cpu_s": 1.0, "train_wall_s": 1.0, "load": 1.0,
           "test": {"pixels": {"miou": 0.5}}, "val": {}}  # fmt: skip
    first = {"variants": {"unet": {"what": "u", "runs": {}}}, "calibration": {"unet": 0.1}}
    second = {"variants": {"ikdnet": {"what": "i", "runs": {}}}, "calibration": {"ikdnet": 0.2}}
    accuracy.save_run(path, first, "unet", 0, run)
    accuracy.save_run(path, second, "ikdnet", 0, run)
    accuracy.save_run(path, first, "unet", 1, run)
    saved = json.loads(path.read_text())
    assert {n: sorted(v["runs"]) for n, v in saved["variants"].items()} == {
        "unet": ["0", "1"],
        "ikdnet": ["0"],
    }
    assert saved["calibration"] == {"unet": 0.1, "ikdnet": 0.2}
    assert {n: v["seeds"] for n, v in saved["summary"].items()} == {"unet": 2, "ikdnet": 1}
    assert list(tmp_path.iterdir()) == [path]  # no lock file left behind


def test_a_budget_buys_steps_over_fixed_epochs_with_the_same_total_decay() -> None:
    base = yaml.safe_load(accuracy.BASE.read_text())
    cfg = accuracy.variant_config(base, "unet", seed=0)
    accuracy.budgeted(cfg, per_step=0.5, budget=100.0)  # 200 steps
    steps = cfg["data"]["epoch_tiles"] * accuracy.EPOCHS // cfg["data"]["batch_size"]
    assert steps == 200 and cfg["trainer"]["max_epochs"] == accuracy.EPOCHS
    total = base["optim"]["gamma"] ** base["trainer"]["max_epochs"]
    assert cfg["optim"]["gamma"] ** accuracy.EPOCHS == pytest.approx(total)


def test_a_run_held_by_one_instance_is_skipped_by_another(tmp_path: Path) -> None:
    """Two grid instances with overlapping --only once trained the same seed in one folder, the
    second resuming the first's checkpoint: a run's folder is now held for its whole run."""
    out = tmp_path / "ikdnet" / "seed1"
    other = [
        sys.executable, "-c",
        "import importlib.util, sys; from pathlib import Path; "
        f"s = importlib.util.spec_from_file_location('a', {str(spec.origin)!r}); "
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
        f"print(m.claim(Path({str(out)!r})) is None)",
    ]  # fmt: skip
    held = accuracy.claim(out)
    assert held is not None
    assert subprocess.run(other, capture_output=True, text=True, check=True).stdout == "True\n"
    os.close(held)
    assert subprocess.run(other, capture_output=True, text=True, check=True).stdout == "False\n"
