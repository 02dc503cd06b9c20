"""The training configuration: one YAML file = one reproducible run (`configs/*.yaml`).

Sections mirror what they configure (model, data, optimiser, loss, trainer) so a config reads
like the paper's table. Unknown keys are errors, not silently ignored: a typo in `max_step`
would otherwise train with the default. `geoseg train` saves the resolved config (CLI
overrides applied) as `RUN/config.yaml`, which is what a rerun or a reader should trust.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from geoseg.datasets.points import PointConfig, TileAugment


class ConfigError(ValueError):
    """A config file that cannot be read or has wrong keys or values."""


class DataError(ValueError):
    """A build folder that is missing, incomplete or unusable for the run."""


@dataclass
class ModelConfig:
    """`create_model(name, **kwargs)`; `in_channels` defaults to the number of data bands."""

    name: str = "ikdnet"
    kwargs: dict[str, Any] = field(default_factory=dict)


PYRAMID_DEVICES = ("auto", "cpu", "gpu")


@dataclass
class DataConfig:
    """Loader settings; `points` are `PointConfig` fields (augmentation is on for training).

    `pyramid_device`: where the point pyramid's kNN indices are computed. "cpu": per tile in
    the DataLoader workers (scipy cKDTree, ~0.25 s per 131072-point tile per core); "gpu": for
    the whole batch on the training device after the transfer (`grid_knn` on CUDA); "auto": gpu when
    training on CUDA, else cpu. Both give the same neighbours (docs/ikdnet.md).
    `cache`: read tiles (pixels and points) from a training cache in `<data>/cache`, built on the
    first run (one LAZ decode per tile), then ~12x less CPU per sample with pyramid_device gpu
    (docs/benchmarks.md, GPU training).
    `epoch_tiles`: tiles drawn (with replacement) per training epoch, the released config's 2000;
    None = one pass over the train split. The LR decays once per epoch, so this sets the schedule.
    `balance`: draw training tiles in proportion to the mean class weight of their labelled
    pixels (`geoseg.datasets.splits.tile_weights`) rather than uniformly (the released way).
    `augment`: `TileAugment` fields (flip, rotate, jitter) for the whole tile.
    `normalise`: "dataset" = the train split's band mean/std (stats.json); "imagenet" = the
    ImageNet RGB mean/std the authors' image loader uses (RGB bands only).
    """

    bands: str | list[str] = "rgbn"
    batch_size: int = 2
    num_workers: int = 0
    points: dict[str, Any] = field(default_factory=dict)
    pyramid_device: str = "auto"
    cache: bool = False
    epoch_tiles: int | None = None
    balance: bool = False
    augment: dict[str, Any] = field(default_factory=dict)
    normalise: str = "dataset"

    def point_config(self) -> PointConfig:
        return PointConfig(**{**self.points, "augment": True})

    def tile_augment(self) -> TileAugment:
        return TileAugment(**self.augment)


@dataclass
class OptimConfig:
    """Adam + ExponentialLR stepped per epoch: the authors' RandLA-Net schedule (γ = 0.9886)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    gamma: float = 0.9886


NORMALISATIONS = ("dataset", "imagenet")


@dataclass
class LossConfig:
    """`HolisticLoss` term weights and consistency settings (see docs/ikdnet.md, "Loss"), and
    the offset of the class weights w = 1/(f + offset) (0.02: the authors'; larger values
    flatten them, e.g. when the class mix of the test site differs from the train split's)."""

    w_img: float = 1.0
    w_pc: float = 1.0
    w_sc: float = 1.0
    temperature: float = 1.0
    sc_detach: str = "none"
    weight_offset: float = 0.02

    def holistic(self) -> dict[str, Any]:
        """`HolisticLoss` keyword arguments (the class-weight offset is used before it)."""
        return {k: v for k, v in asdict(self).items() if k != "weight_offset"}


@dataclass
class TrainerConfig:
    """Lightning Trainer settings; precision "auto" = bf16-mixed on GPU, 32-true on CPU.

    gradient_clip_val defaults to 1: narrow IKD-Net diverged without it.
    `threads`: torch's intra-op CPU threads (None = torch's default, one per core). On a CPU
    shared with a DataLoader worker or other jobs, 1 thread cost ~10x less CPU per step of the
    small sample models than 2 (measured in docs/accuracy.md): small ops wait on busy cores.
    """

    max_steps: int = -1
    max_epochs: int | None = None
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    precision: str = "auto"
    gradient_clip_val: float | None = 1.0
    val_check_interval: int | float | None = None
    check_val_every_n_epoch: int | None = 1
    limit_val_batches: int | float = 1.0
    log_every_n_steps: int = 50
    threads: int | None = None


@dataclass
class InferenceConfig:
    """How `geoseg evaluate` and `geoseg predict` run the trained model by default; written
    into the checkpoint's contract, and their `--tta/--no-tta` override it.

    `tta`: average the prediction over the 8 flips and quarter turns of every tile, image and
    points moved together (`geoseg.train.tta`; 8x the inference compute). Validation during
    training stays one plain forward pass: the best checkpoint is chosen on that.
    """

    tta: bool = False


@dataclass
class CardConfig:
    """What the run's model card says about use and limits beyond what geoseg derives itself
    (data, splits, classes absent from training, metrics)."""

    intended_use: str = (
        "Land-cover segmentation into its classes of aerial tiles like those of its training "
        "build: same bands, pixel size and kind of LiDAR."
    )
    limits: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """A whole run: model, data, optimiser, loss, trainer, inference defaults, the model card's
    words and the seed of everything."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    card: CardConfig = field(default_factory=CardConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "trainer": TrainerConfig,
    "inference": InferenceConfig,
    "card": CardConfig,
}


def _section(cls: type, name: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown keys in {name!r}: {unknown}; known: {sorted(known)}")
    return cls(**values)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and check a `TrainConfig` from plain data (a parsed YAML document)."""
    unknown = sorted(set(values) - {*_SECTIONS, "seed"})
    if unknown:
        raise ConfigError(f"unknown top-level keys {unknown}; known: {[*_SECTIONS, 'seed']}")
    sections = {k: _section(cls, k, values.get(k) or {}) for k, cls in _SECTIONS.items()}
    cfg = TrainConfig(**sections, seed=int(values.get("seed", 0)))
    for name, build in (("points", cfg.data.point_config), ("augment", cfg.data.tile_augment)):
        try:
            build()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad data.{name}: {exc}") from None
    choices = (
        ("data.pyramid_device", cfg.data.pyramid_device, PYRAMID_DEVICES),
        ("data.normalise", cfg.data.normalise, NORMALISATIONS),
        ("loss.sc_detach", cfg.loss.sc_detach, ("none", "point", "pixel")),
    )
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}: {value!r}")
    if cfg.loss.weight_offset <= 0:
        raise ConfigError(f"loss.weight_offset must be > 0: {cfg.loss.weight_offset}")
    if cfg.trainer.threads is not None and cfg.trainer.threads < 1:
        raise ConfigError(f"trainer.threads must be >= 1 or null: {cfg.trainer.threads}")
    if cfg.data.epoch_tiles is not None and cfg.data.epoch_tiles < 1:
        raise ConfigError(f"data.epoch_tiles must be >= 1 or null: {cfg.data.epoch_tiles}")
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML config; every problem is a one-line `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return config_from_dict(values)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config, readable again by `load_config`."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
