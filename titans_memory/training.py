"""The one training loop of the library, on Lightning.

Every estimator (the forecaster, the GluonTS estimator, the DNA classifier) trains through
:func:`fit_module`: it hands over a network, a loss function ``loss_fn(network, batch) -> scalar``
and data; this module supplies the optimiser, progress bar, early stopping on validation loss,
best-checkpoint restore, resumable checkpoints, mixed precision on GPU and the ``devices`` /
``num_nodes`` / ``strategy`` pass-through for multi-GPU and multi-node training.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .errors import CheckpointError, ConfigError
from .ops.barrier_check import raise_pending_barrier_timeouts

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class TrainingConfig:
    """Optimisation and hardware settings shared by every estimator.

    Attributes:
        max_epochs: passes over the training data.
        min_epochs: early stopping never stops before this many epochs.
        max_steps: stop after this many optimiser steps (-1: no limit).
        batch_size: samples per batch (per device).
        learning_rate, weight_decay: AdamW settings.
        warmup_steps: linear warm-up before a cosine decay (``scheduler="cosine"``).
        scheduler: ``"cosine"`` or ``None`` (constant learning rate).
        gradient_clip_val: global gradient-norm clip (None disables).
        early_stopping_patience: epochs without validation improvement before stopping
            (None disables; needs validation data).
        accelerator, devices, num_nodes, strategy: passed to ``lightning.Trainer``
            (``strategy="ddp"`` with ``devices=N`` for data-parallel training).
        precision: Lightning precision; ``None`` picks ``"bf16-mixed"`` on CUDA, else ``"32-true"``.
        num_workers: DataLoader workers.
        checkpoint_dir: where checkpoints go; with ``resume=True`` an interrupted fit continues
            from ``last.ckpt`` there. ``None`` uses a temporary directory.
        resume: continue from ``checkpoint_dir/last.ckpt`` when it exists.
        enable_progress_bar: show Lightning's progress bar.
        seed: seed for weights, shuffling and dropout (None: not seeded).
        limit_train_batches: fraction or count of training batches per epoch (Lightning semantics).
    """

    max_epochs: int = 20
    min_epochs: int = 1
    max_steps: int = -1
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: Optional[str] = "cosine"
    gradient_clip_val: Optional[float] = 1.0
    early_stopping_patience: Optional[int] = 5
    accelerator: str = "auto"
    devices: Union[int, str, List[int]] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Optional[str] = None
    num_workers: int = 0
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    enable_progress_bar: bool = True
    seed: Optional[int] = None
    limit_train_batches: Union[int, float, None] = None

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ConfigError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.scheduler not in (None, "cosine"):
            raise ConfigError(f"scheduler must be 'cosine' or None, got {self.scheduler!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """What :func:`fit_module` returns.

    Attributes:
        best_val_loss: best validation loss seen (``nan`` without validation data).
        epochs: epochs run.
        history: one dict per epoch with ``train_loss`` and (if any) ``val_loss``.
        best_checkpoint: path of the best checkpoint (empty without validation data).
    """

    best_val_loss: float
    epochs: int
    history: List[Dict[str, float]] = field(default_factory=list)
    best_checkpoint: str = ""


def _lightning():
    import lightning.pytorch as pl

    return pl


def resolve_accelerator(accelerator: str) -> str:
    """``"auto"`` -> ``"gpu"`` when CUDA is available, else ``"cpu"``."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


@functools.lru_cache(maxsize=None)
def _make_module_class():
    pl = _lightning()

    class TitansLightningModule(pl.LightningModule):
        """Wraps a network and a loss function; logs ``train_loss`` and ``val_loss``."""

        def __init__(self, network: nn.Module, loss_fn: LossFn, config: TrainingConfig) -> None:
            super().__init__()
            self.network = network
            self.loss_fn = loss_fn
            self.config = config

        def forward(self, *args, **kwargs):
            return self.network(*args, **kwargs)

        def _batch_size(self, batch) -> int:
            first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values())) if isinstance(batch, dict) else batch
            return int(first.shape[0]) if hasattr(first, "shape") else 1

        def training_step(self, batch, batch_idx):
            loss = self.loss_fn(self.network, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}")
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=self._batch_size(batch), sync_dist=True)
            return loss

        def validation_step(self, batch, batch_idx):
            loss = self.loss_fn(self.network, batch)
            self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=self._batch_size(batch), sync_dist=True)
            return loss

        def configure_optimizers(self):
            cfg = self.config
            decay, no_decay = [], []
            for name, p in self.network.named_parameters():
                if not p.requires_grad:
                    continue
                (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=cfg.learning_rate,
            )
            if cfg.scheduler is None:
                return opt
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warm = min(cfg.warmup_steps, total - 1)

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / (warm + 1)
                progress = (step - warm) / max(1, total - warm)
                return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class HistoryCallback(pl.Callback):
        """Records the epoch-level metrics, so estimators can expose a training history."""

        def __init__(self) -> None:
            self.history: List[Dict[str, float]] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            row = {"epoch": float(trainer.current_epoch)}
            for key in ("train_loss", "val_loss"):
                if key in trainer.callback_metrics:
                    row[key] = float(trainer.callback_metrics[key])
            self.history.append(row)

    return TitansLightningModule, HistoryCallback


def lightning_module_class():
    """The LightningModule class of :func:`build_lightning_module` (one class per process), for
    integrations that must subclass it (e.g. to make it serialisable the GluonTS way)."""
    return _make_module_class()[0]


def build_lightning_module(network: nn.Module, loss_fn: LossFn, config: Optional[TrainingConfig] = None):
    """The library's LightningModule around ``network`` and ``loss_fn``.

    For integrations that must hand Lightning a module themselves (e.g. GluonTS's
    ``PyTorchLightningEstimator.create_lightning_module``), so that they share this one training
    step, validation step and optimiser set-up rather than writing another.
    """
    TitansLightningModule, _ = _make_module_class()
    return TitansLightningModule(network, loss_fn, config or TrainingConfig())


def _loader(data, config: TrainingConfig, shuffle: bool, collate_fn=None) -> Optional[DataLoader]:
    if data is None or isinstance(data, DataLoader):
        return data
    return DataLoader(
        data, batch_size=config.batch_size, shuffle=shuffle, num_workers=config.num_workers,
        collate_fn=collate_fn, drop_last=False, persistent_workers=config.num_workers > 0,
    )


def build_trainer(config: TrainingConfig, monitor: bool, extra_callbacks: Sequence[Any] = (), checkpoint_dir: Optional[str] = None):
    """A ``lightning.Trainer`` with the library's defaults; returns ``(trainer, checkpoint_cb, history_cb)``."""
    pl = _lightning()
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    _, HistoryCallback = _make_module_class()
    accelerator = resolve_accelerator(config.accelerator)
    precision = config.precision or ("bf16-mixed" if accelerator == "gpu" else "32-true")
    ckpt = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor="val_loss" if monitor else None,
        mode="min", save_top_k=1, save_last=True, enable_version_counter=False,
    )
    history = HistoryCallback()
    callbacks: List[Any] = [ckpt, history, *extra_callbacks]
    if monitor and config.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=config.early_stopping_patience, strict=False))
    kwargs: Dict[str, Any] = dict(
        max_epochs=config.max_epochs, min_epochs=min(config.min_epochs, config.max_epochs), max_steps=config.max_steps, accelerator=accelerator,
        devices=config.devices, num_nodes=config.num_nodes, strategy=config.strategy,
        precision=precision, gradient_clip_val=config.gradient_clip_val, callbacks=callbacks,
        enable_progress_bar=config.enable_progress_bar, logger=False, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=False,
    )
    if config.limit_train_batches is not None:
        kwargs["limit_train_batches"] = config.limit_train_batches
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer = pl.Trainer(**kwargs)
    return trainer, ckpt, history


def fit_module(
    network: nn.Module,
    loss_fn: LossFn,
    train_data: Union[Dataset, DataLoader],
    val_data: Union[Dataset, DataLoader, None] = None,
    config: Optional[TrainingConfig] = None,
    callbacks: Sequence[Any] = (),
    collate_fn: Optional[Callable] = None,
) -> FitResult:
    """Train ``network`` in place and restore the weights of its best validation epoch.

    Args:
        network: the ``nn.Module`` to train.
        loss_fn: ``loss_fn(network, batch) -> scalar tensor``.
        train_data, val_data: datasets (batched with ``config.batch_size``) or DataLoaders.
        config: :class:`TrainingConfig`.
        callbacks: extra Lightning callbacks (e.g. Optuna's pruning callback).
        collate_fn: batch collation for datasets.
    Returns:
        :class:`FitResult`. Without validation data the final weights are kept.
    """
    config = config or TrainingConfig()
    pl = _lightning()
    if config.seed is not None:
        pl.seed_everything(config.seed, workers=True, verbose=False)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    module = build_lightning_module(network, loss_fn, config)
    train_loader = _loader(train_data, config, shuffle=True, collate_fn=collate_fn)
    val_loader = _loader(val_data, config, shuffle=False, collate_fn=collate_fn)
    tmp = None
    ckpt_dir = config.checkpoint_dir
    if ckpt_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="titans-ckpt-")
        ckpt_dir = tmp.name
    trainer, ckpt_cb, history = build_trainer(config, monitor=val_loader is not None, extra_callbacks=callbacks, checkpoint_dir=ckpt_dir)
    ckpt_path = None
    last = Path(ckpt_dir) / "last.ckpt"
    if config.resume and last.exists():
        ckpt_path = str(last)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            if config.resume:  # the checkpoint directory is expected to hold the run's files
                warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
        # a head-barrier failure of the persistent GPU kernels in the last calls (their default
        # check="async" reports it at the next call): raised now rather than never
        raise_pending_barrier_timeouts(wait=True)
        best = ckpt_cb.best_model_path
        best_score = ckpt_cb.best_model_score
        if val_loader is not None and best:
            state = None
            # with several processes (DDP) only rank 0 wrote the checkpoint, in its own (possibly
            # temporary, possibly node-local) folder: rank 0 reads it and broadcasts the weights
            if trainer.world_size == 1 or trainer.is_global_zero:
                try:
                    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
                except Exception as exc:  # pragma: no cover - corrupt file
                    raise CheckpointError(f"could not read the best checkpoint {best}: {exc}") from exc
            if trainer.world_size > 1:
                state = trainer.strategy.broadcast(state, src=0)
            network.load_state_dict({k[len("network."):]: v for k, v in state.items() if k.startswith("network.")})
        return FitResult(
            best_val_loss=float(best_score) if best_score is not None else float("nan"),
            epochs=trainer.current_epoch,
            history=history.history,
            best_checkpoint=best if tmp is None else "",
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
