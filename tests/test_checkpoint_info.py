"""`geoseg.checkpoint_info`: a checkpoint's contract and card without torch (the QGIS side)."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

from geoseg.checkpoint_info import (
    CheckpointError,
    classes,
    describe,
    hex_color,
    model_card,
    read_contract,
)
from geoseg.classes import CLASS_COLORS, CLASS_NAMES
from geoseg.predict.sliding import needs_points
from geoseg.train.task import CONTRACT_FORMAT, SegmentationTask, load_model

ROOT = Path(__file__).parents[1]
KWARGS = {
    "ikdnet": {"widths": [8, 16, 32, 64], "point_widths": [4, 8, 16, 32], "ckg_channels": 8},
    "unet": {"widths": [8, 16, 32, 64]},
}


def contract(model: str) -> dict:
    return {
        "format": CONTRACT_FORMAT,
        "model": model,
        "model_kwargs": {**KWARGS[model], "in_channels": 4},
        "bands": ["red", "green", "blue", "nir"],
        "mean": [90.0, 95.0, 80.0, 120.0],
        "std": [40.0, 35.0, 30.0, 45.0],
        "gsd": 0.5,
        "tile_size": 64,
        "class_names": list(CLASS_NAMES),
        "class_colors": [list(CLASS_COLORS[i]) for i in range(len(CLASS_NAMES))],
        "points": {"num_points": 2048, "grid_size": 0.06, "levels": 4, "ratio": 4, "k": 16},
        "seed": 0,
    }


@pytest.fixture(scope="module", params=["ikdnet", "unet"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint of a real (untrained) task, saved by a real Trainer."""
    model = request.param
    task = SegmentationTask(model, contract(model)["model_kwargs"], [1.0] * 5, [1.0] * 5,
                            contract(model))  # fmt: skip
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=0)  # fmt: skip
    trainer.strategy.connect(task)
    out = tmp_path_factory.mktemp(model) / "run" / "checkpoints" / "last.ckpt"
    out.parent.mkdir(parents=True)
    trainer.save_checkpoint(out)
    return out


def test_contract_read_without_torch_equals_the_loaders(checkpoint: Path) -> None:
    ours = read_contract(checkpoint)
    _, theirs = load_model(checkpoint)
    assert ours == theirs


def test_describe_from_the_contract_and_from_a_card(checkpoint: Path) -> None:
    info = describe(checkpoint)
    model = info["model"]
    assert info["card"] is False and info["needs_points"] is None  # only geoseg can tell
    assert [c["name"] for c in info["classes"]] == list(CLASS_NAMES[1:])
    assert info["classes"][2] == {"value": 3, "name": "tree", "color": "#228b22"}
    assert info["gsd"] == 0.5 and info["tile_size"] == 64 and info["seed"] == 0
    card = {
        "model": model,
        "needs_points": needs_points(read_contract(checkpoint)),
        "classes": [
            {"value": 0, "name": "unlabeled", "color": [0, 0, 0, 0]},
            {"value": 1, "name": "low", "color": [1, 2, 3, 255]},
        ],
        "metrics": {"test": {"miou": 0.5}},
        "limits": "tiny",
    }
    (checkpoint.parents[1] / "model_card.json").write_text(json.dumps(card))
    try:
        info = describe(checkpoint)
        assert info["card"] and info["needs_points"] is (model == "ikdnet")
        assert info["classes"] == [{"value": 1, "name": "low", "color": "#010203"}]
        assert info["limits"] == "tiny"
        assert model_card(checkpoint) == card
    finally:
        (checkpoint.parents[1] / "model_card.json").unlink()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "checkpoint not found"),
        ("folder", "is a folder, not a file"),
        (b"plain text", "(not a PyTorch archive, or truncated: "),
        ("zip", "(no PyTorch data in it)"),
        ("foreign", "(no geoseg_contract in it)"),
        ("evil", "(no geoseg_contract in it)"),
    ],
)
def test_bad_checkpoints_are_one_line(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "x.ckpt"
    marker = tmp_path / "ran"
    if make == "folder":
        path.mkdir()
    elif make == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("a.txt", "x")
    elif make == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif make == "evil":  # a pickle that would run code if its classes were resolved
        torch.save({"x": 1}, path)
        with zipfile.ZipFile(path) as zf:
            names = {n: zf.read(n) for n in zf.namelist()}
        pkl = next(n for n in names if n.endswith("data.pkl"))
        names[pkl] = pickle.dumps(Evil(str(marker)), protocol=2)
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in names.items():
                zf.writestr(name, data)
    elif isinstance(make, bytes):
        path.write_bytes(make)
    with pytest.raises(CheckpointError) as info:
        read_contract(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def test_colours() -> None:
    assert hex_color([255, 170, 0, 255]) == "#ffaa00" and hex_color("FFAA00") == "#ffaa00"
    assert classes({"class_names": ["u", "a"], "class_colors": [[0, 0, 0], [1, 2, 3]]}) == [
        {"value": 1, "name": "a", "color": "#010203"}
    ]


def test_plugin_ships_an_identical_copy() -> None:
    shipped = ROOT / "qgis_plugin" / "geoseg_qgis" / "checkpoint_info.py"
    assert shipped.read_bytes() == (ROOT / "geoseg" / "checkpoint_info.py").read_bytes()
