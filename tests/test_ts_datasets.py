"""Tests of titans_ts.datasets and titans_ts.splits on the real LTSF files (no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from titans_memory.errors import ConfigError, DatasetError
from titans_ts import datasets as ds
from titans_ts.splits import Scaler, split, split_borders

DATA = Path(os.environ.get("TITANS_TEST_DATA")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")
LOCAL = ["ETTh1", "ETTh2", "ETTm1", "ETTm2", "Weather"]
ETT_COLS = ["date", "HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No env leaks, a private cache, and no network: any real download fails the test."""
    monkeypatch.delenv("TITANS_DATA_DIR", raising=False)
    monkeypatch.setenv("TITANS_CACHE_DIR", str(tmp_path / "cache"))

    def no_network(url, dest):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(ds, "_fetch", no_network)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (DATA / "ETT-small" / "ETTh1.csv.gz").is_file():
        pytest.skip(f"shared data not found at {DATA} (set TITANS_TEST_DATA)")
    return DATA


@pytest.fixture(scope="module")
def etth1_text(data_dir) -> str:
    """The upstream ETTh1.csv, as text."""
    return gzip.open(data_dir / "ETT-small" / "ETTh1.csv.gz", "rt", encoding="utf-8").read()


def _write(folder: Path, text: str, name: str = "ETTh1.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


def _cache_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def _check_frame(df: pd.DataFrame, name: str) -> None:
    info = ds.dataset_info(name)
    assert df.shape == (info["n_rows"], info["n_columns"])
    assert list(df.columns) == info["columns"]
    assert pd.api.types.is_datetime64_any_dtype(df["date"])
    assert all(pd.api.types.is_float_dtype(df[c]) for c in df.columns[1:])


# ---------------------------------------------------------------- loading local copies


@pytest.mark.parametrize("name", LOCAL)
def test_load_from_data_dir(name, data_dir):
    df = ds.load(name, data_dir=data_dir, download=False)
    _check_frame(df, name)
    if name.startswith("ETT"):
        assert list(df.columns) == ETT_COLS
        assert df["date"].iloc[0] == pd.Timestamp("2016-07-01 00:00:00")


@pytest.mark.parametrize("name", ["etth1", "ETTH2", "ettm1", "EttM2", "weather"])
def test_load_from_env_var_case_insensitive(name, data_dir, monkeypatch):
    monkeypatch.setenv("TITANS_DATA_DIR", str(data_dir))
    _check_frame(ds.load(name, download=False), name)


def test_file_directly_in_data_dir_and_precedence(tmp_path, etth1_text, data_dir, monkeypatch):
    # a broken copy under TITANS_DATA_DIR is not reached when data_dir holds a good one
    _write(tmp_path / "env", "date,HUFL\n")
    monkeypatch.setenv("TITANS_DATA_DIR", str(tmp_path / "env"))
    _write(tmp_path / "flat", etth1_text)
    _check_frame(ds.load("ETTh1", data_dir=tmp_path / "flat", download=False), "ETTh1")
    with pytest.raises(DatasetError, match="columns"):
        ds.load("ETTh1", data_dir=tmp_path / "nowhere", download=False)


def test_manifest_checksums_match_shared_data(data_dir):
    for name, rel in [("ETTh1", "ETT-small/ETTh1.csv.gz"), ("ETTh2", "ETT-small/ETTh2.csv.gz"),
                      ("Weather", "weather/weather.csv.gz"), ("ETTm1", "ETT-small/ETTm1.csv.gz"),
                      ("ETTm2", "ETT-small/ETTm2.csv.gz")]:
        raw = gzip.open(data_dir / rel).read()
        assert hashlib.sha256(raw).hexdigest() == ds.dataset_info(name)["sha256"], name
        if name == "Weather":
            assert hashlib.md5(raw).hexdigest() == "2e79e5e4c921d3542684c4a34c6748b4"
    for name in LOCAL:
        df = ds.load(name, data_dir=data_dir, verify=False)
        assert ds.values_sha256(df) == ds.dataset_info(name)["values_sha256"], name


def test_values_checksum_ignores_float_formatting(tmp_path, etth1_text):
    frame = pd.read_csv(io.StringIO(etth1_text))
    cols = frame.columns[1:]
    frame[cols] = frame[cols].astype(np.float32)  # written as shortest float32 text: 5.827
    path = tmp_path / "ETT-small" / "ETTh1.csv.gz"
    path.parent.mkdir()
    frame.to_csv(path, index=False)
    assert gzip.open(path).read() != etth1_text.encode()
    _check_frame(ds.load("ETTh1", data_dir=tmp_path, verify=True, download=False), "ETTh1")


# ---------------------------------------------------------------- corrupted copies


def test_truncated_copy_raises(tmp_path, etth1_text):
    path = _write(tmp_path, etth1_text[: len(etth1_text) // 2])
    with pytest.raises(DatasetError) as err:
        ds.load("ETTh1", data_dir=tmp_path, download=False)
    msg = str(err.value)
    assert str(path) in msg and "17420" in msg and "rows" in msg and "TITANS_DATA_DIR" in msg


def test_altered_value_fails_values_check(tmp_path, etth1_text):
    lines = etth1_text.splitlines(keepends=True)
    row = lines[5000].rstrip("\n").split(",")
    row[7] = str(float(row[7]) + 1.0)  # OT of one row
    lines[5000] = ",".join(row) + "\n"
    path = _write(tmp_path, "".join(lines))
    with pytest.raises(DatasetError, match="values_sha256") as err:
        ds.load("ETTh1", data_dir=tmp_path, download=False)
    assert str(path) in str(err.value)
    # shape and columns are still right, so the check can be switched off
    _check_frame(ds.load("ETTh1", data_dir=tmp_path, verify=False, download=False), "ETTh1")


@pytest.mark.parametrize("mutate, pattern", [
    (lambda t: t.replace("HUFL", "HUFX", 1), "columns"),
    (lambda t: t.replace(",30.5310001373291\n", ",abc\n", 1), "non-numeric"),
])
def test_wrong_header_or_text_value_raises(tmp_path, etth1_text, mutate, pattern):
    _write(tmp_path, mutate(etth1_text))
    with pytest.raises(DatasetError, match=pattern):
        ds.load("ETTh1", data_dir=tmp_path, download=False)


def test_broken_gzip_raises(tmp_path):
    (tmp_path / "ETTh1.csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DatasetError, match="cannot parse"):
        ds.load("ETTh1", data_dir=tmp_path, download=False)


# ---------------------------------------------------------------- names, not found


def test_unknown_name_lists_known_names():
    with pytest.raises(DatasetError) as err:
        ds.load("ETTh3")
    assert isinstance(err.value, OSError)
    for name in LOCAL + ["Electricity", "Traffic", "Exchange", "ILI"]:
        assert name in str(err.value)


def test_aliases():
    assert ds.dataset_info("ECL")["name"] == "Electricity"
    assert ds.dataset_info("national_illness")["name"] == "ILI"
    assert ds.dataset_info("exchange_rate")["name"] == "Exchange"


def test_not_found_without_download(tmp_path):
    with pytest.raises(DatasetError, match="not found.*download=False"):
        ds.load("Weather", data_dir=tmp_path, download=False)


# ---------------------------------------------------------------- downloads (fake fetch)


def _fetch_text(text: str, calls: list):
    def fetch(url, dest):
        calls.append(url)
        Path(dest).write_text(text, encoding="utf-8")
    return fetch


def test_download_into_cache_then_reuse(tmp_path, etth1_text, monkeypatch):
    calls = []
    monkeypatch.setattr(ds, "_fetch", _fetch_text(etth1_text, calls))
    _check_frame(ds.load("ETTh1", data_dir=tmp_path / "empty"), "ETTh1")
    assert calls == [ds.dataset_info("ETTh1")["url"]]
    assert _cache_files(tmp_path) == [tmp_path / "cache" / "ETT-small" / "ETTh1.csv"]
    _check_frame(ds.load("etth1"), "ETTh1")  # second time from the cache
    assert len(calls) == 1


def test_download_cache_dir_argument_wins_over_env(tmp_path, etth1_text, monkeypatch):
    monkeypatch.setattr(ds, "_fetch", _fetch_text(etth1_text, []))
    ds.load("ETTh1", cache_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "ETT-small" / "ETTh1.csv").is_file()
    assert not _cache_files(tmp_path)


def test_download_sha256_mismatch_leaves_nothing(tmp_path, etth1_text, monkeypatch):
    monkeypatch.setattr(ds, "_fetch", _fetch_text(etth1_text.replace("\n", "\r\n"), []))
    with pytest.raises(DatasetError, match="sha256") as err:
        ds.load("ETTh1")
    assert ds.dataset_info("ETTh1")["url"] in str(err.value)
    assert not _cache_files(tmp_path)


def test_download_without_file_sha_checks_values(tmp_path, etth1_text, monkeypatch):
    monkeypatch.setitem(ds._manifest()["datasets"]["ETTh1"], "sha256", None)
    reformatted = etth1_text.replace("5.827000141143799", "5.827")  # same float32 value
    monkeypatch.setattr(ds, "_fetch", _fetch_text(reformatted, []))
    _check_frame(ds.load("ETTh1"), "ETTh1")
    os.remove(tmp_path / "cache" / "ETT-small" / "ETTh1.csv")
    monkeypatch.setattr(ds, "_fetch", _fetch_text(etth1_text.replace("5.827000141143799", "6.0"), []))
    with pytest.raises(DatasetError, match="values_sha256"):
        ds.load("ETTh1")
    assert not _cache_files(tmp_path)


def test_download_network_error(tmp_path, monkeypatch):
    def fail(url, dest):
        Path(dest).write_bytes(b"partial")
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(ds, "_fetch", fail)
    with pytest.raises(DatasetError, match="download of .* failed") as err:
        ds.load("Weather", data_dir=tmp_path / "mine")
    assert f"not found in ['{tmp_path / 'mine'}'" in str(err.value)  # says where it looked first
    assert not _cache_files(tmp_path)


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("name, n_rows, ends", [
    ("ETTh1", 17420, (8640, 11520, 14400)),
    ("ETTh2", 17420, (12 * 30 * 24, 12 * 30 * 24 + 4 * 30 * 24, 12 * 30 * 24 + 8 * 30 * 24)),
    ("ETTm1", 69680, (34560, 46080, 57600)),
    ("ETTm2", 69680, (34560, 46080, 57600)),
    ("Weather", 52696, (36887, 36887 + 5270, 52696)),
    ("ILI", 966, (676, 676 + 97, 966)),
])
def test_split_borders_match_tslib(name, n_rows, ends):
    b = split_borders(name, n_rows)
    assert (b.train, b.val, b.test) == ((0, ends[0]), (ends[0], ends[1]), (ends[1], ends[2]))
    b = split_borders(name, n_rows, input_size=96 if n_rows > 1000 else 36)
    s = 96 if n_rows > 1000 else 36
    assert (b.train, b.val, b.test) == ((0, ends[0]), (ends[0] - s, ends[1]), (ends[1] - s, ends[2]))


def test_weather_split_sizes():
    b = split_borders("weather", 52696)
    sizes = [stop - start for start, stop in (b.train, b.val, b.test)]
    assert sizes == [36887, 5270, 10539]


def test_split_errors():
    with pytest.raises(DatasetError, match="too few"):
        split_borders("ETTh1", 14000)
    with pytest.raises(ConfigError):
        split_borders("ETTh1", 17420, input_size=-1)
    with pytest.raises(ConfigError):
        split_borders("ILI", 966, input_size=700)


def test_split_scaler_uses_train_rows_only(data_dir):
    df = ds.load("ETTh1", data_dir=data_dir)
    sp = split(df, "etth1", input_size=96)
    cols = ETT_COLS[1:]
    assert sp.name == "ETTh1" and len(sp.train) == 8640
    assert len(sp.val) == 2880 + 96 and len(sp.test) == 2880 + 96
    assert sp.val.index[0] == 8640 - 96 and sp.test.index[-1] == 14399
    train = df[cols].iloc[:8640].to_numpy()
    np.testing.assert_allclose(sp.scaler.mean, train.mean(0))
    np.testing.assert_allclose(sp.scaler.std, train.std(0))
    assert not np.allclose(sp.scaler.mean, df[cols].to_numpy().mean(0))
    arrays = sp.arrays()
    assert {k: v.shape for k, v in arrays.items()} == {
        "train": (8640, 7), "val": (2976, 7), "test": (2976, 7)}
    np.testing.assert_allclose(arrays["train"].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(arrays["train"].std(0), 1, atol=1e-5)
    scaled = sp.scaler.transform(sp.test)
    assert list(scaled.columns) == ETT_COLS and scaled["date"].equals(sp.test["date"])
    np.testing.assert_allclose(sp.scaler.inverse_transform(scaled)[cols], sp.test[cols], atol=1e-12)
    sklearn = pytest.importorskip("sklearn.preprocessing")
    ref = sklearn.StandardScaler().fit(train)
    np.testing.assert_allclose(sp.scaler.transform(df[cols].to_numpy()),
                               ref.transform(df[cols].to_numpy()), rtol=1e-10, atol=1e-10)


def test_scaler_constant_column():
    frame = pd.DataFrame({"date": pd.date_range("2020", periods=4, freq="h"),
                          "a": [1.0, 1.0, 1.0, 1.0], "b": [0.0, 1.0, 2.0, 3.0]})
    sc = Scaler.fit(frame)
    assert np.isfinite(sc.transform(frame)[["a", "b"]].to_numpy()).all()
