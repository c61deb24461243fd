"""TitansEstimator with the GluonTS tools, on real ETTh1 data (7 columns as 7 series).

Tiny model, one or two short epochs: these tests check the plumbing (datasets, predictors,
evaluation flows, serialisation, missing values, forecast types), not accuracy.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("gluonts")

from gluonts.dataset.common import ListDataset  # noqa: E402
from gluonts.dataset.pandas import PandasDataset  # noqa: E402
from gluonts.dataset.split import split  # noqa: E402
from gluonts.evaluation import Evaluator, make_evaluation_predictions  # noqa: E402
from gluonts.ev.metrics import MSE, MeanWeightedSumQuantileLoss  # noqa: E402
from gluonts.model import Predictor, QuantileForecast, SampleForecast, evaluate_model  # noqa: E402
from gluonts.torch.model.predictor import PyTorchPredictor  # noqa: E402

from titans_memory.training import build_lightning_module, lightning_module_class  # noqa: E402
from titans_ts.gluonts import TitansEstimator, TitansLightningModule  # noqa: E402
from titans_ts.gluonts.module import GluonTSQuantileLoss, TitansGluonModel, impute_missing, sample_from_quantiles  # noqa: E402


SHARED_DATA = Path(os.environ.get("TITANS_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
H, L, ROWS = 24, 96, 2000
COLS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
TINY = dict(context_length=L, patch_len=16, stride=8, d_model=16, n_layers=1, n_heads=2, memory_depth=1,
            memory_expansion=2, chunk_size=8, ffn_mult=0, dropout=0.0, batch_size=32)


def _trainer(tmp: Path, epochs: int = 2, batches: int = 8) -> dict:
    return dict(max_epochs=epochs, limit_train_batches=batches, default_root_dir=str(tmp), enable_progress_bar=False,
                logger=False, enable_model_summary=False, accelerator="cpu")


@pytest.fixture(scope="module")
def etth1() -> pd.DataFrame:
    path = SHARED_DATA / "ETT-small" / "ETTh1.csv.gz"
    if not path.is_file():
        pytest.fail(f"real test data not found at {path}; set TITANS_TEST_DATA")
    return pd.read_csv(path, parse_dates=["date"]).iloc[:ROWS].reset_index(drop=True)


@pytest.fixture(scope="module")
def long_df(etth1) -> pd.DataFrame:
    return etth1.melt(id_vars="date", value_vars=COLS, var_name="item_id", value_name="target")


@pytest.fixture(scope="module")
def trained(etth1, long_df, tmp_path_factory):
    """A predictor trained with the split(...) flow on PandasDataset.from_long_dataframe."""
    pl.seed_everything(0, verbose=False)
    ds = PandasDataset.from_long_dataframe(long_df, item_id="item_id", timestamp="date", target="target", freq="h")
    train_ds, test_template = split(ds, offset=-3 * H)
    est = TitansEstimator(prediction_length=H, num_batches_per_epoch=8,
                          trainer_kwargs=_trainer(tmp_path_factory.mktemp("gl")), **TINY)
    out = est.train_model(train_ds, validation_data=train_ds)
    return est, out, ds, test_template


def test_lightning_module_is_the_library_module(trained):
    est, out, _, _ = trained
    module = out.trained_net
    assert isinstance(module, TitansLightningModule)
    assert isinstance(module, lightning_module_class())
    assert type(build_lightning_module(torch.nn.Linear(1, 1), lambda n, b: 0.0)) is lightning_module_class()
    assert isinstance(module.loss_fn, GluonTSQuantileLoss)
    assert "val_loss" in out.trainer.callback_metrics and "train_loss" in out.trainer.callback_metrics
    assert math.isfinite(float(out.trainer.callback_metrics["val_loss"]))
    assert out.trainer.max_epochs == 2 and isinstance(out.predictor, PyTorchPredictor)


def test_split_generate_instances_evaluate_model(trained):
    est, out, ds, test_template = trained
    test_data = test_template.generate_instances(prediction_length=H, windows=3, distance=H)
    metrics = evaluate_model(out.predictor, test_data=test_data, metrics=[MSE(), MeanWeightedSumQuantileLoss(
        quantile_levels=[0.1, 0.5, 0.9])], axis=None)
    assert len(metrics) == 1
    mse = float(metrics["MSE[mean]"].iloc[0])
    wql = float(metrics["mean_weighted_sum_quantile_loss"].iloc[0])
    assert np.isfinite(mse) and mse > 0 and 0 < wql < 1.0
    forecasts = list(out.predictor.predict(test_data.input))
    assert len(forecasts) == len(COLS) * 3
    assert all(isinstance(f, QuantileForecast) for f in forecasts)


def test_make_evaluation_predictions_evaluator_and_dataset_kinds(trained, etth1):
    est, out, _, _ = trained
    wide = etth1.set_index("date")
    pandas_ds = PandasDataset({c: wide[c] for c in COLS}, freq="h")
    list_ds = ListDataset([{"start": pd.Period(etth1["date"].iloc[0], freq="h"), "target": wide[c].to_numpy(),
                            "item_id": c} for c in COLS], freq="h")
    fc_it, ts_it = make_evaluation_predictions(pandas_ds, out.predictor, num_samples=50)
    forecasts, tss = list(fc_it), list(ts_it)
    agg, per_item = Evaluator(quantiles=(0.1, 0.5, 0.9), num_workers=0)(tss, forecasts)
    assert len(per_item) == len(COLS)
    assert all(np.isfinite(agg[k]) for k in ("MSE", "mean_wQuantileLoss", "MASE", "Coverage[0.9]"))
    f_list = list(out.predictor.predict(list_ds))
    f_pandas = list(out.predictor.predict(pandas_ds))
    for a, b in zip(f_list, f_pandas):
        assert a.start_date == b.start_date and a.item_id == b.item_id
        np.testing.assert_allclose(a.forecast_array, b.forecast_array, rtol=1e-5, atol=1e-5)
    # quantiles: the trained levels, ordered, median inside, shape (Q, H)
    f = forecasts[0]
    assert f.forecast_keys == [str(q) for q in est.quantiles] and f.forecast_array.shape == (len(est.quantiles), H)
    assert np.all(np.diff(np.stack([f.quantile(q) for q in est.quantiles]), axis=0) >= -1e-5)
    assert f.start_date == pd.Period(etth1["date"].iloc[ROWS - H], freq="h")


def test_serialize_deserialize_identical(trained, tmp_path):
    est, out, ds, test_template = trained
    out.predictor.serialize(tmp_path)
    assert (tmp_path / "prediction-net-state.pt").is_file()
    loaded = Predictor.deserialize(tmp_path, device="cpu")
    assert isinstance(loaded, PyTorchPredictor) and isinstance(loaded.prediction_net, TitansLightningModule)
    inputs = test_template.generate_instances(prediction_length=H, windows=2, distance=H).input
    before = [f.forecast_array for f in out.predictor.predict(inputs)]
    after = [f.forecast_array for f in loaded.predict(inputs)]
    assert len(before) == len(after) == 2 * len(COLS)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_missing_values_dynamic_features_and_samples(etth1, tmp_path):
    """NaNs in the target (scattered and a block) train and forecast finitely; a dynamic real
    feature is used; forecast_type='sample' gives SampleForecast (num_samples, H)."""
    rng = np.random.default_rng(0)
    start = pd.Period(etth1["date"].iloc[0], freq="h")
    entries = []
    for c in COLS[:4]:
        y = etth1[c].to_numpy(dtype=np.float64).copy()
        y[rng.random(len(y)) < 0.1] = np.nan
        y[300:340] = np.nan
        y[-H - 5:-H + 3] = np.nan                      # missing values inside the last look-back
        feat = etth1[["OT", "HUFL"]].to_numpy(dtype=np.float32).T       # [D, T]
        entries.append({"start": start, "target": y, "feat_dynamic_real": feat, "item_id": c})
    ds = ListDataset(entries, freq="h")
    pl.seed_everything(1, verbose=False)
    est = TitansEstimator(prediction_length=H, num_feat_dynamic_real=2, forecast_type="sample", num_samples=64,
                          quantiles=[0.05, 0.25, 0.5, 0.75, 0.95], num_batches_per_epoch=6,
                          trainer_kwargs=_trainer(tmp_path, epochs=1, batches=6), **TINY)
    out = est.train_model(ds)
    assert math.isfinite(float(out.trainer.callback_metrics["train_loss"]))
    fc_it, ts_it = make_evaluation_predictions(ds, out.predictor, num_samples=150)
    forecasts = list(fc_it)
    assert len(forecasts) == 4
    for f in forecasts:                                          # num_samples asked for: 150
        assert isinstance(f, SampleForecast)
        assert f.samples.shape == (150, H) and np.all(np.isfinite(f.samples))
    own = list(out.predictor.predict(ds))                        # the estimator's num_samples
    assert own[0].samples.shape == (64, H)
    agg, _ = Evaluator(num_workers=0)(list(ts_it), forecasts)     # the NaN targets are masked
    assert np.isfinite(agg["MSE"])
    with pytest.raises(Exception):                               # the features are required
        list(out.predictor.predict(ListDataset([{k: v for k, v in entries[0].items() if k != "feat_dynamic_real"}],
                                               freq="h")))


def test_loss_masks_unobserved_targets_and_imputes_inputs():
    torch.manual_seed(0)
    net = TitansGluonModel(prediction_length=8, context_length=32, quantiles=[0.1, 0.5, 0.9], d_model=16,
                           n_layers=1, n_heads=2, patch_len=8, stride=4, chunk_size=4, dropout=0.0)
    past = torch.randn(4, 32)
    obs = torch.ones(4, 32)
    fut, fobs = torch.randn(4, 8), torch.ones(4, 8)
    fobs[:, 3:5] = 0
    base = net.loss(past, obs, fut, fobs)
    fut2 = fut.clone()
    fut2[:, 3:5] = 1e6                                            # unobserved: no effect
    assert torch.allclose(base, net.loss(past, obs, fut2, fobs))
    fut2[:, 0] = 1e6                                              # observed: an effect
    assert not torch.allclose(base, net.loss(past, obs, fut2, fobs))
    # unobserved inputs are imputed: their (dummy) values do not change the forecast
    obs2 = obs.clone()
    obs2[:, 10:14] = 0
    p1 = past.clone()
    p1[:, 10:14] = 0.0
    p2 = past.clone()
    p2[:, 10:14] = 1e3
    net.eval()
    assert torch.allclose(net.quantile_forecast(p1, obs2), net.quantile_forecast(p2, obs2))
    x = torch.tensor([[np.nan, 1.0, np.nan, 3.0, np.nan]])
    o = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    assert impute_missing(x, o).tolist() == [[2.0, 1.0, 1.0, 3.0, 3.0]]   # leading NaN: row mean


def test_sample_from_quantiles_matches_quantile_function():
    levels = torch.tensor([0.1, 0.5, 0.9])
    q = torch.tensor([[[-1.0, 0.0, 2.0]]])                       # [B=1, H=1, Q=3]
    torch.manual_seed(0)
    s = sample_from_quantiles(q, levels, 20000)
    assert s.shape == (1, 20000, 1)
    emp = torch.quantile(s.flatten(), levels)
    assert torch.allclose(emp, q.flatten(), atol=0.05)


def test_estimator_rejects_bad_settings():
    from titans_memory.errors import ConfigError

    with pytest.raises(ConfigError):
        TitansEstimator(prediction_length=H, forecast_type="distribution")
    with pytest.raises(ConfigError):
        TitansEstimator(prediction_length=H, context_length=8, patch_len=16)
    with pytest.raises(ConfigError):
        TitansEstimator(prediction_length=H, quantiles=[0.1, 1.5])
    est = TitansEstimator(prediction_length=H, quantiles=[0.9, 0.1])
    assert est.quantiles == [0.1, 0.5, 0.9] and est.context_length == 4 * H
    assert est.trainer_kwargs["max_epochs"] == 20 and est.trainer_kwargs["accelerator"] == "auto"
