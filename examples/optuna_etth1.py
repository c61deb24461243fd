"""An Optuna study of TitansForecaster on ETTh1 (h = 96, look-back 96, all 7 channels).

Trials fit on the TSLib train rows and are scored on the validation rows (the first 720 of them in
the quick default; the study never sees the test rows); every epoch's validation loss goes to Optuna, so unpromising trials are pruned. The
study lives in a SQLite file: run the script again with the same ``--storage`` / ``--study-name``
to resume it (finished trials are kept), start it in several terminals (or one per GPU with
``CUDA_VISIBLE_DEVICES=i``, ``--no-refit`` on all but one) to run trials in parallel, and browse
it with::

    optuna-dashboard sqlite:///runs/optuna_etth1.db

At the end the best configuration is refit and its test MSE / MAE (TSLib protocol, z-scored) is
printed. Small settings run on the CPU in a few minutes::

    python examples/optuna_etth1.py                          # 5 small trials, 2 epochs each
    python examples/optuna_etth1.py --full --trials 50       # the default search space, 10 epochs
    python examples/optuna_etth1.py --storage postgresql+psycopg2://user:pw@db-host/optuna   # a cluster
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from titans_ts import datasets as tsdata  # noqa: E402
from titans_ts import tune  # noqa: E402
from titans_ts.splits import split as tslib_split  # noqa: E402
from titans_ts.tuning import default_search_space  # noqa: E402

H = L = 96


def small_space(trial):
    """A small search space for a quick CPU run."""
    patch_len = trial.suggest_categorical("patch_len", [8, 16])
    return {
        "variant": trial.suggest_categorical("variant", ["lmm", "mag"]),
        "patch_len": patch_len,
        "stride": patch_len // 2,
        "d_model": trial.suggest_categorical("d_model", [16, 32]),
        "memory_depth": trial.suggest_int("memory_depth", 1, 2),
        "chunk_size": trial.suggest_categorical("chunk_size", [4, 8]),
        "learning_rate": trial.suggest_float("learning_rate", 5e-4, 5e-3, log=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("TITANS_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--storage", default=str(ROOT / "runs" / "optuna_etth1.db"),
                    help="SQLite file path or RDB URL (default runs/optuna_etth1.db)")
    ap.add_argument("--study-name", default="titans-etth1")
    ap.add_argument("--trials", type=int, default=5, help="finished trials the study should hold")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 2, --full 10)")
    ap.add_argument("--window-step", type=int, default=None, help="stride of training windows (default 16, --full 1)")
    ap.add_argument("--val-rows", type=int, default=None,
                    help="validation rows scored, from the start of the val period (default 720, --full all 2880)")
    ap.add_argument("--full", action="store_true", help="the default search space, 10 epochs, every window")
    ap.add_argument("--timeout", type=float, default=None, help="seconds after which no new trial starts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-refit", action="store_true", help="do not refit the best configuration (extra workers)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    epochs = args.epochs or (10 if args.full else 2)
    step = args.window_step or (1 if args.full else 16)

    df = tsdata.load("ETTh1", data_dir=args.data_dir)
    sp = tslib_split(df, "ETTh1", L)
    cols = list(sp.scaler.columns)
    values = sp.scaler.transform(df[cols].to_numpy(np.float64)).astype(np.float32)
    train_end, val_end = sp.borders.train[1], sp.borders.val[1]
    if args.val_rows or not args.full:
        val_end = min(val_end, train_end + (args.val_rows or 720))
    frame = pd.DataFrame(values[:val_end], columns=cols)
    frame.insert(0, "date", np.arange(val_end, dtype=np.int64))

    base = dict(input_size=L, n_layers=1, n_heads=4, ffn_mult=2, dropout=0.2, scaler=None, freq=1,
                batch_size=128 if args.full else 64,
                max_epochs=epochs, window_step=step, early_stopping_patience=3, device=args.device,
                eval_batch_size=1024)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        result = tune(frame, h=H, n_trials=args.trials, storage=args.storage, study_name=args.study_name,
                      search_space=default_search_space(L) if args.full else small_space, timeout=args.timeout,
                      val_size=val_end - train_end, base_params=base, seed=args.seed, refit=not args.no_refit,
                      format="wide", time_col="date")
    study, model = result
    print(f"\nstudy {study.study_name!r}: {len(study.trials)} trials "
          f"({sum(t.state.name == 'COMPLETE' for t in study.trials)} complete, "
          f"{sum(t.state.name == 'PRUNED' for t in study.trials)} pruned), this run {len(result.trials_run)} "
          f"trials in {time.perf_counter() - t0:.0f} s")
    if not np.isfinite(result.best_value):
        print("no trial completed yet")
        return
    print(f"best validation MSE {result.best_value:.4f} (trial {study.best_trial.number}); best parameters:")
    for k, v in study.best_params.items():
        print(f"  {k} = {v}")

    if model is not None:  # test MSE of the refit model, every test window (TSLib protocol)
        start, stop = sp.borders.test
        idx = np.arange(start, stop - L - H + 1)[:, None]
        x, y = values[idx + np.arange(L)], values[idx + L + np.arange(H)].astype(np.float64)
        p = model.predict_array(x)
        print(f"refit best model: test MSE {((p - y) ** 2).mean():.4f}, MAE {np.abs(p - y).mean():.4f} "
              f"({len(idx)} windows)")
    url = args.storage if "://" in args.storage else f"sqlite:///{Path(args.storage).expanduser().resolve()}"
    print(f"\nbrowse the study:  optuna-dashboard {url}")


if __name__ == "__main__":
    main()
