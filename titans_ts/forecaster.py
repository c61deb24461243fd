"""``TitansForecaster``: a scikit-learn style estimator for multi-series forecasting.

Three lines::

    from titans_ts import TitansForecaster
    model = TitansForecaster(h=96, input_size=96).fit(df)     # long or wide, pandas or polars
    forecast = model.predict()                                 # unique_id, ds, TitansForecaster

Data: see :mod:`titans_ts.panel` for the accepted layouts and the validation. Training windows
are every ``input_size + h`` slice of every series (stride ``window_step``) that ends before the
last ``val_size`` steps; validation windows are every window whose ``h`` targets lie in the last
``val_size`` steps of each series (their inputs may reach back into the training part, as in the
standard LTSF splits). Early stopping and the restored weights use the validation loss only.
With aligned series (identical timestamps) a window holds all series at once (``batch_size``
counts such multivariate windows, as in the LTSF literature); otherwise one series.

Scaling: ``scaler="standard"`` z-scores every series and covariate with the mean and standard
deviation of its training rows (validation rows excluded); forecasts are mapped back. The network
also applies RevIN to every window (``revin=True``).

Covariates (long format: every column besides id / time / target; wide format: the numeric columns
not in ``target_cols``) are past covariates: they enter the input window as extra channels next to
the target (concatenated into each patch token), and are not forecast. Forecasting beyond ``h``
with covariates is therefore not possible.

Output columns follow neuralforecast: the model column (``alias`` or ``"TitansForecaster"``) holds
the point forecast (the median for ``loss="quantile"``); quantile ``q < 0.5`` is ``<model>-lo-<l>``
and ``q > 0.5`` is ``<model>-hi-<l>`` with the level ``l = 100 - 200 q`` (resp. ``200 q - 100``),
e.g. quantiles 0.1 / 0.9 -> ``-lo-80`` / ``-hi-80``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator

from titans_memory import MemoryConfig, TitansConfig
from titans_memory.errors import CheckpointError, ConfigError, DataError, NotFittedError
from titans_memory.training import TrainingConfig, fit_module

from .errors import ColumnError, SeriesTooShortError
from .module import CHANNEL_MODES, HEADS, ForecastLoss, TitansForecastNetwork, n_patches
from .panel import NAN_POLICIES, Panel, future_times, make_frame, read_panel
from .windows import WindowCollate, WindowDataset, WindowStore, gather_inputs

__all__ = ["TitansForecaster", "quantile_column"]

LOSSES = ("mse", "mae", "quantile")
DEFAULT_QUANTILES = (0.1, 0.5, 0.9)
FORMAT = "titans-forecaster/1"


def quantile_column(model: str, q: float) -> str:
    """neuralforecast's column name of quantile ``q``: ``<model>-lo-<level>`` / ``-hi-<level>``
    (``model`` itself for the median)."""
    if abs(q - 0.5) < 1e-12:
        return model
    level = round(abs(200.0 * q - 100.0), 6)
    return f"{model}-{'lo' if q < 0.5 else 'hi'}-{level:g}"


class TitansForecaster(BaseEstimator):
    """Titans neural-memory forecaster (arXiv 2501.00663) for one or many series.

    ``__init__`` only stores its arguments (scikit-learn convention); they are checked by
    :meth:`fit`. Fitted attributes end in ``_``.

    Args:
        h: forecast horizon (steps).
        input_size: look-back window (steps).
        variant: Titans variant, ``"lmm"`` (memory alone), ``"mac"``, ``"mag"`` or ``"mal"``.
        d_model, n_layers, n_heads: backbone width, depth and heads.
        patch_len, stride: patching of the input window (end padded by ``stride`` steps).
        channel_mode: ``"independent"`` (each series its own sequence, shared weights; a global
            model that forecasts unseen series too) or ``"mixing"`` (a token concatenates the
            patches of all series; needs aligned series).
        head: ``"flatten"`` (all patch tokens -> horizon, default) or ``"last"`` (last token only).
        memory_depth, memory_expansion: layers and hidden width (x head_dim) of the memory MLP.
        chunk_size: memory chunk (tokens); gradients inside a chunk are taken at its start weights.
        ffn_mult: feed-forward width multiple (0: none). dropout: backbone dropout;
        head_dropout: dropout before the head.
        persistent_tokens, window_size, segment_size: attention settings of mac / mag / mal.
        revin, revin_affine: reversible instance normalisation (and its affine parameters).
        loss: ``"mse"``, ``"mae"`` or ``"quantile"`` (pinball loss).
        quantiles: quantile levels for ``loss="quantile"`` (default 0.1, 0.5, 0.9; 0.5 is always
            added, it is the point forecast).
        max_epochs, max_steps, batch_size, learning_rate, weight_decay: optimisation.
        val_size: validation steps at the end of each series (``None``: 10% of the shortest
            series, at least ``h``, or 0 when the series are too short; 0: no validation, no
            early stopping). Must be 0 or >= ``h``.
        window_step: stride between training windows (1 = every window).
        train_fraction: fraction of the training windows drawn (at random, anew) in each epoch;
            1.0 uses all of them. Cheaper epochs with validation more often, for large sets of
            highly overlapping windows.
        early_stopping_patience: epochs without validation improvement before stopping.
        scaler: ``"standard"`` (per series, fit on the training rows) or None.
        nan_policy: ``"error"`` (default), ``"interpolate"`` (linear in time, ends held) or
            ``"mask"`` (inputs interpolated, missing targets left out of the loss).
        freq: frequency override (pandas alias, or int step for integer timestamps); None infers.
        device: ``"auto"`` (GPU when available), ``"cpu"``, ``"gpu"``/``"cuda"``, ``"cuda:N"``, ``"mps"``.
        devices, strategy, num_nodes, precision, num_workers: passed to the Lightning trainer via
            (``devices=1`` by default: one GPU or the CPU; ``devices=N, strategy="ddp"`` for
            data-parallel training, which relaunches the script, so not from a notebook)
            :class:`~titans_memory.training.TrainingConfig` (precision None: bf16-mixed on GPU).
        random_state: seed of the weights and of the training order.
        checkpoint_dir: directory for training checkpoints; when set, a fit that was interrupted
            resumes from its ``last.ckpt`` there when the same fit is run again (use a fresh
            directory for a new fit). None: a temporary directory, no resume.
        enable_progress_bar: Lightning's progress bar.
        alias: name of the forecast column (default ``"TitansForecaster"``).
        eval_batch_size: windows per forward pass at prediction (None: 4 x batch_size).
    """

    def __init__(
        self,
        h: int = 96,
        input_size: int = 96,
        variant: str = "lmm",
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        patch_len: int = 16,
        stride: int = 8,
        channel_mode: str = "independent",
        head: str = "flatten",
        memory_depth: int = 2,
        memory_expansion: int = 2,
        chunk_size: int = 16,
        ffn_mult: int = 2,
        dropout: float = 0.1,
        head_dropout: float = 0.0,
        persistent_tokens: int = 4,
        window_size: int = 16,
        segment_size: int = 16,
        revin: bool = True,
        revin_affine: bool = False,
        loss: str = "mse",
        quantiles: Optional[Sequence[float]] = None,
        max_epochs: int = 10,
        max_steps: int = -1,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        val_size: Optional[int] = None,
        window_step: int = 1,
        train_fraction: float = 1.0,
        early_stopping_patience: Optional[int] = 3,
        scaler: Optional[str] = "standard",
        nan_policy: str = "error",
        freq: Any = None,
        device: str = "auto",
        devices: Any = 1,
        strategy: Any = "auto",
        num_nodes: int = 1,
        precision: Optional[str] = None,
        num_workers: int = 0,
        random_state: Optional[int] = None,
        checkpoint_dir: Optional[str] = None,
        enable_progress_bar: bool = True,
        alias: Optional[str] = None,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        self.h = h
        self.input_size = input_size
        self.variant = variant
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.patch_len = patch_len
        self.stride = stride
        self.channel_mode = channel_mode
        self.head = head
        self.memory_depth = memory_depth
        self.memory_expansion = memory_expansion
        self.chunk_size = chunk_size
        self.ffn_mult = ffn_mult
        self.dropout = dropout
        self.head_dropout = head_dropout
        self.persistent_tokens = persistent_tokens
        self.window_size = window_size
        self.segment_size = segment_size
        self.revin = revin
        self.revin_affine = revin_affine
        self.loss = loss
        self.quantiles = quantiles
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.val_size = val_size
        self.window_step = window_step
        self.train_fraction = train_fraction
        self.early_stopping_patience = early_stopping_patience
        self.scaler = scaler
        self.nan_policy = nan_policy
        self.freq = freq
        self.device = device
        self.devices = devices
        self.strategy = strategy
        self.num_nodes = num_nodes
        self.precision = precision
        self.num_workers = num_workers
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.enable_progress_bar = enable_progress_bar
        self.alias = alias
        self.eval_batch_size = eval_batch_size

    # ------------------------------------------------------------------------------------------
    # parameters
    @property
    def model_name(self) -> str:
        """The forecast column's name."""
        return self.alias or type(self).__name__

    def _check_params(self) -> None:
        def pos_int(name, v, minimum=1):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {v!r}")

        pos_int("h", self.h)
        pos_int("input_size", self.input_size)
        pos_int("window_step", self.window_step)
        pos_int("batch_size", self.batch_size)
        if isinstance(self.train_fraction, bool) or not isinstance(self.train_fraction, (int, float)) or not 0 < self.train_fraction <= 1:
            raise ConfigError(f"train_fraction must be in (0, 1], got {self.train_fraction!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.quantiles is not None:
            if self.loss != "quantile":
                raise ConfigError(f"quantiles are only used with loss='quantile' (got loss={self.loss!r})")
            qs = list(self.quantiles)
            if not qs or any(not (0.0 < float(q) < 1.0) for q in qs):
                raise ConfigError(f"quantiles must be a non-empty list of levels in (0, 1), got {self.quantiles!r}")
        if self.channel_mode not in CHANNEL_MODES:
            raise ConfigError(f"channel_mode must be one of {CHANNEL_MODES}, got {self.channel_mode!r}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.scaler not in ("standard", None):
            raise ConfigError(f"scaler must be 'standard' or None, got {self.scaler!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.val_size is not None:
            pos_int("val_size", self.val_size, 0)
            if 0 < self.val_size < self.h:
                raise ConfigError(f"val_size must be 0 or >= h={self.h} (a validation window needs h targets), got {self.val_size}")
        if not 1 <= self.patch_len <= self.input_size:
            raise ConfigError(f"patch_len must be in 1..input_size={self.input_size}, got {self.patch_len}")
        if not 1 <= self.stride <= self.patch_len:
            raise ConfigError(f"stride must be in 1..patch_len={self.patch_len}, got {self.stride}")

    def _quantile_levels(self) -> Optional[List[float]]:
        if self.loss != "quantile":
            return None
        qs = DEFAULT_QUANTILES if self.quantiles is None else self.quantiles
        return sorted({round(float(q), 10) for q in qs} | {0.5})

    def _backbone_config(self) -> TitansConfig:
        n_tok = n_patches(self.input_size, self.patch_len, self.stride)
        return TitansConfig(
            d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, variant=self.variant,
            memory=MemoryConfig(depth=self.memory_depth, expansion=self.memory_expansion,
                                chunk_size=self.chunk_size if self.chunk_size else n_tok),
            persistent_tokens=self.persistent_tokens, segment_size=self.segment_size,
            window_size=self.window_size, ffn_mult=self.ffn_mult, dropout=self.dropout,
        )

    def _accelerator(self):
        d = str(self.device).lower() if self.device is not None else "auto"
        devices = self.devices
        if d == "auto":
            return "auto", devices
        if d == "cpu":
            return "cpu", devices
        if d in ("gpu", "cuda"):
            return "gpu", devices
        if d.startswith("cuda:"):
            return "gpu", [int(d.split(":", 1)[1])] if devices in ("auto", 1) else devices
        if d == "mps":
            return "mps", devices
        raise ConfigError(f"device must be 'auto', 'cpu', 'gpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")

    def _torch_device(self) -> torch.device:
        d = str(self.device).lower() if self.device is not None else "auto"
        if d == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if d == "gpu":
            return torch.device("cuda")
        return torch.device(d)

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(df) first")

    # ------------------------------------------------------------------------------------------
    # fit
    def fit(
        self,
        df: Any,
        *,
        format: str = "auto",  # noqa: A002 - the public name asked for
        id_col: str = "unique_id",
        time_col: str = "ds",
        target_col: str = "y",
        target_cols: Optional[Sequence[str]] = None,
        callbacks: Sequence[Any] = (),
    ) -> "TitansForecaster":
        """Fit on ``df`` (pandas or polars; long or wide, see :mod:`titans_ts.panel`).

        Args:
            df: the training frame.
            format: ``"auto"``, ``"long"`` or ``"wide"``.
            id_col, time_col, target_col: long-format column names (the time column of a wide
                frame is ``time_col``, else ``date``, else its first datetime column).
            target_cols: wide format only: the series to forecast (other numeric columns become
                covariates); None forecasts every numeric column.
            callbacks: extra Lightning callbacks (e.g. Optuna's pruning callback on ``val_loss``).
        Returns:
            ``self``.
        """
        self._check_params()
        panel = read_panel(df, layout=format, id_col=id_col, time_col=time_col, target_col=target_col,
                           target_cols=target_cols, freq=self.freq, nan_policy=self.nan_policy)
        self.columns_ = {"id_col": id_col, "time_col": time_col, "target_col": target_col,
                         "layout": panel.layout, "backend": panel.backend,
                         "target_cols": None if target_cols is None else list(target_cols)}
        return self._fit_panel(panel, callbacks)

    def _resolve_val_size(self, panel: Panel) -> int:
        need = self.input_size + self.h
        shortest = min(panel.lengths)
        if self.val_size is not None:
            return int(self.val_size)
        v = max(self.h, int(0.1 * shortest))
        return v if shortest - v >= need else 0

    def _fit_panel(self, panel: Panel, callbacks: Sequence[Any] = ()) -> "TitansForecaster":
        L, H = self.input_size, self.h
        val = self._resolve_val_size(panel)
        need = L + H + val
        for sid, n in zip(panel.ids, panel.lengths):
            if n < need:
                extra = f" + val_size {val}" if val else ""
                raise SeriesTooShortError(
                    f"series {sid!r} has {n} steps, fewer than input_size {L} + h {H}{extra} = {need}; "
                    f"drop it, or lower input_size / h{' / val_size' if val else ''}"
                )
        aligned = panel.n_series == 1 or panel.aligned
        if self.channel_mode == "mixing" and not aligned:
            lens = dict(zip(panel.ids, panel.lengths))
            raise DataError(
                "channel_mode='mixing' needs every series on the same timestamps, but they differ "
                f"(lengths {dict(list(lens.items())[:4])}...); align them (same start and end) or use channel_mode='independent'"
            )
        quantiles = self._quantile_levels()
        # scaler on the training rows of each series
        train_rows = [n - val for n in panel.lengths]
        if self.scaler == "standard":
            mean, std = _fit_scaler(panel, train_rows)
        else:
            mean = np.zeros((panel.n_series, panel.n_features))
            std = np.ones((panel.n_series, panel.n_features))
        scaled = [(v - m) / s for v, m, s in zip(panel.values, mean, std)]
        if aligned:
            store = WindowStore([np.stack(scaled, axis=1)], [list(range(panel.n_series))],
                                None if panel.observed is None else [np.stack(panel.observed, axis=1)])
        else:
            store = WindowStore([v[:, None, :] for v in scaled], [[i] for i in range(panel.n_series)],
                                None if panel.observed is None else [o[:, None] for o in panel.observed])
        W = L + H
        lens = [g.length for g in store.groups]
        train = WindowDataset(store.starts(W, [0] * len(lens), [n - val - W for n in lens], self.window_step))
        valid = None
        if val:
            valid = WindowDataset(store.starts(W, [n - val - L for n in lens], [n - W for n in lens], 1))
        s_per_window = len(store.groups[0].series)
        if self.random_state is not None:
            torch.manual_seed(int(self.random_state))
        network = TitansForecastNetwork(
            L, H, panel.n_features, s_per_window, self._backbone_config(), self.patch_len, self.stride,
            self.channel_mode, self.head, quantiles, self.revin, self.revin_affine, self.head_dropout,
        )
        accelerator, devices = self._accelerator()
        patience = self.early_stopping_patience if val else None
        if 0 < int(self.max_steps) < math.ceil(self.train_fraction * len(train) / int(self.batch_size)):
            patience = None  # training stops inside the first epoch, before any validation
        config = TrainingConfig(
            max_epochs=int(self.max_epochs), max_steps=int(self.max_steps), batch_size=int(self.batch_size),
            learning_rate=float(self.learning_rate), weight_decay=float(self.weight_decay),
            early_stopping_patience=patience,
            accelerator=accelerator, devices=devices, num_nodes=self.num_nodes, strategy=self.strategy,
            precision=self.precision, num_workers=self.num_workers,
            enable_progress_bar=self.enable_progress_bar, seed=self.random_state,
            checkpoint_dir=None if self.checkpoint_dir is None else str(self.checkpoint_dir),
            resume=self.checkpoint_dir is not None,
            limit_train_batches=float(self.train_fraction) if self.train_fraction < 1 else None,
        )
        t0 = time.perf_counter()
        result = fit_module(network, ForecastLoss(self.loss, quantiles), train, valid, config,
                            callbacks=list(callbacks), collate_fn=WindowCollate(store, L, H))
        self.train_seconds_ = time.perf_counter() - t0
        self.model_ = network.eval().to(self._torch_device())
        self.config_ = {
            "input_size": L, "h": H, "n_features": panel.n_features, "n_series": s_per_window,
            "backbone": self._backbone_config().to_dict(), "patch_len": self.patch_len, "stride": self.stride,
            "channel_mode": self.channel_mode, "head": self.head, "quantiles": quantiles,
            "revin": self.revin, "revin_affine": self.revin_affine, "head_dropout": self.head_dropout,
        }
        self.quantiles_ = quantiles
        self.series_ids_ = list(panel.ids)
        self.freq_ = panel.freq
        self.tz_ = panel.tz
        self.exog_ = list(panel.exog)
        self.aligned_ = bool(aligned)
        self.val_size_ = int(val)
        self.last_ds_ = {sid: _scalar_time(t[-1]) for sid, t in zip(panel.ids, panel.times)}
        self.scaler_ = {"mean": mean, "std": std} if self.scaler == "standard" else None
        self.history_ = result.history
        self.best_val_loss_ = result.best_val_loss
        self.n_epochs_ = result.epochs
        self.n_train_windows_ = len(train)
        self.n_val_windows_ = 0 if valid is None else len(valid)
        self._tails = np.stack([v[-L:] for v in panel.values])  # [S, L, F] unscaled
        return self

    # ------------------------------------------------------------------------------------------
    # prediction core
    def _stats(self, ids: Sequence[Any], panel: Optional[Panel] = None):
        """Scaler mean/std ``[S, F]`` for ``ids``: fitted stats, else (new series) from ``panel``."""
        n_f = self.config_["n_features"]
        if self.scaler_ is None:
            return np.zeros((len(ids), n_f)), np.ones((len(ids), n_f))
        pos = {k: i for i, k in enumerate(self.series_ids_)}
        mean, std = np.empty((len(ids), n_f)), np.empty((len(ids), n_f))
        for j, sid in enumerate(ids):
            if sid in pos:
                mean[j], std[j] = self.scaler_["mean"][pos[sid]], self.scaler_["std"][pos[sid]]
            else:
                p = panel.select([sid])
                m, s = _fit_scaler(p, p.lengths)
                mean[j], std[j] = m[0], s[0]
        return mean, std

    @torch.no_grad()
    def _network_forecast(self, x: torch.Tensor, horizon: int) -> torch.Tensor:
        """Scaled inputs ``[N, L, S, F]`` -> scaled forecasts ``[N, horizon, S(, Q)]``; rolls
        forward beyond ``h`` feeding back the point forecast."""
        net, dev = self.model_, next(self.model_.parameters()).device
        net.eval()
        bs = int(self.eval_batch_size or 4 * self.batch_size)
        L, H = self.config_["input_size"], self.config_["h"]
        outs = []
        for a in range(0, x.shape[0], bs):
            cur = x[a : a + bs].to(dev, torch.float32)
            pieces, done = [], 0
            while done < horizon:
                p = net(cur).float()
                pieces.append(p)
                done += H
                if done < horizon:
                    point = p if self.quantiles_ is None else p[..., self.quantiles_.index(0.5)]
                    cur = torch.cat([cur, point.unsqueeze(-1)], dim=1)[:, -L:]
            outs.append(torch.cat(pieces, dim=1)[:, :horizon].cpu())
        return torch.cat(outs) if outs else torch.zeros((0, horizon) + tuple(x.shape[2:3]))

    def _check_horizon(self, horizon: Optional[int]) -> int:
        horizon = self.config_["h"] if horizon is None else horizon
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ConfigError(f"horizon must be a positive integer, got {horizon!r}")
        if horizon > self.config_["h"]:
            if self.config_["n_features"] > 1:
                raise ConfigError(
                    f"horizon {horizon} > h={self.config_['h']} needs future covariate values; this model "
                    f"uses covariates {self.exog_} as past inputs only: refit with h >= {horizon}"
                )
            warnings.warn(
                f"horizon {horizon} > h={self.config_['h']}: forecasting autoregressively, feeding the "
                f"model's own forecasts back as inputs (errors compound; quantile bands do not widen "
                f"with the rolled-forward uncertainty)", UserWarning, stacklevel=3,
            )
        return int(horizon)

    def _select_quantiles(self, p: np.ndarray, quantiles: Optional[Sequence[float]]):
        """``p`` ``[..., Q]`` (trained levels) -> (point ``[...]``, {q: values}) for ``quantiles``."""
        if self.quantiles_ is None:
            if quantiles is not None:
                raise ConfigError(f"this model was trained with loss={self.loss!r} and has no quantiles; use loss='quantile'")
            return p, {}
        trained = np.asarray(self.quantiles_)
        point = p[..., self.quantiles_.index(0.5)]
        wanted = [q for q in self.quantiles_ if q != 0.5] if quantiles is None else [float(q) for q in quantiles]
        out = {}
        for q in wanted:
            if not trained[0] - 1e-9 <= q <= trained[-1] + 1e-9:
                raise ConfigError(f"quantile {q} is outside the trained range [{trained[0]}, {trained[-1]}]; refit with quantiles including it")
            j = int(np.clip(np.searchsorted(trained, q) - 1, 0, len(trained) - 2)) if len(trained) > 1 else 0
            if len(trained) == 1 or abs(trained[j] - q) < 1e-9:
                out[q] = p[..., j]
            elif abs(trained[j + 1] - q) < 1e-9:
                out[q] = p[..., j + 1]
            else:
                w = (q - trained[j]) / (trained[j + 1] - trained[j])
                out[q] = (1 - w) * p[..., j] + w * p[..., j + 1]
        return point, out

    def _panel_inputs(self, panel: Panel, ends: List[np.ndarray]):
        """Scaled input windows for ``panel`` ending at local rows ``ends[i]`` of each series.

        Returns ``(x [n, L, S, F], layout)`` where ``layout`` maps each output window back:
        a list of ``(series indices, local end rows)`` per group."""
        L = self.config_["input_size"]
        mean, std = self._stats(panel.ids, panel)
        scaled = [(v - m) / s for v, m, s in zip(panel.values, mean, std)]
        if self.channel_mode == "mixing":  # independent: every series on its own (same result)
            block = torch.from_numpy(np.stack(scaled, axis=1).astype(np.float32))
            x = gather_inputs(block, ends[0], L)
            return x, [(list(range(panel.n_series)), ends[0])], (mean, std)
        xs, layout = [], []
        for i, (v, e) in enumerate(zip(scaled, ends)):
            xs.append(gather_inputs(torch.from_numpy(v[:, None, :].astype(np.float32)), e, L))
            layout.append(([i], e))
        return torch.cat(xs), layout, (mean, std)

    def _forecast_panel(self, panel: Panel, ends: List[np.ndarray], horizon: int, quantiles):
        """Forecasts for windows ending at ``ends`` (local rows, per series). Returns a list per
        series of ``(end rows, point [n, H], {q: [n, H]})`` in original units."""
        x, layout, (mean, std) = self._panel_inputs(panel, ends)
        p = self._network_forecast(x, horizon).numpy().astype(np.float64)   # [n, H, S(, Q)]
        results: List[Any] = [None] * panel.n_series
        row = 0
        for series, e in layout:
            block = p[row : row + len(e)]
            row += len(e)
            for k, i in enumerate(series):
                vals = block[:, :, k]
                m, s = mean[i, 0], std[i, 0]
                vals = vals * s + m
                point, qs = self._select_quantiles(vals, quantiles)
                results[i] = (e, point, qs)
        return results

    # ------------------------------------------------------------------------------------------
    def _read_like_fit(self, df: Any, **overrides) -> Panel:
        cols = {k: overrides.get(k) or self.columns_[k] for k in ("id_col", "time_col", "target_col")}
        layout = overrides.get("format") or ("wide" if self.columns_["layout"] == "wide" else "auto")
        panel = read_panel(df, layout=layout, target_cols=overrides.get("target_cols") or self.columns_.get("target_cols"),
                           freq=self.freq_, nan_policy=self.nan_policy, **cols)
        if panel.exog != self.exog_:
            raise ColumnError(f"the frame's covariates {panel.exog} differ from the fitted ones {self.exog_}")
        if self.channel_mode == "mixing":
            if list(panel.ids) != list(self.series_ids_):
                raise DataError(f"a channel_mode='mixing' model forecasts exactly its fitted series {self.series_ids_[:5]}..., got {panel.ids[:5]}...")
            if panel.n_series > 1 and not panel.aligned:
                raise DataError("channel_mode='mixing' needs every series on the same timestamps")
        return panel

    def predict(self, horizon: Optional[int] = None, quantiles: Optional[Sequence[float]] = None, df: Any = None, **columns):
        """Forecast ``horizon`` steps (default ``h``) after the end of the fitted data, or of ``df``.

        Args:
            horizon: steps; ``< h`` truncates, ``> h`` rolls forward autoregressively
                (``UserWarning``; not possible with covariates).
            quantiles: quantile levels to return (``loss="quantile"`` only; default all trained
                levels; levels between trained ones are interpolated linearly).
            df: new history (same layout and columns as at fit; series may be new in
                ``"independent"`` mode, their scaler then fit on ``df``). Each series needs at
                least ``input_size`` steps.
            columns: ``id_col`` / ``time_col`` / ``target_col`` / ``format`` overrides for ``df``.
        Returns:
            long frame ``unique_id, ds, <model>`` (+ quantile columns), of the library of ``df``
            (else of the fitted frame).
        """
        self._check_fitted()
        horizon = self._check_horizon(horizon)
        L = self.config_["input_size"]
        if df is None:
            panel = Panel(list(self.series_ids_), [np.zeros(L, dtype=np.int64)] * len(self.series_ids_),
                          list(self._tails), None, self.freq_, list(self.exog_), self.columns_["layout"],
                          self.columns_["backend"], self.tz_)
        else:
            panel = self._read_like_fit(df, **columns)
            for sid, n in zip(panel.ids, panel.lengths):
                if n < L:
                    raise SeriesTooShortError(f"series {sid!r} has {n} steps, fewer than input_size {L}; give at least {L} steps of history")
        ends = [np.array([len(v)]) for v in panel.values]
        res = self._forecast_panel(panel, ends, horizon, quantiles)
        last = [self.last_ds_[s] for s in panel.ids] if df is None else [_scalar_time(t[-1]) for t in panel.times]
        freq = self.freq_
        ids, ds, point, qcols = [], [], [], {}
        for sid, lt, (e, pt, qs) in zip(panel.ids, last, res):
            ids.append(np.repeat(np.array([sid], dtype=object), horizon))
            ds.append(future_times(lt, freq, horizon))
            point.append(pt[0])
            for q, v in qs.items():
                qcols.setdefault(q, []).append(v[0])
        return self._frame(panel, ids, ds, point, qcols, extra=None)

    def _frame(self, panel: Panel, ids, ds, point, qcols, extra: Optional[Dict[str, Any]] = None, backend: Optional[str] = None):
        idc, tc = self._out_id_col(), self._out_time_col()
        ds_all = np.concatenate(ds) if ds else np.array([])
        cols: Dict[str, Any] = {idc: _ids_array(np.concatenate(ids) if ids else np.array([], dtype=object)), tc: _out_times(ds_all, panel.tz)}
        if extra:
            cols.update(extra)
        name = self.model_name
        cols[name] = np.concatenate(point) if point else np.array([])
        for q in sorted(qcols):
            cols[quantile_column(name, q)] = np.concatenate(qcols[q])
        return make_frame(cols, backend or panel.backend)

    # ------------------------------------------------------------------------------------------
    def predict_array(self, x: Any, series_ids: Optional[Sequence[Any]] = None, horizon: Optional[int] = None,
                      quantiles: Optional[Sequence[float]] = None) -> np.ndarray:
        """Batched forecasts for many windows at once (used by the benchmarks).

        Args:
            x: input windows ``[N, input_size, S]`` or ``[N, input_size, S, F]`` in original units.
            series_ids: the series of the ``S`` columns (default: the fitted series, in order);
                selects the scaler statistics.
            horizon, quantiles: as in :meth:`predict`.
        Returns:
            ``[N, horizon, S]`` point forecasts, or ``[N, horizon, S, len(quantiles)]`` when
            ``quantiles`` is given, in original units.
        """
        self._check_fitted()
        horizon = self._check_horizon(horizon)
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 3:
            x = x[..., None]
        L = self.config_["input_size"]
        if x.ndim != 4 or x.shape[1] != L or x.shape[3] != self.config_["n_features"]:
            raise DataError(f"x must be [N, {L}, S] or [N, {L}, S, {self.config_['n_features']}], got {x.shape}")
        ids = list(self.series_ids_) if series_ids is None else list(series_ids)
        if len(ids) != x.shape[2]:
            raise DataError(f"x has {x.shape[2]} series, series_ids {len(ids)}")
        if self.scaler_ is not None:
            unknown = [s for s in ids if s not in self.series_ids_]
            if unknown:
                raise DataError(f"unknown series {unknown[:3]}: predict_array uses the fitted scaler; use predict(df=...) for new series")
        mean, std = self._stats(ids)
        xs = torch.from_numpy(((x - mean) / std).astype(np.float32))
        p = self._network_forecast(xs, horizon).numpy().astype(np.float64)
        if self.quantiles_ is None:
            if quantiles is not None:
                raise ConfigError(f"this model was trained with loss={self.loss!r} and has no quantiles")
            return p * std[:, 0] + mean[:, 0]
        p = p * std[:, 0, None] + mean[:, 0, None]
        point, qs = self._select_quantiles(p, quantiles)
        if quantiles is None:
            return point
        return np.stack([qs[float(q)] for q in quantiles], axis=-1)

    # ------------------------------------------------------------------------------------------
    def cross_validation(self, df: Any, n_windows: int = 1, step_size: Optional[int] = None, refit: bool = False,
                         quantiles: Optional[Sequence[float]] = None, *, format: str = "auto",  # noqa: A002
                         id_col: str = "unique_id", time_col: str = "ds", target_col: str = "y",
                         target_cols: Optional[Sequence[str]] = None, callbacks: Sequence[Any] = ()):
        """Rolling-origin evaluation on the last ``n_windows`` windows of each series.

        The cutoffs of a series with ``T`` steps are the timestamps at rows
        ``T - h - k * step_size - 1`` for ``k = n_windows - 1 .. 0``. The model is fit once on the
        rows up to the first cutoff (``refit=False``; the estimator stays fitted on that data) or
        refit on the rows up to every cutoff (``refit=True``), then forecasts ``h`` steps from each
        cutoff.

        Args:
            df: the full history (as for :meth:`fit`).
            n_windows: number of forecast windows per series.
            step_size: steps between cutoffs (default ``h``: non-overlapping windows).
            refit: refit at every cutoff.
            quantiles: as in :meth:`predict`.
        Returns:
            long frame ``unique_id, ds, cutoff, y, <model>`` (+ quantile columns).
        """
        self._check_params()
        if isinstance(n_windows, bool) or not isinstance(n_windows, (int, np.integer)) or n_windows < 1:
            raise ConfigError(f"n_windows must be a positive integer, got {n_windows!r}")
        step = self.h if step_size is None else step_size
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
            raise ConfigError(f"step_size must be a positive integer, got {step_size!r}")
        panel = read_panel(df, layout=format, id_col=id_col, time_col=time_col, target_col=target_col,
                           target_cols=target_cols, freq=self.freq, nan_policy=self.nan_policy)
        self.columns_ = {"id_col": id_col, "time_col": time_col, "target_col": target_col,
                         "layout": panel.layout, "backend": panel.backend,
                         "target_cols": None if target_cols is None else list(target_cols)}
        H = self.h
        span = H + (n_windows - 1) * step
        # local rows where each window's targets start, per series, earliest first
        ends = [n - H - step * np.arange(n_windows - 1, -1, -1) for n in panel.lengths]
        for sid, n in zip(panel.ids, panel.lengths):
            if n - span < self.input_size:
                raise SeriesTooShortError(
                    f"series {sid!r} has {n} steps, too few for {n_windows} windows of h={H} every "
                    f"{step} steps after an input of {self.input_size}; lower n_windows / step_size"
                )
        # the truth of the original (unrepaired) targets is not kept; missing targets give NaN y
        groups = []
        if refit:
            for k in range(n_windows):
                groups.append((k, [e[k] for e in ends]))
        else:
            groups.append((None, [e[0] for e in ends]))
        out_frames = []
        for k, cut in groups:
            train = panel.head(cut)
            self._fit_panel(train, callbacks)
            sel = [np.array([e[k]]) for e in ends] if k is not None else ends
            res = self._forecast_panel(panel, sel, H, quantiles)
            out_frames.append(res)
        ids, ds, cutoffs, ys, point, qcols = [], [], [], [], [], {}
        for res in out_frames:
            for i, (e, pt, qs) in enumerate(res):
                t, v = panel.times[i], panel.values[i][:, 0]
                obs = None if panel.observed is None else panel.observed[i]
                for j, start in enumerate(e):
                    ids.append(np.repeat(np.array([panel.ids[i]], dtype=object), H))
                    ds.append(t[start : start + H])
                    cutoffs.append(np.repeat(t[start - 1 : start], H))
                    yy = v[start : start + H].copy()
                    if obs is not None:
                        yy[~obs[start : start + H]] = np.nan
                    ys.append(yy)
                    point.append(pt[j])
                    for q, vals in qs.items():
                        qcols.setdefault(q, []).append(vals[j])
        ycol = self.columns_["target_col"] if self.columns_["layout"] == "long" else "y"
        extra = {"cutoff": _out_times(np.concatenate(cutoffs), panel.tz), ycol: np.concatenate(ys)}
        frame = self._frame(panel, ids, ds, point, qcols, extra=extra)
        if refit:
            frame = _sort_frame(frame, panel.backend, [self._out_id_col(), "cutoff", self._out_time_col()])
        return frame

    def _out_id_col(self) -> str:
        return "unique_id" if self.columns_["layout"] == "wide" else self.columns_["id_col"]

    def _out_time_col(self) -> str:
        return "ds" if self.columns_["layout"] == "wide" else self.columns_["time_col"]

    # ------------------------------------------------------------------------------------------
    # persistence
    def save(self, path: str | Path) -> Path:
        """Save to the directory ``path``: ``config.json`` (parameters and fitted metadata),
        ``model.safetensors`` (network weights) and ``fitted.safetensors`` (scaler statistics and
        the last ``input_size`` steps of each series). No pickle. Returns the directory."""
        self._check_fitted()
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        params = {}
        for k, v in self.get_params(deep=False).items():
            try:
                json.dumps(v)
                params[k] = v
            except TypeError:
                warnings.warn(f"parameter {k}={v!r} is not JSON-serialisable; saved as its default", UserWarning, stacklevel=2)
        meta = {
            "format": FORMAT,
            "class": type(self).__name__,
            "params": params,
            "config": self.config_,
            "fitted": {
                "series_ids": self.series_ids_,
                "freq": self.freq_,
                "tz": self.tz_,
                "exog": self.exog_,
                "aligned": self.aligned_,
                "val_size": self.val_size_,
                "last_ds": [_json_time(self.last_ds_[s]) for s in self.series_ids_],
                "quantiles": self.quantiles_,
                "columns": self.columns_,
                "history": self.history_,
                "best_val_loss": None if not np.isfinite(self.best_val_loss_) else self.best_val_loss_,
                "n_epochs": self.n_epochs_,
                "train_seconds": self.train_seconds_,
            },
        }
        try:
            text = json.dumps(meta, indent=1)
        except TypeError as exc:
            raise CheckpointError(f"cannot save: series ids or metadata are not JSON-serialisable ({exc}); use str or int series ids") from exc
        (path / "config.json").write_text(text, encoding="utf-8")
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model_.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        arrays = {"tails": torch.from_numpy(np.ascontiguousarray(self._tails, dtype=np.float64))}
        if self.scaler_ is not None:
            arrays["scaler_mean"] = torch.from_numpy(np.ascontiguousarray(self.scaler_["mean"], dtype=np.float64))
            arrays["scaler_std"] = torch.from_numpy(np.ascontiguousarray(self.scaler_["std"], dtype=np.float64))
        save_file(arrays, str(path / "fitted.safetensors"))
        return path

    @classmethod
    def load(cls, path: str | Path, device: Optional[str] = None) -> "TitansForecaster":
        """Load a model saved by :meth:`save` (``device`` overrides the saved device setting)."""
        from safetensors.torch import load_file

        path = Path(path)
        files = [path / "config.json", path / "model.safetensors", path / "fitted.safetensors"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"not a saved TitansForecaster: missing {missing}")
        try:
            meta = json.loads(files[0].read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"corrupt {files[0]}: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{files[0]} has format {meta.get('format')!r}, expected {FORMAT!r}")
        params = dict(meta["params"])
        if device is not None:
            params["device"] = device
        known = set(cls().get_params(deep=False))
        obj = cls(**{k: v for k, v in params.items() if k in known})
        cfg = meta["config"]
        fit = meta["fitted"]
        network = TitansForecastNetwork(
            cfg["input_size"], cfg["h"], cfg["n_features"], cfg["n_series"], TitansConfig.from_dict(cfg["backbone"]),
            cfg["patch_len"], cfg["stride"], cfg["channel_mode"], cfg["head"], cfg["quantiles"], cfg["revin"],
            cfg["revin_affine"], cfg["head_dropout"],
        )
        try:
            network.load_state_dict(load_file(str(files[1])), strict=True)
            arrays = load_file(str(files[2]))
        except Exception as exc:  # safetensors / torch raise various types
            raise CheckpointError(f"cannot load the weights in {path}: {exc}") from exc
        obj.model_ = network.eval().to(obj._torch_device())
        obj.config_ = cfg
        obj.quantiles_ = fit["quantiles"]
        obj.series_ids_ = list(fit["series_ids"])
        obj.freq_ = fit["freq"]
        obj.tz_ = fit["tz"]
        obj.exog_ = list(fit["exog"])
        obj.aligned_ = fit["aligned"]
        obj.val_size_ = fit["val_size"]
        obj.last_ds_ = {s: _from_json_time(t) for s, t in zip(obj.series_ids_, fit["last_ds"])}
        obj.columns_ = fit["columns"]
        obj.history_ = fit["history"]
        obj.best_val_loss_ = float("nan") if fit["best_val_loss"] is None else fit["best_val_loss"]
        obj.n_epochs_ = fit["n_epochs"]
        obj.train_seconds_ = fit["train_seconds"]
        obj._tails = arrays["tails"].numpy()
        obj.scaler_ = None
        if "scaler_mean" in arrays:
            obj.scaler_ = {"mean": arrays["scaler_mean"].numpy(), "std": arrays["scaler_std"].numpy()}
        return obj


# ----------------------------------------------------------------------------------------------
def _fit_scaler(panel: Panel, rows: Sequence[int]):
    """Per series and channel mean / std (population; 0 -> 1) over the first ``rows[i]`` steps,
    observed targets only."""
    mean = np.empty((panel.n_series, panel.n_features))
    std = np.empty((panel.n_series, panel.n_features))
    for i, (v, n) in enumerate(zip(panel.values, rows)):
        part = v[:n].copy()
        if panel.observed is not None:
            part[~panel.observed[i][:n], 0] = np.nan
        m = np.nanmean(part, axis=0)
        s = np.nanstd(part, axis=0)
        mean[i] = m
        std[i] = np.where(np.isfinite(s) & (s > 1e-12), s, 1.0)
    return mean, std


def _scalar_time(t: Any) -> Any:
    if isinstance(t, np.datetime64):
        return pd.Timestamp(t)
    return int(t)


def _json_time(t: Any) -> Any:
    return {"datetime": t.isoformat()} if isinstance(t, pd.Timestamp) else {"int": int(t)}


def _from_json_time(t: Dict[str, Any]) -> Any:
    return pd.Timestamp(t["datetime"]) if "datetime" in t else int(t["int"])


def _out_times(t: np.ndarray, tz: Optional[str]):
    if t.dtype.kind == "M":
        idx = pd.DatetimeIndex(t)
        return pd.Series(idx.tz_localize("UTC").tz_convert(tz) if tz else idx)
    return t.astype(np.int64)


def _ids_array(ids: np.ndarray) -> np.ndarray:
    """Ids as a typed array when they are all ints / all strs."""
    if len(ids) and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in ids[:1000]):
        try:
            return ids.astype(np.int64)
        except (TypeError, ValueError):
            return ids
    return ids


def _sort_frame(frame, backend: str, by: List[str]):
    if backend == "pandas":
        return frame.sort_values(by, kind="stable").reset_index(drop=True)
    return frame.sort(by, maintain_order=True)
