"""`geoseg train`: one config + one build folder -> a run folder that a rerun resumes.

RUN/config.yaml is the resolved config; RUN/checkpoints holds `last.ckpt` (resumed from when
present) and the best `val_loss` checkpoint; RUN/logs the CSV metrics. Inputs are checked
before Lightning starts, so a wrong path or key fails in one line instead of a traceback.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from geoseg.classes import CLASS_COLORS, CLASS_NAMES
from geoseg.datasets.n3c import N3CCalifornia, N3CDataModule
from geoseg.datasets.splits import split_stats
from geoseg.errors import first_line
from geoseg.models import MODELS
from geoseg.train.config import ConfigError, DataError, TrainConfig, save_config
from geoseg.train.losses import class_weights
from geoseg.train.task import CONTRACT_FORMAT, SegmentationTask


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


def resolve_model_kwargs(cfg: TrainConfig, num_bands: int) -> dict[str, Any]:
    """Model kwargs with `in_channels` = number of bands where the model takes an image.

    Deriving it keeps a config from disagreeing with its own band list; an explicit value that
    disagrees is an error rather than a shape mismatch deep inside the first forward pass.
    """
    if cfg.model.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.model.name!r}; choose from {sorted(MODELS)}")
    kwargs = dict(cfg.model.kwargs)
    if "in_channels" in inspect.signature(MODELS[cfg.model.name]).parameters:
        given = kwargs.setdefault("in_channels", num_bands)
        if given != num_bands:
            raise ConfigError(f"model in_channels={given} but data.bands has {num_bands} bands")
    return kwargs


def make_contract(dataset: N3CCalifornia, cfg: TrainConfig, model_kwargs: dict) -> dict[str, Any]:
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
        "class_names": list(CLASS_NAMES),
        "class_colors": [list(CLASS_COLORS[i]) for i in range(len(CLASS_NAMES))],
        "points": points,
        "seed": cfg.seed,
    }


def _on_gpu(cfg: TrainConfig) -> bool:
    return cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def _precision(cfg: TrainConfig) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if _on_gpu(cfg) else "32-true"


def train(cfg: TrainConfig, data: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) a run; returns the path of RUN/checkpoints/last.ckpt.

    Raises `ConfigError`/`DataError` before any training when the inputs are wrong.
    """
    data, out = Path(data), Path(out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.data.pyramid_device == "auto":
        cfg.data.pyramid_device = "gpu" if _on_gpu(cfg) else "cpu"
    dm = N3CDataModule(
        data, cfg.data.batch_size, cfg.data.num_workers, cfg.data.bands,
        cfg.data.point_config(), cfg.seed, neighbours=cfg.data.pyramid_device == "cpu",
        cache_dir=data / "cache" if cfg.data.cache else None,
    )  # fmt: skip
    try:
        dm.setup("fit")
        stats = split_stats(data, "train")
        weights = class_weights(stats["pixels"]), class_weights(stats["points"])
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise DataError(str(exc)) from None
    train_set = dm.datasets["train"]
    model_kwargs = resolve_model_kwargs(cfg, len(train_set.bands))
    cfg.model.kwargs = model_kwargs
    cfg.trainer.precision = _precision(cfg)
    try:
        task = SegmentationTask(
            cfg.model.name,
            model_kwargs,
            weights[0].tolist(),
            weights[1].tolist(),
            make_contract(train_set, cfg, model_kwargs),
            optim=asdict(cfg.optim),
            loss=asdict(cfg.loss),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build model {cfg.model.name!r}: {exc}") from None

    t = cfg.trainer
    # Two ModelCheckpoints: Lightning 2.6 refreshes `save_last` only when the monitored score
    # improves, and a resume must start from the latest state, not the best one.
    checkpoints = [
        ModelCheckpoint(out / "checkpoints", filename="best-{step}", monitor="val_loss"),
        ModelCheckpoint(out / "checkpoints", filename="last", enable_version_counter=False),
        SaveFinalStep(out / "checkpoints" / "last.ckpt"),
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
            limit_val_batches=t.limit_val_batches,
            log_every_n_steps=t.log_every_n_steps,
            callbacks=checkpoints,
            logger=CSVLogger(out, name="logs"),
            enable_progress_bar=progress,
            enable_model_summary=progress,
        )
    except (MisconfigurationException, TypeError, ValueError) as exc:
        raise ConfigError(f"trainer: {first_line(exc)}") from None
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(task, datamodule=dm, ckpt_path=last if last.is_file() else None)
    return last
