"""geoseg.device: one device rule for every command; a device not here is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from geoseg.device import DeviceError, resolve_device
from tests.utils import cli, one_line_error


def test_auto_cpu_and_devices_that_are_not_here() -> None:
    assert resolve_device() == resolve_device("auto")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceError, match=f"torch sees {gpus} CUDA GPU"):
        resolve_device(f"cuda:{gpus}")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match="unsupported device 'meta'"):
        resolve_device("meta")


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_cli_refuses_a_device_before_any_work(command: str, tmp_path: Path) -> None:
    """Checked before the checkpoint is loaded (only its file was looked at), nothing written."""
    checkpoint = tmp_path / "ckpt" / "model.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"geoseg_contract": {}}, checkpoint)  # passes the cheap file check only
    args = {
        "evaluate": ["--data", tmp_path, "--out", tmp_path / "eval"],
        "predict": ["--image", tmp_path / "scene.tif", "--out", tmp_path / "map.tif"],
    }[command]
    res = cli(command, "--checkpoint", checkpoint, *args, "--device", "cuda:99")
    assert "cuda:99" in one_line_error(res)
    assert list(tmp_path.iterdir()) == [checkpoint.parent]
