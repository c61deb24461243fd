"""Tests of titans_ts.TitansForecaster (tiny models, real ETTh1 slices, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

from titans_memory.errors import ConfigError, DataError, NotFittedError
from titans_ts import TitansForecaster, plot_forecast
from titans_ts.errors import (
    ColumnError,
    DuplicateTimestampsError,
    FrequencyError,
    IrregularTimestampsError,
    MissingValuesError,
    NonNumericError,
    SeriesTooShortError,
)

pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
              pytest.mark.filterwarnings("ignore:.*could not find the monitored key.*")]

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TITANS_TEST_DATA") or ROOT.parent / "shared" / "data")
ETTH1 = DATA / "ETT-small" / "ETTh1.csv.gz"

TINY = dict(d_model=16, n_layers=1, n_heads=2, memory_expansion=1, ffn_mult=1, patch_len=8, stride=8,
            chunk_size=8, max_epochs=1, batch_size=32, enable_progress_bar=False, random_state=0,
            device="cpu", dropout=0.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> TitansForecaster:
    return TitansForecaster(**{**TINY, **kw})


@pytest.fixture(scope="module")
def etth1() -> pd.DataFrame:
    if not ETTH1.is_file():
        pytest.fail(f"real test data not found at {DATA}; set TITANS_TEST_DATA")
    df = pd.read_csv(ETTH1)
    df["date"] = pd.to_datetime(df["date"])
    return df


def make_long(n_series=3, T=120, freq="h", start="2024-01-01", seed=0, exog=False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_series):
        ds = pd.date_range(start, periods=T, freq=freq)
        t = np.arange(T)
        y = 10 + i + np.sin(2 * np.pi * t / 24 + i) + 0.1 * rng.standard_normal(T)
        f = pd.DataFrame({"unique_id": f"s{i}", "ds": ds, "y": y})
        if exog:
            f["temp"] = np.cos(2 * np.pi * t / 24) + 0.05 * rng.standard_normal(T)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def fitted(etth1):
    """A tiny model fitted on 600 rows of ETTh1 (wide)."""
    model = tiny(h=12, input_size=48, window_step=2)
    return model.fit(etth1.iloc[:600]), etth1.iloc[:600]


# ------------------------------------------------------------------------------------------------
def test_three_line_usage_on_etth1_wide(fitted):
    model, df = fitted
    fc = model.predict()
    assert list(fc.columns) == ["unique_id", "ds", "TitansForecaster"]
    cols = [c for c in df.columns if c != "date"]
    assert len(fc) == 12 * len(cols)
    assert list(fc["unique_id"].unique()) == cols
    last = df["date"].iloc[-1]
    for _, g in fc.groupby("unique_id"):
        expected = pd.date_range(last, periods=13, freq="h")[1:]
        assert list(g["ds"]) == list(expected)
    assert np.isfinite(fc["TitansForecaster"]).all()
    assert model.freq_ == "h" and model.series_ids_ == cols
    assert model.last_ds_["OT"] == last
    assert model.history_ and "train_loss" in model.history_[0]


def test_horizon_truncation_and_roll_forward(fitted):
    model, _ = fitted
    full = model.predict()
    short = model.predict(horizon=5)
    assert len(short) == 5 * 7
    merged = short.merge(full, on=["unique_id", "ds"], suffixes=("_s", "_f"))
    np.testing.assert_allclose(merged["TitansForecaster_s"], merged["TitansForecaster_f"], rtol=1e-6)
    with pytest.warns(UserWarning, match="autoregressively"):
        longer = model.predict(horizon=30)
    assert len(longer) == 30 * 7
    first = longer.groupby("unique_id").head(12).reset_index(drop=True)
    np.testing.assert_allclose(first["TitansForecaster"], full["TitansForecaster"], rtol=1e-5)
    with pytest.raises(ConfigError):
        model.predict(horizon=0)


def test_save_load_roundtrip(fitted, tmp_path):
    model, df = fitted
    path = model.save(tmp_path / "m")
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "fitted.safetensors"}
    assert not any(p.suffix in (".pkl", ".pickle", ".pt") for p in path.iterdir())
    loaded = TitansForecaster.load(path)
    a, b = model.predict(), loaded.predict()
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(model.predict(df=df.iloc[-100:]), loaded.predict(df=df.iloc[-100:]))
    assert loaded.get_params() == model.get_params()
    assert loaded.series_ids_ == model.series_ids_ and loaded.freq_ == model.freq_


def test_predict_from_new_df_uses_its_end(fitted, etth1):
    model, _ = fitted
    new = etth1.iloc[600:700]
    fc = model.predict(df=new)
    assert fc["ds"].min() == new["date"].iloc[-1] + pd.Timedelta(hours=1)
    with pytest.raises(SeriesTooShortError, match="input_size"):
        model.predict(df=etth1.iloc[:20])


def test_predict_array_matches_predict(fitted):
    model, df = fitted
    x = df.drop(columns="date").to_numpy()[-48:][None]
    arr = model.predict_array(x)
    assert arr.shape == (1, 12, 7)
    fc = model.predict()
    np.testing.assert_allclose(arr[0].T.ravel(), fc["TitansForecaster"].to_numpy(), rtol=1e-5)


def test_long_format_pandas():
    df = make_long()
    model = tiny(h=6, input_size=24).fit(df)
    fc = model.predict()
    assert isinstance(fc, pd.DataFrame)
    assert list(fc.columns) == ["unique_id", "ds", "TitansForecaster"]
    assert fc.groupby("unique_id").size().to_dict() == {"s0": 6, "s1": 6, "s2": 6}
    assert fc["ds"].min() == df["ds"].max() + pd.Timedelta(hours=1)


def test_long_format_polars_in_polars_out():
    pl = pytest.importorskip("polars")
    pdf = make_long(n_series=2)
    df = pl.DataFrame({"unique_id": pdf["unique_id"].tolist(), "ds": pdf["ds"].to_numpy(), "y": pdf["y"].to_numpy()})
    model = tiny(h=6, input_size=24).fit(df)
    fc = model.predict()
    assert isinstance(fc, pl.DataFrame)
    assert fc.columns == ["unique_id", "ds", "TitansForecaster"]
    assert fc.height == 12
    ref = tiny(h=6, input_size=24).fit(pdf).predict()
    np.testing.assert_allclose(fc["TitansForecaster"].to_numpy(), ref["TitansForecaster"].to_numpy(), rtol=1e-5)
    cv = model.cross_validation(df, n_windows=2)
    assert isinstance(cv, pl.DataFrame)


def test_custom_column_names_and_unaligned_series():
    df = make_long(n_series=2).rename(columns={"unique_id": "item", "ds": "when", "y": "sales"})
    df = df[~((df["item"] == "s1") & (df["when"] < "2024-01-01 10:00"))]  # s1 starts later
    model = tiny(h=6, input_size=24).fit(df, id_col="item", time_col="when", target_col="sales")
    assert model.aligned_ is False
    fc = model.predict()
    assert list(fc.columns) == ["item", "when", "TitansForecaster"]


def test_get_params_set_params_clone():
    model = TitansForecaster(h=24, d_model=32, quantiles=None)
    params = model.get_params()
    assert params["h"] == 24 and params["d_model"] == 32 and params["variant"] == "lmm"
    model.set_params(d_model=48, variant="mag")
    assert model.d_model == 48 and model.variant == "mag"
    twin = clone(model)
    assert twin is not model and twin.get_params() == model.get_params()
    # __init__ stores arguments untouched, validation happens in fit
    bad = TitansForecaster(h=-3, loss="nonsense")
    assert bad.h == -3
    with pytest.raises(ConfigError):
        bad.fit(make_long())
    with pytest.raises(ConfigError, match="val_size"):
        tiny(h=6, input_size=24, val_size=3).fit(make_long())


def test_quantile_forecasts_ordered_and_named():
    df = make_long(n_series=2)
    model = tiny(h=6, input_size=24, loss="quantile", quantiles=[0.1, 0.25, 0.75, 0.9], max_epochs=2).fit(df)
    fc = model.predict()
    cols = ["TitansForecaster-lo-80", "TitansForecaster-lo-50", "TitansForecaster", "TitansForecaster-hi-50", "TitansForecaster-hi-80"]
    assert set(cols) <= set(fc.columns)
    values = fc[cols].to_numpy()
    assert (np.diff(values, axis=1) >= -1e-9).all()
    sub = model.predict(quantiles=[0.1, 0.3])
    assert "TitansForecaster-lo-40" in sub.columns and "TitansForecaster-hi-80" not in sub.columns
    assert (sub["TitansForecaster-lo-80"] <= sub["TitansForecaster-lo-40"] + 1e-9).all()
    with pytest.raises(ConfigError):
        model.predict(quantiles=[0.01])
    with pytest.raises(ConfigError):
        tiny(h=6, input_size=24).fit(df).predict(quantiles=[0.1])
    fig = plot_forecast(df, fc, unique_id="s1", last_n=48)
    assert fig.axes and len(fig.axes[0].collections) == 2  # two bands
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_cross_validation_columns_and_cutoffs():
    df = make_long(n_series=2, T=150)
    model = tiny(h=6, input_size=24)
    cv = model.cross_validation(df, n_windows=3, step_size=4)
    assert list(cv.columns) == ["unique_id", "ds", "cutoff", "y", "TitansForecaster"]
    assert len(cv) == 2 * 3 * 6
    end = df["ds"].max()
    expected = [end - pd.Timedelta(hours=6 + 4 * k) for k in (2, 1, 0)]
    for _, g in cv.groupby("unique_id"):
        assert sorted(g["cutoff"].unique()) == expected
        for cutoff, w in g.groupby("cutoff"):
            assert (w["ds"] > cutoff).all() and len(w) == 6
            assert w["ds"].min() == cutoff + pd.Timedelta(hours=1)
    truth = df.set_index(["unique_id", "ds"])["y"]
    np.testing.assert_allclose(cv["y"], truth.loc[list(zip(cv["unique_id"], cv["ds"]))].to_numpy())
    # the model is fitted on the data up to the first cutoff only
    assert model.last_ds_["s0"] == expected[0]
    refit = tiny(h=6, input_size=24).cross_validation(df, n_windows=2, refit=True)
    assert len(refit) == 2 * 2 * 6 and refit["cutoff"].nunique() == 2


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
def test_each_variant_fits_one_step(variant):
    model = tiny(h=6, input_size=24, variant=variant, max_steps=1, window_size=4, segment_size=2).fit(make_long(n_series=1, T=80))
    fc = model.predict()
    assert len(fc) == 6 and np.isfinite(fc["TitansForecaster"]).all()
    assert model.model_.backbone.config.variant == variant


def test_channel_mixing_mode(etth1):
    df = etth1.iloc[:400]
    model = tiny(h=12, input_size=48, channel_mode="mixing").fit(df)
    assert model.model_.embed.proj.in_features == 7 * 8
    fc = model.predict()
    assert len(fc) == 7 * 12
    unaligned = make_long(n_series=2)
    unaligned = unaligned[~((unaligned["unique_id"] == "s1") & (unaligned.index % 120 < 5))]
    with pytest.raises(DataError, match="same timestamps"):
        tiny(h=6, input_size=24, channel_mode="mixing").fit(unaligned)


def test_exogenous_covariates():
    df = make_long(n_series=2, exog=True)
    model = tiny(h=6, input_size=24).fit(df)
    assert model.exog_ == ["temp"] and model.model_.embed.proj.in_features == 2 * 8
    assert len(model.predict()) == 12
    with pytest.raises(ConfigError, match="covariate"):
        model.predict(horizon=10)
    wide = make_long(n_series=1, exog=True).drop(columns="unique_id")
    m2 = tiny(h=6, input_size=24).fit(wide.rename(columns={"y": "load"}), target_cols=["load"])
    assert m2.series_ids_ == ["load"] and m2.exog_ == ["temp"]


def test_integer_timestamps():
    df = make_long(n_series=1)
    df["ds"] = np.arange(len(df)) * 5
    model = tiny(h=6, input_size=24).fit(df)
    assert model.freq_ == 5
    fc = model.predict()
    assert fc["ds"].tolist() == [int(df["ds"].max()) + 5 * k for k in range(1, 7)]


# ------------------------------------------------------------------------------------------------
# bad input
def test_predict_before_fit():
    with pytest.raises(NotFittedError, match="fit"):
        TitansForecaster().predict()
    with pytest.raises(NotFittedError):
        TitansForecaster().save("/tmp/never")


def test_nan_policies():
    df = make_long()
    df.loc[(df["unique_id"] == "s1") & (df.index % 120 == 50), "y"] = np.nan
    with pytest.raises(MissingValuesError, match=r"series 's1'.*missing.*nan_policy") as err:
        tiny(h=6, input_size=24).fit(df)
    assert isinstance(err.value, DataError) and "interpolate" in str(err.value)
    fc = tiny(h=6, input_size=24, nan_policy="interpolate").fit(df).predict()
    assert np.isfinite(fc["TitansForecaster"]).all()
    masked = tiny(h=6, input_size=24, nan_policy="mask").fit(df)
    assert np.isfinite(masked.predict()["TitansForecaster"]).all()
    cv = masked.cross_validation(df, n_windows=13, step_size=6)
    assert cv["y"].isna().sum() == 1  # the missing truth stays missing
    # the documented repair works
    repaired = df.copy()
    repaired["y"] = repaired.groupby("unique_id")["y"].transform(lambda s: s.interpolate(limit_direction="both"))
    tiny(h=6, input_size=24, max_steps=1).fit(repaired)


def test_irregular_timestamps():
    df = make_long()
    df = df.drop(index=df.index[(df["unique_id"] == "s2")][40])  # a gap in s2
    with pytest.raises(IrregularTimestampsError, match=r"series 's2'.*expected"):
        tiny(h=6, input_size=24).fit(df)


def test_duplicate_timestamps():
    df = make_long()
    dup = df[df["unique_id"] == "s0"].iloc[[10]]
    df = pd.concat([df, dup], ignore_index=True)
    with pytest.raises(DuplicateTimestampsError, match=r"series 's0'.*duplicated"):
        tiny(h=6, input_size=24).fit(df)


def test_series_too_short():
    df = make_long()
    df = df[~((df["unique_id"] == "s1") & (df.index % 120 >= 20))]
    with pytest.raises(SeriesTooShortError, match=r"series 's1' has 20 steps"):
        tiny(h=6, input_size=24, val_size=0).fit(df)
    with pytest.raises(SeriesTooShortError, match="n_windows"):
        tiny(h=6, input_size=24).cross_validation(make_long(T=40), n_windows=5)


def test_frequency_errors():
    df = make_long(n_series=1, T=60)
    rng = np.random.default_rng(0)
    df["ds"] = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.cumsum(rng.integers(1, 1000, len(df))), unit="min")
    with pytest.raises(FrequencyError, match="pass freq="):
        tiny(h=6, input_size=24).fit(df)
    with pytest.raises(FrequencyError, match="unknown frequency"):
        tiny(h=6, input_size=24, freq="every-other-tuesday").fit(make_long())
    mixed = pd.concat([make_long(n_series=1), make_long(n_series=1, freq="D").assign(unique_id="daily")])
    with pytest.raises(FrequencyError, match="different frequencies"):
        tiny(h=6, input_size=24).fit(mixed)
    # an explicit freq that the data does not follow names the series
    with pytest.raises(IrregularTimestampsError, match="s0"):
        tiny(h=6, input_size=24, freq="2h").fit(make_long(n_series=1))
    # a calendar frequency given explicitly works
    monthly = make_long(n_series=1, T=60, freq="MS")
    assert tiny(h=6, input_size=24, freq="MS", max_steps=1).fit(monthly).freq_ == "MS"


def test_non_numeric_target():
    df = make_long()
    df["y"] = df["y"].astype(object)
    df.loc[df.index[130], "y"] = "n/a"
    with pytest.raises(NonNumericError, match=r"series 's1'.*'n/a'"):
        tiny(h=6, input_size=24).fit(df)
    wide = pd.DataFrame({"date": pd.date_range("2024", periods=80, freq="h"), "a": np.arange(80.0), "b": ["x"] * 80})
    with pytest.raises(NonNumericError, match="'b'"):
        tiny(h=6, input_size=24).fit(wide)


def test_unrecognised_frame():
    with pytest.raises(ColumnError):
        tiny().fit(pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}))
    with pytest.raises(ColumnError, match="target_col"):
        tiny().fit(pd.DataFrame({"unique_id": ["a"], "ds": [pd.Timestamp("2024")], "value": [1.0]}))
    with pytest.raises(DataError):
        tiny().fit([1, 2, 3])


# ------------------------------------------------------------------------------------------------
def test_training_reduces_validation_loss(etth1):
    """Out-of-sample MSE on held-out ETTh1 rows: trained model vs the same initial weights untrained."""
    train = etth1.iloc[:1500]
    params = dict(h=24, input_size=96, patch_len=16, stride=8, max_epochs=2, window_step=2, val_size=240)
    trained = tiny(**params).fit(train)
    untrained = tiny(**{**params, "max_steps": 1, "learning_rate": 1e-12}).fit(train)
    vals = etth1.drop(columns="date").to_numpy()
    starts = np.arange(1500 - 96, 1900 - 96 - 24, 8)
    x = np.stack([vals[s : s + 96] for s in starts])
    y = np.stack([vals[s + 96 : s + 120] for s in starts])
    std = trained.scaler_["std"][:, 0]
    err = lambda m: float((((m.predict_array(x) - y) / std) ** 2).mean())  # noqa: E731
    assert err(trained) < 0.9 * err(untrained)
    assert trained.history_[-1]["val_loss"] < trained.history_[0]["train_loss"] * 2


def _load_ltsf():
    from _benchmarks import load_benchmark

    return load_benchmark("ltsf", "ltsf_bench")


def test_ltsf_eval_counts_every_test_window(tmp_path):
    if not ETTH1.is_file():
        pytest.fail(f"real test data not found at {DATA}")
    ltsf = _load_ltsf()
    values, borders, cols = ltsf.prepare("ETTh1", str(DATA))
    # TSLib: test rows 11520..14400 plus 96 look-back rows; windows = 2976 - 96 - 96 + 1
    assert borders.test == (11520 - 96, 14400)
    expected = (14400 - (11520 - 96)) - 96 - 96 + 1
    assert expected == 2785

    class Zero:
        calls = 0
        seen = 0

        def predict_array(self, x):
            Zero.calls += 1
            Zero.seen += len(x)
            assert x.shape[1:] == (96, 7)
            return np.zeros((len(x), 96, 7))

    mse, mae, n = ltsf.evaluate(Zero(), values, borders.test[0], borders.test[1], 96, 96, chunk=1000)
    assert n == expected and Zero.seen == expected and Zero.calls == 3  # 1000 + 1000 + 785, last batch kept
    test = values[borders.test[0] + 96 : borders.test[1]]
    # every target row of the test split is covered; MSE of a zero forecast = mean of y^2 over windows
    ys = np.stack([values[borders.test[0] + 96 + i : borders.test[0] + 192 + i] for i in range(expected)])
    assert ys.shape == (2785, 96, 7)
    np.testing.assert_allclose(mse, float((ys.astype(np.float64) ** 2).mean()), rtol=1e-6)
    np.testing.assert_allclose(mae, float(np.abs(ys.astype(np.float64)).mean()), rtol=1e-6)
    assert test.shape[0] == 2880
    # the scaler is fit on the train rows only
    train = values[: borders.train[1]]
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(0), 1, atol=1e-4)
    # csv update and markdown section
    rows = [dict(dataset="ETTh1", horizon=h, model="TitansForecaster", variant="lmm", mse=0.44, mae=0.42, seed=0,
                 train_seconds=1.0, device="cpu", date="2026-01-01") for h in (96, 192, 336, 720)]
    merged = ltsf.update_csv(tmp_path / "r.csv", rows)
    merged = ltsf.update_csv(tmp_path / "r.csv", [dict(rows[0], mse=0.43)])
    assert len(merged) == 4 and float([r for r in merged if int(r["horizon"]) == 96][0]["mse"]) == 0.43
    table = ltsf.markdown(merged)
    assert "| ETTh1 | 96,192,336,720 |" in table and "**met**" in table and "**missed**" in table
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## GUE\n\nkeep me\n\n## LTSF\n\nold\n\n## Other\n\nalso keep\n")
    ltsf.write_md(md, table)
    text = md.read_text()
    assert "keep me" in text and "also keep" in text and "old" not in text and text.count("## LTSF") == 1


def test_interrupted_fit_resumes_from_checkpoint_dir(etth1, tmp_path):
    """With ``checkpoint_dir`` a fit that stopped (here: after 2 of 3 epochs) continues from its
    last checkpoint instead of starting over."""
    ckpt = tmp_path / "ckpt"
    first = tiny(max_epochs=2, checkpoint_dir=str(ckpt), early_stopping_patience=None).fit(etth1.iloc[:400])
    assert [row["epoch"] for row in first.history_] == [0.0, 1.0]
    assert (ckpt / "last.ckpt").is_file()
    resumed = tiny(max_epochs=3, checkpoint_dir=str(ckpt), early_stopping_patience=None).fit(etth1.iloc[:400])
    assert [row["epoch"] for row in resumed.history_] == [2.0]
