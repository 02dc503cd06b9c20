"""benchmarks/accuracy.py's plumbing (not its numbers): every variant is a valid config of the
model it names, the chance row is a constant map, summaries are mean ± std over seeds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

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
