"""A GluonTS backtest of the Titans estimator on ETTh1 (the 7 columns as 7 series).

The standard GluonTS flow, nothing Titans-specific but the estimator:

1. ``PandasDataset`` of the 7 hourly series;
2. ``split(dataset, offset=-windows * h)``: train on everything before the last ``windows``
   forecast windows;
3. ``TitansEstimator(...).train(train)`` (quantile head, 9 levels);
4. ``test_template.generate_instances(h, windows, distance=h)`` + ``evaluate_model``: MSE, MASE
   and the weighted quantile loss over the rolling windows, per window and overall, beside
   GluonTS's seasonal-naive predictor; the classic ``make_evaluation_predictions`` +
   ``Evaluator`` on the last window;
5. plots of the last window (median, 50% and 80% intervals, truth) saved to
   ``docs/gluonts_backtest.png``; the predictor is serialised and read back.

Runs on the CPU in a few minutes with the defaults (small model, short training)::

    python examples/gluonts_backtest.py
    python examples/gluonts_backtest.py --full        # bigger model, longer training (GPU advised)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
from gluonts.dataset.pandas import PandasDataset  # noqa: E402
from gluonts.dataset.split import split  # noqa: E402
from gluonts.ev.metrics import MASE, MSE, MeanWeightedSumQuantileLoss  # noqa: E402
from gluonts.evaluation import Evaluator, make_evaluation_predictions  # noqa: E402
from gluonts.model import Predictor, evaluate_model  # noqa: E402
from gluonts.model.seasonal_naive import SeasonalNaivePredictor  # noqa: E402

from titans_ts import datasets as tsdata  # noqa: E402
from titans_ts.gluonts import TitansEstimator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("TITANS_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--h", type=int, default=24, help="forecast horizon (hours)")
    ap.add_argument("--context", type=int, default=96, help="look-back (hours)")
    ap.add_argument("--windows", type=int, default=7, help="rolling test windows")
    ap.add_argument("--rows", type=int, default=8640, help="rows of ETTh1 used (the TSLib train period by default)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batches", type=int, default=30, help="training batches per epoch")
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--variant", default="lmm", choices=["lmm", "mac", "mag", "mal"])
    ap.add_argument("--full", action="store_true", help="d_model 64, 2 layers, 30 epochs x 100 batches")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "gluonts_backtest.png"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.full:
        args.d_model, args.epochs, args.batches = 64, 30, 100

    df = tsdata.load("ETTh1", data_dir=args.data_dir).iloc[: args.rows]
    wide = df.set_index("date")
    series = [c for c in wide.columns]
    dataset = PandasDataset({c: wide[c] for c in series}, freq="h")
    h = args.h
    train, test_template = split(dataset, offset=-args.windows * h)

    pl.seed_everything(args.seed, verbose=False)
    estimator = TitansEstimator(
        prediction_length=h, context_length=args.context, patch_len=16, stride=8, d_model=args.d_model,
        n_layers=2 if args.full else 1, n_heads=4, variant=args.variant, memory_depth=2, chunk_size=4,
        dropout=0.1, batch_size=64, num_batches_per_epoch=args.batches, lr=2e-3,
        trainer_kwargs={"max_epochs": args.epochs, "enable_progress_bar": False, "logger": False,
                        "enable_model_summary": False, "default_root_dir": tempfile.mkdtemp(prefix="titans-gluonts-")},
    )
    t0 = time.perf_counter()
    predictor = estimator.train(train, validation_data=train)
    print(f"trained in {time.perf_counter() - t0:.1f} s ({args.epochs} epochs x {args.batches} batches)")

    # rolling-window backtest: evaluate_model on the test template
    test_data = test_template.generate_instances(prediction_length=h, windows=args.windows, distance=h)
    metrics = [MSE(), MASE(), MeanWeightedSumQuantileLoss(quantile_levels=estimator.quantiles)]
    overall = evaluate_model(predictor, test_data=test_data, metrics=metrics, axis=None, seasonality=24)
    naive = SeasonalNaivePredictor(prediction_length=h, season_length=24)
    reference = evaluate_model(naive, test_data=test_data, metrics=metrics, axis=None, seasonality=24)
    per_series = evaluate_model(predictor, test_data=test_data, metrics=metrics, axis=1, seasonality=24)
    print("\nOverall (all series and windows), Titans vs seasonal naive (24 h):")
    table = pd.concat([overall, reference]).set_axis(["TitansEstimator", "SeasonalNaive"])
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print("\nPer series and window:")
    print(per_series.to_string(float_format=lambda v: f"{v:.4f}"))

    # the classic flow on the last window
    fc_it, ts_it = make_evaluation_predictions(dataset, predictor)
    forecasts, tss = list(fc_it), list(ts_it)
    agg, item = Evaluator(quantiles=(0.1, 0.5, 0.9), num_workers=0)(tss, forecasts)
    print("\nLast window, Evaluator: " + ", ".join(f"{k}={agg[k]:.4f}" for k in ("MSE", "MASE", "mean_wQuantileLoss", "Coverage[0.9]")))

    # serialise / deserialise
    with tempfile.TemporaryDirectory() as tmp:
        predictor.serialize(Path(tmp))
        again = Predictor.deserialize(Path(tmp), device="cpu")
        same = all(np.array_equal(a.forecast_array, b.forecast_array)
                   for a, b in zip(predictor.predict(test_data.input), again.predict(test_data.input)))
    print(f"serialize -> deserialize: identical forecasts: {same}")

    # plots: the last window of each series
    n = len(forecasts)
    cols = 2
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), squeeze=False)
    for ax, f, ts in zip(axes.flat, forecasts, tss):
        hist = ts.iloc[-(h + 4 * h):]
        hist.index = hist.index.to_timestamp()
        ax.plot(hist.index, hist.values, color="black", lw=1, label="observed")
        idx = f.index.to_timestamp()
        ax.fill_between(idx, f.quantile(0.1), f.quantile(0.9), alpha=0.25, color="C0", label="80% interval")
        ax.fill_between(idx, f.quantile(0.3), f.quantile(0.7), alpha=0.4, color="C0", label="40% interval")
        ax.plot(idx, f.median, color="C0", lw=1.5, label="median")
        ax.set_title(f"{f.item_id}  (MASE {item.loc[item['item_id'] == f.item_id, 'MASE'].iloc[0]:.2f})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"TitansEstimator ({args.variant}) on ETTh1, last {h} h of the backtest", fontsize=11)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
