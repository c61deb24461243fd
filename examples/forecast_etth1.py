"""Forecast the ETTh1 transformer-temperature data with TitansForecaster.

Fits on the standard train + validation rows of ETTh1 (the first 16 months; the validation part,
the last 4 of them, drives early stopping), forecasts the next 96 hours with an 80% band, saves
the plot to ``docs/forecast_etth1.png`` and prints the test MSE / MAE over every test window (the
LTSF protocol: z-scored with the train rows' statistics, stride 1).

Data: ``$TITANS_DATA_DIR`` or ``../shared/data`` beside the repository (else downloaded).

    python examples/forecast_etth1.py [--epochs 3] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from titans_ts import TitansForecaster, plot_forecast  # noqa: E402
from titans_ts.datasets import load  # noqa: E402
from titans_ts.splits import split_borders  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "docs" / "forecast_etth1.png"))
    args = ap.parse_args()

    data_dir = os.environ.get("TITANS_DATA_DIR") or ROOT.parent / "shared" / "data"
    df = load("ETTh1", data_dir=data_dir if Path(data_dir).is_dir() else None)
    b = split_borders("ETTh1", len(df))                 # train 0:8640, val :11520, test :14400
    history = df.iloc[: b.val[1]]

    model = TitansForecaster(
        h=96, input_size=96, d_model=32, n_layers=1, n_heads=4, dropout=0.3,
        loss="quantile", quantiles=[0.1, 0.5, 0.9], max_epochs=args.epochs, batch_size=256,
        val_size=b.val[1] - b.train[1], random_state=0, device=args.device, enable_progress_bar=False,
    )
    t0 = time.perf_counter()
    model.fit(history)                                   # wide frame: date + one column per series
    forecast = model.predict()                           # unique_id, ds, TitansForecaster, -lo-80, -hi-80
    fit_s = time.perf_counter() - t0

    # test error over every window of the test split (inputs start 96 rows before it)
    cols = model.series_ids_
    values = df[cols].to_numpy(np.float64)
    start, stop = b.test[0] - 96, b.test[1]
    n = stop - start - 96 - 96 + 1
    std = model.scaler_["std"][:, 0]  # z-scored errors: the train-rows mean cancels in a difference
    sse = sae = count = 0.0
    for a in range(0, n, 1024):
        idx = start + np.arange(a, min(n, a + 1024))[:, None]
        pred = model.predict_array(values[idx + np.arange(96)])
        err = (pred - values[idx + 96 + np.arange(96)]) / std
        sse, sae, count = sse + (err ** 2).sum(), sae + np.abs(err).sum(), count + err.size
    print(f"ETTh1, input 96, horizon 96, {n} test windows x {len(cols)} channels: "
          f"test MSE {sse / count:.4f}, MAE {sae / count:.4f} (z-scored; median forecast); "
          f"fit {fit_s:.0f}s, {model.n_epochs_} epochs")

    actual = df.iloc[b.val[1] : b.val[1] + 96]
    fig = plot_forecast(history, forecast, unique_id="OT", last_n=240, actual_df=actual,
                        title="ETTh1 oil temperature (OT): TitansForecaster, next 96 h with 80% band")
    fig.axes[0].set_ylabel("OT (°C)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
