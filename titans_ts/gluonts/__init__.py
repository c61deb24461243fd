"""GluonTS integration: :class:`TitansEstimator`, a ``PyTorchLightningEstimator``.

- :mod:`titans_ts.gluonts.module`: :class:`TitansGluonModel`, the network on GluonTS batch fields;
- :mod:`titans_ts.gluonts.lightning_module`: :class:`TitansLightningModule`, the library's training
  module made serialisable for GluonTS;
- :mod:`titans_ts.gluonts.estimator`: :class:`TitansEstimator`.

Works with ``PandasDataset`` / ``ListDataset``, ``make_evaluation_predictions`` + ``Evaluator``,
``split`` + ``evaluate_model``, and ``PyTorchPredictor.serialize`` / ``Predictor.deserialize``.
"""

from .estimator import DEFAULT_QUANTILES, TitansEstimator
from .lightning_module import TitansLightningModule
from .module import TitansGluonModel, sample_from_quantiles

__all__ = ["DEFAULT_QUANTILES", "TitansEstimator", "TitansGluonModel", "TitansLightningModule", "sample_from_quantiles"]
