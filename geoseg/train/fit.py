"""`geoseg train`: one config + one build folder -> a run folder that a rerun resumes.

RUN/config.yaml is the resolved config; RUN/checkpoints holds `last.ckpt` (resumed from when
present) and the best checkpoint by validation mIoU (the released config's criterion);
RUN/logs the CSV metrics; RUN/model_card.{json,md} the model card. Inputs are checked before
Lightning starts, so a wrong path or key fails in one line instead of a traceback.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from geoseg.checkpoints import CONTRACT_KEY, CheckpointError, check_checkpoint_file
from geoseg.classes import ClassSet, build_classes
from geoseg.datasets.n3c import N3CCalifornia, N3CDataModule, band_names
from geoseg.datasets.splits import split_stats, split_tiles, tile_weights
from geoseg.errors import first_line
from geoseg.models import MODELS, uses_points
from geoseg.train.card import cpu_seconds, metrics_entry, new_card, read_card, write_card
from geoseg.train.config import ConfigError, DataError, TrainConfig, save_config
from geoseg.train.losses import class_weights
from geoseg.train.metrics import metrics
from geoseg.train.task import CONTRACT_FORMAT, SegmentationTask

IMAGENET_RGB = {"red": (123.675, 58.395), "green": (116.28, 57.12), "blue": (103.53, 57.375)}
"""ImageNet mean/std in uint8 units: torchvision's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)
times 255, which the authors' image loader applies after ToTensor."""


def normalisation(cfg: TrainConfig, bands: tuple[str, ...], stats: dict[str, Any]) -> tuple:
    """(mean, std) per band: the train split's statistics or ImageNet's (RGB only)."""
    if cfg.data.normalise == "imagenet":
        other = [b for b in bands if b not in IMAGENET_RGB]
        if other:
            raise ConfigError(f"data.normalise imagenet has no statistics for bands {other}")
        return [IMAGENET_RGB[b][0] for b in bands], [IMAGENET_RGB[b][1] for b in bands]
    missing = [b for b in bands if b not in stats["bands"]]
    if missing:
        raise DataError(f"the train split's statistics lack bands {missing}")
    return [stats["bands"][b]["mean"] for b in bands], [stats["bands"][b]["std"] for b in bands]


class ModelCardWriter(Callback):
    """Keeps RUN/model_card.{json,md} current (rank 0): the validation scores of the best
    checkpoint (same criterion as the checkpoint callback: a strictly higher val mIoU) and the
    training progress, with CPU and wall time summed over resumed runs."""

    def __init__(self, run: Path, card: dict[str, Any]) -> None:
        self.run = run
        self.card = card
        best = (card["metrics"].get("val") or {}).get("miou")
        self.best = -math.inf if best is None else best
        previous = card["training"]
        self.t0 = time.perf_counter() - previous.get("wall_seconds", 0.0)
        self.cpu0 = cpu_seconds() - previous.get("cpu_seconds", 0.0)

    def _progress(self, trainer: L.Trainer) -> None:
        self.card["training"] = {
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
            "wall_seconds": round(time.perf_counter() - self.t0, 1),
            "cpu_seconds": round(cpu_seconds() - self.cpu0, 1),
        }

    def on_validation_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        matrices = task.epoch_matrices.get("val")
        if matrices is None:
            return
        miou = metrics(matrices["pixels"], task.class_names)["miou"]
        if not math.isnan(miou) and miou > self.best:
            self.best = miou
            step = trainer.global_step
            self.card["metrics"]["val"] = metrics_entry(
                self.card, matrices["pixels"], matrices["points"], f"best-step={step}.ckpt",
                step=step, epoch=trainer.current_epoch,
                tiles=len(trainer.datamodule.datasets["val"]),
            )  # fmt: skip
        self._progress(trainer)
        write_card(self.run, self.card)

    def on_train_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._progress(trainer)
            write_card(self.run, self.card)


class SaveFinalStep(Callback):
    """Save `last.ckpt` right after the final optimiser step of a `max_steps` run.

    The checkpoint callbacks save at validation and epoch ends only, so the steps after the last
    validation (all of them, in a run shorter than one validation interval) would be lost. Saving
    inside the batch loop keeps the loop state mid-epoch, so a resume continues the same epoch.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable


def resolve_model_kwargs(
    cfg: TrainConfig,
    num_bands: int,
    num_classes: int | None = None,
    num_point_features: int | None = None,
) -> dict[str, Any]:
    """Model kwargs with the sizes the data fixes, where the model takes them: `in_channels` =
    number of bands, `num_classes` = the build's class count (label 0 included),
    `point_in_channels` = xyz + point features.

    Deriving them keeps a config from disagreeing with its data; an explicit value that
    disagrees is an error rather than a shape mismatch deep inside the first forward pass.
    """
    if cfg.model.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.model.name!r}; choose from {sorted(MODELS)}")
    kwargs = dict(cfg.model.kwargs)
    params = inspect.signature(MODELS[cfg.model.name]).parameters
    derived = {
        "in_channels": (num_bands, "data.bands has {} bands"),
        "num_classes": (num_classes, "the build has {} classes (label 0 included)"),
        "point_in_channels": (
            None if num_point_features is None else 3 + num_point_features,
            "xyz + data.points.features make {} point inputs",
        ),
    }
    for key, (value, why) in derived.items():
        if key in params and value is not None:
            given = kwargs.setdefault(key, value)
            if given != value:
                raise ConfigError(f"model {key}={given} but {why.format(value)}")
    return kwargs


def make_contract(
    dataset: N3CCalifornia, cfg: TrainConfig, model_kwargs: dict, classes: ClassSet
) -> dict[str, Any]:
    """The model contract (see `geoseg.train.task`) of a model trained on `dataset`'s build."""
    index = pd.read_parquet(dataset.root / "index.parquet", columns=["split", "gsd", "size"])
    tiles = index[index["split"] == dataset.split]
    points = asdict(dataset.point_config)
    points.pop("augment")
    return {
        "format": CONTRACT_FORMAT,
        "model": cfg.model.name,
        "model_kwargs": model_kwargs,
        "bands": list(dataset.bands),
        "mean": [float(v) for v in dataset.mean],
        "std": [float(v) for v in dataset.std],
        "gsd": float(tiles["gsd"].iloc[0]),
        "tile_size": int(tiles["size"].iloc[0]),
        **classes.contract_keys(),
        "points": points,
        "seed": cfg.seed,
        "tta": cfg.inference.tta,
    }


def _on_gpu(cfg: TrainConfig) -> bool:
    return cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def _precision(cfg: TrainConfig) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if _on_gpu(cfg) else "32-true"


def check_resumable(last: Path, model: str) -> None:
    """A `last.ckpt` found in the run folder must be a geoseg checkpoint of the same model.

    Lightning would otherwise fail deep in its loader with a long unpickling or state-dict
    traceback; here it is one line that says how to go on, before anything is written.
    """
    if not last.exists():
        return
    hint = "move it away or use another --out"
    try:
        check_checkpoint_file(last)
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume: {exc}; {hint}") from None
    except Exception as exc:  # damaged weights: zip, pickle and tensor errors of many kinds
        raise CheckpointError(
            f"cannot resume: {last} is a damaged checkpoint ({first_line(exc)}); {hint}"
        ) from None
    trained = (ckpt.get(CONTRACT_KEY) or {}).get("model")
    if trained != model:
        raise CheckpointError(
            f"cannot resume: {last} holds a {trained!r} model, the config trains {model!r}; {hint}"
        )


@dataclass
class Setup:
    """What a run trains: the data module (set up for fit), the task, the train statistics."""

    dm: N3CDataModule
    task: SegmentationTask
    stats: dict[str, Any]
    contract: dict[str, Any]


def setup(cfg: TrainConfig, data: Path) -> Setup:
    """Check the build, read its train statistics and build the data module and the task;
    resolves `cfg` in place (model kwargs, precision, pyramid device). `ConfigError` or
    `DataError` in one line when the inputs are wrong."""
    if cfg.data.pyramid_device == "auto":
        cfg.data.pyramid_device = "gpu" if _on_gpu(cfg) else "cpu"
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    try:
        split_tiles(data, "train")  # a wrong folder is reported as such, before its statistics
        stats = split_stats(data, "train")
        classes = build_classes(data)
        offset = cfg.loss.weight_offset
        weights = (
            class_weights(stats["pixels"], classes.names, offset),
            class_weights(stats["points"], classes.names, offset),
        )
        mean_std = normalisation(cfg, band_names(cfg.data.bands), stats)
        balance = (
            tile_weights(data, "train", classes.names, weights[0].tolist())
            if cfg.data.balance
            else None
        )
        dm = N3CDataModule(
            data, cfg.data.batch_size, cfg.data.num_workers, cfg.data.bands,
            cfg.data.point_config(), cfg.seed, neighbours=cfg.data.pyramid_device == "cpu",
            cache_dir=data / "cache" if cfg.data.cache else None,
            epoch_tiles=cfg.data.epoch_tiles, augment=cfg.data.tile_augment(), mean_std=mean_std,
            tile_weights=balance,
        )  # fmt: skip
        dm.setup("fit")
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise DataError(str(exc)) from None
    train_set = dm.datasets["train"]
    features = train_set.point_config.features
    model_kwargs = resolve_model_kwargs(cfg, len(train_set.bands), len(classes), len(features))
    cfg.model.kwargs = model_kwargs
    cfg.trainer.precision = _precision(cfg)
    contract = make_contract(train_set, cfg, model_kwargs, classes)
    try:
        task = SegmentationTask(
            cfg.model.name,
            model_kwargs,
            weights[0].tolist(),
            weights[1].tolist(),
            contract,
            optim=asdict(cfg.optim),
            loss=cfg.loss.holistic(),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build model {cfg.model.name!r}: {exc}") from None
    return Setup(dm, task, stats, contract)


def calibration_step(cfg: TrainConfig, data: str | Path) -> Callable[[], None]:
    """One CPU training step of the run `cfg` describes (a batch from the train loader in this
    process, forward, loss, backward, clipped Adam step): what `benchmarks/accuracy.py` times
    to give every model the same CPU budget."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    cfg.data.num_workers = 0
    run = setup(cfg, Path(data))
    task, loader = run.task, run.dm.train_dataloader()
    optimiser = task.configure_optimizers()["optimizer"]
    batches = iter(loader)

    def step() -> None:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        optimiser.zero_grad()
        task.training_step(batch, 0).backward()
        if cfg.trainer.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.trainer.gradient_clip_val)
        optimiser.step()

    task.train()
    return step


def train(cfg: TrainConfig, data: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) a run; returns the path of RUN/checkpoints/last.ckpt.

    Raises `ConfigError`/`DataError`/`CheckpointError` before any training when the inputs are
    wrong.
    """
    data, out = Path(data), Path(out)
    check_resumable(out / "checkpoints" / "last.ckpt", cfg.model.name)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run = setup(cfg, data)
    dm, task, stats, contract = run.dm, run.task, run.stats, run.contract
    model_kwargs = cfg.model.kwargs

    t = cfg.trainer
    card = read_card(out) or new_card(
        contract, data, tile_counts(data), stats, uses_points(cfg.model.name, model_kwargs),
        cfg.card.intended_use, cfg.card.limits,
    )  # fmt: skip
    # Two ModelCheckpoints: Lightning 2.6 refreshes `save_last` only when the monitored score
    # improves, and a resume must start from the latest state, not the best one.
    callbacks = [
        ModelCheckpoint(
            out / "checkpoints", filename="best-{step}", monitor="val_miou", mode="max"
        ),
        ModelCheckpoint(out / "checkpoints", filename="last", enable_version_counter=False),
        SaveFinalStep(out / "checkpoints" / "last.ckpt"),
        ModelCardWriter(out, card),
    ]
    try:  # accelerator/devices this machine lacks: Lightning says which, in one line
        trainer = L.Trainer(
            default_root_dir=out,
            max_steps=t.max_steps,
            max_epochs=t.max_epochs,
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            precision=t.precision,
            gradient_clip_val=t.gradient_clip_val,
            val_check_interval=t.val_check_interval,
            check_val_every_n_epoch=t.check_val_every_n_epoch,
            limit_val_batches=t.limit_val_batches,
            log_every_n_steps=t.log_every_n_steps,
            callbacks=callbacks,
            logger=CSVLogger(out, name="logs"),
            enable_progress_bar=progress,
            enable_model_summary=progress,
        )
    except (MisconfigurationException, TypeError, ValueError) as exc:
        raise ConfigError(f"trainer: {first_line(exc)}") from None
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_card(out, card)
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(task, datamodule=dm, ckpt_path=last if last.is_file() else None)
    return last


def tile_counts(data: Path) -> dict[str, int]:
    """Tiles per split of a build (buffer tiles included: they are part of the build)."""
    index = pd.read_parquet(data / "index.parquet", columns=["split"])
    return {str(k): int(v) for k, v in index["split"].value_counts().sort_index().items()}
