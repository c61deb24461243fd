"""titans_ts: Titans memory models for time-series forecasting.

``titans_ts.datasets`` loads the LTSF benchmark files (ETTh1/2, ETTm1/2, Weather, ...);
``titans_ts.splits`` gives their standard train/val/test splits and train-only scaler.
"""

# --- forecasting (TitansForecaster) ---
from . import errors  # noqa: E402
from .forecaster import TitansForecaster  # noqa: E402
from .plotting import plot_forecast  # noqa: E402

try:  # the dataset loaders (titans_ts/datasets.py) are optional here
    from . import datasets  # noqa: E402,F401
except ImportError:  # pragma: no cover
    pass

__all__ = [*globals().get("__all__", []), "TitansForecaster", "plot_forecast", "errors"]

# --- Optuna tuning (titans_ts.tune); the GluonTS estimator lives in titans_ts.gluonts ---
from .tuning import tune  # noqa: E402

__all__ = [*__all__, "tune"]
