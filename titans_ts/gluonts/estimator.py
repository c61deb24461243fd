"""``TitansEstimator``: a GluonTS ``PyTorchLightningEstimator`` for the Titans forecaster.

Built the way GluonTS's own torch models are (``PatchTSTEstimator``, ``DeepAREstimator``)::

    from gluonts.dataset.pandas import PandasDataset
    from gluonts.evaluation import make_evaluation_predictions, Evaluator
    from titans_ts.gluonts import TitansEstimator

    ds = PandasDataset.from_long_dataframe(df, target="y", item_id="unique_id", timestamp="ds", freq="h")
    predictor = TitansEstimator(prediction_length=24, trainer_kwargs={"max_epochs": 5}).train(ds)
    forecasts, tss = make_evaluation_predictions(ds, predictor)
    agg, per_item = Evaluator()(tss, forecasts)
    predictor.serialize(Path("model")); Predictor.deserialize(Path("model"), device="cpu")

Training: GluonTS's ``train_model`` builds the ``lightning.Trainer`` from ``trainer_kwargs``
(defaults: ``max_epochs=20``, ``gradient_clip_val=1.0``, ``accelerator="auto"``,
``enable_progress_bar=True``, ``precision="bf16-mixed"`` when a GPU is used) and trains the
library's own LightningModule (:class:`~titans_ts.gluonts.lightning_module.TitansLightningModule`,
a subclass of :func:`titans_memory.training.build_lightning_module`'s class): one training step,
one optimiser set-up for the whole library. Lightning writes its logs and checkpoints under
``trainer_kwargs["default_root_dir"]`` (default: the working directory).

Forecasts: the network has a quantile head (pinball loss, monotone quantiles; the median 0.5 is
always among the levels). ``forecast_type="quantile"`` (default) gives ``QuantileForecast``
objects (``QuantileForecastGenerator``); other levels are interpolated by GluonTS.
``forecast_type="sample"`` gives ``SampleForecast`` objects with ``num_samples`` paths drawn from
the predicted quantile function (linear interpolation between levels, linear extrapolation of the
outer segments; independent across steps), see
:func:`titans_ts.gluonts.module.sample_from_quantiles`. No ``distr_output`` is involved.

Missing values: NaNs in the target are replaced by a dummy value and flagged in
``past_observed_values`` / ``future_observed_values`` (``AddObservedValuesIndicator``); the network
imputes the flagged inputs (last observation carried forward) and the loss skips the flagged
targets. Dynamic real features (``num_feat_dynamic_real > 0``, the dataset's
``feat_dynamic_real``) enter as extra input channels of the look-back window.

Data parallelism: the GluonTS training stream is not sharded across processes, so ``devices > 1``
would train every process on the same batches; for multi-GPU training use
:class:`titans_ts.TitansForecaster` (``devices=N, strategy="ddp"``).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from gluonts.core.component import validated
from gluonts.dataset.common import Dataset
from gluonts.dataset.field_names import FieldName
from gluonts.dataset.loader import as_stacked_batches
from gluonts.itertools import Cyclic
from gluonts.model.forecast_generator import QuantileForecastGenerator, SampleForecastGenerator
from gluonts.torch.model.estimator import PyTorchLightningEstimator
from gluonts.torch.model.predictor import PyTorchPredictor
from gluonts.transform import (
    AddObservedValuesIndicator,
    AsNumpyArray,
    ExpectedNumInstanceSampler,
    InstanceSampler,
    InstanceSplitter,
    RenameFields,
    SelectFields,
    TestSplitSampler,
    Transformation,
    ValidationSplitSampler,
)

from titans_memory.errors import ConfigError
from titans_memory.training import resolve_accelerator

from .lightning_module import TitansLightningModule
from .module import FORECAST_TYPES

__all__ = ["DEFAULT_QUANTILES", "TitansEstimator"]

DEFAULT_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PREDICTION_INPUT_NAMES = ["past_target", "past_observed_values"]
TRAINING_INPUT_NAMES = PREDICTION_INPUT_NAMES + ["future_target", "future_observed_values"]
FEAT_INPUT_NAMES = [f"past_{FieldName.FEAT_TIME}", f"future_{FieldName.FEAT_TIME}"]


class _SizedBatches:
    """An iterable of training batches that reports ``num_batches_per_epoch`` as its length, so
    that Lightning knows the epoch length (the cosine schedule needs the number of steps)."""

    def __init__(self, batches: Iterable, length: int) -> None:
        self.batches, self.length = batches, int(length)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return self.length


def _quantile_levels(quantiles: Optional[Sequence[float]]) -> List[float]:
    qs = DEFAULT_QUANTILES if quantiles is None else quantiles
    try:
        levels = sorted({round(float(q), 6) for q in qs} | {0.5})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"quantiles must be numbers in (0, 1), got {quantiles!r}") from exc
    if not all(0.0 < q < 1.0 for q in levels):
        raise ConfigError(f"quantiles must be in (0, 1), got {quantiles!r}")
    return levels


class TitansEstimator(PyTorchLightningEstimator):
    """GluonTS estimator of the Titans neural-memory forecaster (arXiv 2501.00663).

    The network is :class:`titans_ts.module.TitansForecastNetwork` (RevIN, patching, Titans
    backbone, flatten head), applied to each series on its own (channel independence, shared
    weights), with a quantile head.

    Args:
        prediction_length: forecast horizon.
        context_length: look-back window (default ``4 * prediction_length``, at least ``patch_len``).
        patch_len, stride: patching of the look-back (``stride`` default ``patch_len // 2``).
        d_model, n_layers, n_heads, variant, memory_depth, memory_expansion, chunk_size, ffn_mult,
            dropout, persistent_tokens, window_size, segment_size: the Titans backbone
            (``variant`` one of ``"lmm"``, ``"mac"``, ``"mag"``, ``"mal"``).
        head: ``"flatten"`` or ``"last"``. revin, revin_affine: reversible instance normalisation.
        head_dropout: dropout before the head.
        quantiles: quantile levels of the head (default 0.1, 0.2, ..., 0.9; 0.5 is always added).
        forecast_type: ``"quantile"`` (``QuantileForecast``) or ``"sample"`` (``SampleForecast``).
        num_samples: sample paths per forecast with ``forecast_type="sample"``.
        num_feat_dynamic_real: number of dynamic real features used (0: none).
        lr, weight_decay, warmup_steps, scheduler: AdamW and its schedule (``"cosine"`` or None).
        scale_loss: divide each window's loss by the scale of its past values.
        batch_size: windows per batch (training, validation and prediction).
        num_batches_per_epoch: training batches per epoch.
        trainer_kwargs: extra ``lightning.Trainer`` arguments (override the defaults above).
        train_sampler, validation_sampler: GluonTS instance samplers (default: as PatchTST,
            ``ExpectedNumInstanceSampler(1.0)`` / ``ValidationSplitSampler``).
    """

    @validated()
    def __init__(
        self,
        prediction_length: int,
        context_length: Optional[int] = None,
        patch_len: int = 16,
        stride: Optional[int] = None,
        d_model: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        variant: str = "lmm",
        memory_depth: int = 2,
        memory_expansion: int = 2,
        chunk_size: int = 16,
        ffn_mult: int = 2,
        dropout: float = 0.1,
        persistent_tokens: int = 4,
        window_size: int = 16,
        segment_size: int = 16,
        head: str = "flatten",
        revin: bool = True,
        revin_affine: bool = False,
        head_dropout: float = 0.0,
        quantiles: Optional[List[float]] = None,
        forecast_type: str = "quantile",
        num_samples: int = 100,
        num_feat_dynamic_real: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        scheduler: Optional[str] = "cosine",
        scale_loss: bool = True,
        batch_size: int = 32,
        num_batches_per_epoch: int = 50,
        trainer_kwargs: Optional[Dict[str, Any]] = None,
        train_sampler: Optional[InstanceSampler] = None,
        validation_sampler: Optional[InstanceSampler] = None,
    ) -> None:
        defaults: Dict[str, Any] = {
            "max_epochs": 20,
            "gradient_clip_val": 1.0,
            "accelerator": "auto",
            "enable_progress_bar": True,
        }
        if trainer_kwargs is not None:
            defaults.update(trainer_kwargs)
        if "precision" not in defaults and resolve_accelerator(str(defaults.get("accelerator", "auto"))) == "gpu":
            defaults["precision"] = "bf16-mixed"
        super().__init__(trainer_kwargs=defaults)

        if prediction_length < 1:
            raise ConfigError(f"prediction_length must be >= 1, got {prediction_length}")
        if forecast_type not in FORECAST_TYPES:
            raise ConfigError(f"forecast_type must be one of {FORECAST_TYPES}, got {forecast_type!r}")
        if batch_size < 1 or num_batches_per_epoch < 1:
            raise ConfigError(f"batch_size and num_batches_per_epoch must be >= 1, got {batch_size}, {num_batches_per_epoch}")
        if num_feat_dynamic_real < 0:
            raise ConfigError(f"num_feat_dynamic_real must be >= 0, got {num_feat_dynamic_real}")
        self.prediction_length = int(prediction_length)
        self.context_length = int(context_length or max(4 * prediction_length, patch_len))
        self.patch_len = int(patch_len)
        self.stride = int(stride or max(1, patch_len // 2))
        if not 1 <= self.patch_len <= self.context_length:
            raise ConfigError(f"patch_len must be in 1..context_length={self.context_length}, got {patch_len}")
        if not 1 <= self.stride <= self.patch_len:
            raise ConfigError(f"stride must be in 1..patch_len={self.patch_len}, got {self.stride}")
        self.quantiles = _quantile_levels(quantiles)
        self.forecast_type = forecast_type
        self.num_samples = int(num_samples)
        self.num_feat_dynamic_real = int(num_feat_dynamic_real)
        self.model_kwargs = {
            "prediction_length": self.prediction_length,
            "context_length": self.context_length,
            "quantiles": self.quantiles,
            "num_feat_dynamic_real": self.num_feat_dynamic_real,
            "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "variant": variant,
            "memory_depth": memory_depth, "memory_expansion": memory_expansion, "chunk_size": chunk_size,
            "ffn_mult": ffn_mult, "dropout": dropout, "persistent_tokens": persistent_tokens,
            "window_size": window_size, "segment_size": segment_size,
            "patch_len": self.patch_len, "stride": self.stride, "head": head, "revin": revin,
            "revin_affine": revin_affine, "head_dropout": head_dropout,
            "forecast_type": forecast_type, "num_samples": self.num_samples,
        }
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.warmup_steps, self.scheduler, self.scale_loss = int(warmup_steps), scheduler, bool(scale_loss)
        self.batch_size = int(batch_size)
        self.num_batches_per_epoch = int(num_batches_per_epoch)
        self.train_sampler = train_sampler or ExpectedNumInstanceSampler(num_instances=1.0, min_future=prediction_length)
        self.validation_sampler = validation_sampler or ValidationSplitSampler(min_future=prediction_length)

    # ------------------------------------------------------------------------------------------
    def _feat_names(self) -> List[str]:
        return FEAT_INPUT_NAMES if self.num_feat_dynamic_real > 0 else []

    def create_transformation(self) -> Transformation:
        """Select the fields, cast them to float32 arrays, flag missing target values (and name the
        dynamic real features ``time_feat``, as GluonTS's PatchTST does)."""
        feat = self.num_feat_dynamic_real > 0
        chain = SelectFields(
            [FieldName.ITEM_ID, FieldName.INFO, FieldName.START, FieldName.TARGET]
            + ([FieldName.FEAT_DYNAMIC_REAL] if feat else []),
            allow_missing=True,
        ) + AsNumpyArray(field=FieldName.TARGET, expected_ndim=1, dtype=np.float32)
        if feat:
            chain += AsNumpyArray(field=FieldName.FEAT_DYNAMIC_REAL, expected_ndim=2, dtype=np.float32)
            chain += RenameFields({FieldName.FEAT_DYNAMIC_REAL: FieldName.FEAT_TIME})
        return chain + AddObservedValuesIndicator(target_field=FieldName.TARGET, output_field=FieldName.OBSERVED_VALUES)

    def create_lightning_module(self) -> pl.LightningModule:
        """The library's LightningModule (see :mod:`titans_ts.gluonts.lightning_module`)."""
        return TitansLightningModule(
            model_kwargs=self.model_kwargs, lr=self.lr, weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps, scheduler=self.scheduler, scale_loss=self.scale_loss,
        )

    def _create_instance_splitter(self, module: TitansLightningModule, mode: str) -> InstanceSplitter:
        assert mode in ("training", "validation", "test")
        sampler = {"training": self.train_sampler, "validation": self.validation_sampler,
                   "test": TestSplitSampler()}[mode]
        return InstanceSplitter(
            target_field=FieldName.TARGET,
            is_pad_field=FieldName.IS_PAD,
            start_field=FieldName.START,
            forecast_start_field=FieldName.FORECAST_START,
            instance_sampler=sampler,
            past_length=self.context_length,
            future_length=self.prediction_length,
            time_series_fields=[FieldName.OBSERVED_VALUES]
            + ([FieldName.FEAT_TIME] if self.num_feat_dynamic_real > 0 else []),
            dummy_value=0.0,
        )

    def create_training_data_loader(self, data: Dataset, module: TitansLightningModule,
                                    shuffle_buffer_length: Optional[int] = None, **kwargs) -> Iterable:
        """``num_batches_per_epoch`` batches per epoch from a cyclic stream of random windows."""
        stream = Cyclic(data).stream()
        instances = self._create_instance_splitter(module, "training").apply(stream, is_train=True)
        batches = as_stacked_batches(
            instances, batch_size=self.batch_size, shuffle_buffer_length=shuffle_buffer_length,
            field_names=TRAINING_INPUT_NAMES + self._feat_names(), output_type=torch.tensor,
            num_batches_per_epoch=self.num_batches_per_epoch,
        )
        return _SizedBatches(batches, self.num_batches_per_epoch)

    def create_validation_data_loader(self, data: Dataset, module: TitansLightningModule, **kwargs) -> Iterable:
        """The last ``prediction_length`` steps of every validation series (one window each)."""
        instances = self._create_instance_splitter(module, "validation").apply(data, is_train=True)
        return as_stacked_batches(
            instances, batch_size=self.batch_size,
            field_names=TRAINING_INPUT_NAMES + self._feat_names(), output_type=torch.tensor,
        )

    def create_predictor(self, transformation: Transformation, module: TitansLightningModule) -> PyTorchPredictor:
        """A ``PyTorchPredictor`` giving ``QuantileForecast`` or ``SampleForecast`` objects."""
        generator = (QuantileForecastGenerator([str(q) for q in self.quantiles])
                     if self.forecast_type == "quantile" else SampleForecastGenerator())
        return PyTorchPredictor(
            input_transform=transformation + self._create_instance_splitter(module, "test"),
            input_names=PREDICTION_INPUT_NAMES + self._feat_names(),
            prediction_net=module,
            forecast_generator=generator,
            batch_size=self.batch_size,
            prediction_length=self.prediction_length,
            device="auto",
        )
