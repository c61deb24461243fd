"""Input frames -> a validated panel of series, and panels -> output frames.

Accepted inputs (pandas or polars):

- **long**: one row per (series, timestamp): ``unique_id``, ``ds``, ``y`` (names overridable) and
  optional exogenous covariate columns (every other column; they must be numeric).
- **wide**: a time column (``ds`` if present, else ``date``, else the first datetime column) and one
  numeric column per series, exactly as the ETT / Weather CSV files. With ``target_cols`` only those
  columns are forecast and the other numeric columns become covariates shared by every target.

``layout="auto"`` picks long when the id, time and target columns are all present, else wide.
Timestamps are datetimes (time-zone aware ones are handled in UTC and returned in their zone) or
integers (a step count, ``freq`` an integer step).

Validation (each error names the series and the problem; see :mod:`titans_ts.errors`):
missing timestamps, duplicate timestamps (:class:`DuplicateTimestampsError`), timestamps off the
frequency grid (:class:`IrregularTimestampsError`), an unknown / uninferable / inconsistent
frequency (:class:`FrequencyError`), non-numeric values (:class:`NonNumericError`) and missing
values (:class:`MissingValuesError`, or repaired according to ``nan_policy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset

from .errors import (
    ColumnError,
    DataError,
    DuplicateTimestampsError,
    FrequencyError,
    IrregularTimestampsError,
    MissingValuesError,
    NonNumericError,
)

__all__ = ["Panel", "read_panel", "make_frame", "frame_backend", "future_times", "NAN_POLICIES", "LAYOUTS"]

NAN_POLICIES = ("error", "interpolate", "mask")
LAYOUTS = ("auto", "long", "wide")
Freq = Union[str, int]


@dataclass
class Panel:
    """Validated series on a regular grid.

    Attributes:
        ids: series ids, in order.
        times: per series, sorted timestamps (``datetime64[ns]`` in UTC-naive form, or ``int64``).
        values: per series ``float64 [T_i, F]``: column 0 the target, then the covariates; missing
            values already repaired (``nan_policy`` "interpolate" / "mask").
        observed: per series ``bool [T_i]``, False where the target was missing
            (``nan_policy="mask"``), else None.
        freq: pandas offset alias (e.g. ``"h"``, ``"15min"``) or an integer step.
        exog: names of the covariate channels.
        layout: ``"long"`` or ``"wide"`` (how the frame was given).
        backend: ``"pandas"`` or ``"polars"``.
        tz: time zone of the input timestamps, or None.
    """

    ids: List[Any]
    times: List[np.ndarray]
    values: List[np.ndarray]
    observed: Optional[List[np.ndarray]]
    freq: Freq
    exog: List[str] = field(default_factory=list)
    layout: str = "long"
    backend: str = "pandas"
    tz: Optional[str] = None

    @property
    def n_series(self) -> int:
        return len(self.ids)

    @property
    def n_features(self) -> int:
        return 1 + len(self.exog)

    @property
    def lengths(self) -> List[int]:
        return [len(t) for t in self.times]

    @property
    def is_int_time(self) -> bool:
        return isinstance(self.freq, (int, np.integer))

    @property
    def aligned(self) -> bool:
        """True when every series has exactly the same timestamps."""
        first = self.times[0]
        return all(len(t) == len(first) and np.array_equal(t, first) for t in self.times[1:])

    def head(self, n: Sequence[int]) -> "Panel":
        """The first ``n[i]`` steps of each series."""
        return replace(
            self,
            times=[t[:k] for t, k in zip(self.times, n)],
            values=[v[:k] for v, k in zip(self.values, n)],
            observed=None if self.observed is None else [o[:k] for o, k in zip(self.observed, n)],
        )

    def select(self, ids: Sequence[Any]) -> "Panel":
        """The series ``ids`` (in that order)."""
        pos = {k: i for i, k in enumerate(self.ids)}
        idx = [pos[k] for k in ids]
        return replace(
            self, ids=[self.ids[i] for i in idx], times=[self.times[i] for i in idx],
            values=[self.values[i] for i in idx],
            observed=None if self.observed is None else [self.observed[i] for i in idx],
        )


# ------------------------------------------------------------------------------------------------
# frames
def frame_backend(df: Any) -> str:
    """``"pandas"`` or ``"polars"``; raises DataError for anything else."""
    if isinstance(df, pd.DataFrame):
        return "pandas"
    mod = type(df).__module__
    if mod.startswith("polars") and type(df).__name__ == "DataFrame":
        return "polars"
    if mod.startswith("polars") and type(df).__name__ == "LazyFrame":
        raise DataError("got a polars LazyFrame; call .collect() first")
    raise DataError(f"expected a pandas or polars DataFrame, got {type(df).__name__}")


def _columns(df: Any, backend: str) -> Dict[str, np.ndarray | pd.Series]:
    """Column name -> pandas Series (pandas) / numpy array (polars). No pyarrow needed."""
    if backend == "pandas":
        return {c: df[c] for c in df.columns}
    import polars as pl

    out = {}
    for c in df.columns:
        s = df[c]
        if isinstance(s.dtype, pl.Datetime) or s.dtype == pl.Date:
            tz = getattr(s.dtype, "time_zone", None)
            if tz:
                s = s.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
            ser = pd.Series(pd.to_datetime(s.to_numpy()))
            out[c] = ser.dt.tz_localize("UTC").dt.tz_convert(tz) if tz else ser
        else:
            out[c] = pd.Series(s.to_numpy())
    return out


def make_frame(columns: Dict[str, Any], backend: str):
    """A pandas or polars DataFrame from column name -> array-like."""
    frame = pd.DataFrame({k: (v.reset_index(drop=True) if isinstance(v, pd.Series) else v) for k, v in columns.items()})
    if backend == "pandas":
        return frame
    import polars as pl

    data = {}
    for k in frame.columns:
        col = frame[k]
        if isinstance(col.dtype, pd.DatetimeTZDtype):
            naive = pl.Series(k, col.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy())
            data[k] = naive.dt.replace_time_zone("UTC").dt.convert_time_zone(str(col.dt.tz))
        elif col.dtype == object:
            data[k] = pl.Series(k, col.tolist())
        else:
            data[k] = pl.Series(k, col.to_numpy())
    return pl.DataFrame(data)


# ------------------------------------------------------------------------------------------------
# timestamps and frequency
def _is_datetime(s: pd.Series) -> bool:
    return pd.api.types.is_datetime64_any_dtype(s)


def _time_values(s: pd.Series, name: str) -> tuple[np.ndarray, Optional[str]]:
    """Timestamps as ``datetime64[ns]`` (UTC-naive) or ``int64``, and the time zone."""
    if pd.api.types.is_integer_dtype(s):
        return s.to_numpy(np.int64), None
    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_float_dtype(s):
        if pd.api.types.is_float_dtype(s) and s.notna().all() and np.all(np.mod(s.to_numpy(), 1) == 0):
            return s.to_numpy().astype(np.int64), None
        raise DataError(f"time column {name!r} must hold datetimes or integers, got {s.dtype}")
    if not _is_datetime(s):
        try:
            s = pd.to_datetime(s)
        except (ValueError, TypeError) as exc:
            try:
                s = pd.to_datetime(s, format="mixed")
            except (ValueError, TypeError):
                raise DataError(f"time column {name!r} cannot be parsed as datetimes ({exc})") from exc
    tz = None
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        tz = str(s.dt.tz)
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    return s.to_numpy("datetime64[ns]"), tz


def _fmt_time(t: Any) -> str:
    if isinstance(t, np.datetime64):
        return str(pd.Timestamp(t))
    return str(t)


def parse_freq(freq: Any, int_time: bool) -> Freq:
    """Normalise a user frequency: an offset alias for datetimes, a positive int for integers."""
    if int_time:
        if isinstance(freq, (int, np.integer)) and not isinstance(freq, bool) and freq > 0:
            return int(freq)
        raise FrequencyError(f"integer timestamps need an integer freq (the step, e.g. freq=1), got {freq!r}")
    if isinstance(freq, (int, np.integer)):
        raise FrequencyError(f"datetime timestamps need a pandas offset alias as freq (e.g. 'h', '15min', 'D'), got {freq!r}")
    try:
        return to_offset(freq).freqstr
    except (ValueError, TypeError) as exc:
        raise FrequencyError(f"unknown frequency {freq!r}: not a pandas offset alias such as 'h', '15min', 'D', 'MS' ({exc})") from exc


def future_times(last: Any, freq: Freq, n: int) -> np.ndarray:
    """The ``n`` timestamps after ``last`` on the grid of ``freq``."""
    if isinstance(freq, (int, np.integer)):
        return int(last) + int(freq) * np.arange(1, n + 1, dtype=np.int64)
    return pd.date_range(pd.Timestamp(last), periods=n + 1, freq=to_offset(freq)).to_numpy("datetime64[ns]")[1:]


def _grid(start: Any, n: int, freq: Freq) -> np.ndarray:
    if isinstance(freq, (int, np.integer)):
        return int(start) + int(freq) * np.arange(n, dtype=np.int64)
    return pd.date_range(pd.Timestamp(start), periods=n, freq=to_offset(freq)).to_numpy("datetime64[ns]")


def _check_grid(sid: Any, t: np.ndarray, freq: Freq, time_col: str) -> None:
    expected = _grid(t[0], len(t), freq)
    if np.array_equal(expected, t):
        return
    bad = int(np.argmax(expected != t))
    if bad == 0:
        raise IrregularTimestampsError(
            f"series {sid!r}: first timestamp {_fmt_time(t[0])} is not on the grid of frequency {freq!r}; "
            f"pass the right freq= or shift the timestamps onto the grid"
        )
    raise IrregularTimestampsError(
        f"series {sid!r}: timestamp {_fmt_time(t[bad])} follows {_fmt_time(t[bad - 1])}, expected "
        f"{_fmt_time(expected[bad])} at frequency {freq!r} (a gap or an irregular step, {len(t)} timestamps); "
        f"repair: put the series on a regular grid and fill the new rows, e.g. "
        f"df.set_index({time_col!r}).asfreq({freq!r}) then interpolate (or keep the NaNs with "
        f"nan_policy='interpolate'/'mask'), or pass the intended freq="
    )


def _infer_freq(ids: List[Any], times: List[np.ndarray], int_time: bool) -> Freq:
    """The common frequency of the series, or raise FrequencyError / IrregularTimestampsError."""
    if int_time:
        diffs = np.concatenate([np.diff(t) for t in times]) if times else np.array([])
        if diffs.size == 0:
            raise FrequencyError(f"cannot infer the step of series {ids[0]!r}: fewer than 2 timestamps; pass freq=")
        vals, counts = np.unique(diffs, return_counts=True)
        step = int(vals[np.argmax(counts)])
        if counts.max() < 0.5 * diffs.size:
            raise FrequencyError(f"cannot infer the step of the integer timestamps (no step dominates: "
                                 f"{dict(zip(vals[:5].tolist(), counts[:5].tolist()))}); pass freq=")
        return step
    found: Dict[str, Any] = {}
    for sid, t in zip(ids, times):
        if len(t) >= 3:
            try:
                f = pd.infer_freq(pd.DatetimeIndex(t))
            except (TypeError, ValueError):
                f = None
            if f is not None:
                found.setdefault(to_offset(f).freqstr, sid)
    if len(found) > 1:
        (f1, s1), (f2, s2) = list(found.items())[:2]
        raise FrequencyError(
            f"series have different frequencies: {s1!r} is {f1!r}, {s2!r} is {f2!r}; fit one model "
            f"per frequency, or resample to a common one"
        )
    if found:
        return next(iter(found))
    # no series has a clean grid: take the dominant step, if there is one, and let the grid check
    # name the irregular timestamps
    diffs = np.concatenate([np.diff(t).astype("timedelta64[ns]").astype(np.int64) for t in times])
    if diffs.size == 0:
        raise FrequencyError(f"cannot infer the frequency of series {ids[0]!r}: fewer than 2 timestamps; pass freq=")
    vals, counts = np.unique(diffs, return_counts=True)
    if counts.max() < 0.5 * diffs.size:
        raise FrequencyError(
            f"cannot infer the frequency: the timestamps of series {ids[0]!r} have no dominant step "
            f"(irregular or calendar-based spacing); pass freq= (e.g. 'MS', 'W-SUN', 'h')"
        )
    return to_offset(pd.Timedelta(int(vals[np.argmax(counts)]), unit="ns")).freqstr


# ------------------------------------------------------------------------------------------------
# values
def _numeric(col: pd.Series, column: str, ids: Optional[np.ndarray], what: str) -> np.ndarray:
    """Column as float64 (NaN for missing); NonNumericError naming the series for anything else."""
    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
        if pd.api.types.is_complex_dtype(col):
            raise NonNumericError(f"{what} column {column!r} holds complex numbers")
        return col.to_numpy(np.float64, na_value=np.nan) if col.dtype != bool else col.to_numpy().astype(np.float64)
    if _is_datetime(col) or pd.api.types.is_timedelta64_dtype(col):
        raise NonNumericError(f"{what} column {column!r} holds {col.dtype} values, not numbers; drop it or convert it")
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna().to_numpy() & col.notna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        where = f"series {ids[i]!r}: " if ids is not None else f"series {column!r}: "
        raise NonNumericError(
            f"{where}{what} column {column!r} holds non-numeric values such as {col.iloc[i]!r} "
            f"({int(bad.sum())} in all); convert them to numbers (pd.to_numeric) or drop the column"
        )
    return num.to_numpy(np.float64, na_value=np.nan)


def _fill(sid: Any, v: np.ndarray, names: List[str]) -> np.ndarray:
    """Linear interpolation over position, constant extrapolation at the ends, per channel."""
    out = v.copy()
    pos = np.arange(len(v))
    for j in range(v.shape[1]):
        ok = np.isfinite(v[:, j])
        if not ok.any():
            raise MissingValuesError(f"series {sid!r}: every value of column {names[j]!r} is missing; drop the series or the column")
        if not ok.all():
            out[:, j] = np.interp(pos, pos[ok], v[ok, j])
    return out


def _apply_nan_policy(ids, times, values, names, nan_policy: str, target_col: str, id_col: str):
    observed = [] if nan_policy == "mask" else None
    out = []
    for sid, t, v in zip(ids, times, values):
        if np.isinf(v).any():
            j = int(np.argmax(np.isinf(v).any(axis=0)))
            raise NonNumericError(f"series {sid!r}: column {names[j]!r} holds infinite values; replace them (e.g. by NaN and a nan_policy)")
        miss = np.isnan(v)
        if miss.any():
            if nan_policy == "error":
                j = int(np.argmax(miss.any(axis=0)))
                first = int(np.argmax(miss[:, j]))
                col = names[j]
                raise MissingValuesError(
                    f"series {sid!r}: {int(miss[:, j].sum())} missing value(s) in column {col!r} "
                    f"(first at {_fmt_time(t[first])}); repair: fill them, e.g. "
                    f"df[{col!r}] = df.groupby({id_col!r})[{col!r}].transform(lambda s: s.interpolate(limit_direction='both')), "
                    f"or pass nan_policy='interpolate' (linear in time) or nan_policy='mask' "
                    f"(missing targets left out of the loss, inputs interpolated)"
                )
            v = _fill(sid, v, names)
        if observed is not None:
            observed.append(~miss[:, 0])
        out.append(v)
    return out, observed


# ------------------------------------------------------------------------------------------------
def detect_layout(cols: Sequence[str], layout: str, id_col: str, time_col: str, target_col: str) -> str:
    if layout not in LAYOUTS:
        raise ColumnError(f"format must be one of {LAYOUTS}, got {layout!r}")
    if layout != "auto":
        return layout
    have = set(cols)
    if {id_col, time_col, target_col} <= have:
        return "long"
    if id_col in have:
        missing = [c for c in (time_col, target_col) if c not in have]
        raise ColumnError(
            f"the frame has an id column {id_col!r} but no {missing} column(s); pass time_col= / "
            f"target_col= naming them (long format), or format='wide'"
        )
    return "wide"


def read_panel(
    df: Any,
    *,
    layout: str = "auto",
    id_col: str = "unique_id",
    time_col: str = "ds",
    target_col: str = "y",
    target_cols: Optional[Sequence[str]] = None,
    freq: Any = None,
    nan_policy: str = "error",
) -> Panel:
    """Validate ``df`` and return a :class:`Panel` (see the module docstring)."""
    if nan_policy not in NAN_POLICIES:
        from .errors import ConfigError

        raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    backend = frame_backend(df)
    if len(df) == 0:
        raise DataError("the frame is empty")
    cols = _columns(df, backend)
    layout = detect_layout(list(cols), layout, id_col, time_col, target_col)
    if layout == "long":
        ids, times, values, exog, tz = _read_long(cols, id_col, time_col, target_col)
    else:
        ids, times, values, exog, tz = _read_wide(cols, time_col, target_cols)
    int_time = times[0].dtype.kind in "iu"
    for sid, t in zip(ids, times):
        if t.dtype.kind == "M" and np.isnat(t).any():
            raise DataError(f"series {sid!r}: {int(np.isnat(t).sum())} missing timestamp(s) in column {time_col!r}; drop or fill those rows")
        if len(t) > 1:
            same = t[1:] == t[:-1]
            if same.any():
                dup = np.unique(t[1:][same])
                shown = ", ".join(_fmt_time(x) for x in dup[:3])
                raise DuplicateTimestampsError(
                    f"series {sid!r}: {len(dup)} duplicated timestamp(s) ({shown}{', ...' if len(dup) > 3 else ''}); "
                    f"repair: keep one row per timestamp, e.g. df.drop_duplicates(subset=[{id_col!r}, {time_col!r}]) "
                    f"or aggregate with df.groupby([{id_col!r}, {time_col!r}]).mean()"
                )
    f = parse_freq(freq, int_time) if freq is not None else _infer_freq(ids, times, int_time)
    for sid, t in zip(ids, times):
        _check_grid(sid, t, f, time_col)
    names = [target_col if layout == "long" else "value"] + exog
    values, observed = _apply_nan_policy(ids, times, values, names, nan_policy, target_col, id_col if layout == "long" else "series")
    return Panel(ids, times, values, observed, f, exog, layout, backend, tz)


def _read_long(cols, id_col, time_col, target_col):
    idv = cols[id_col]
    if idv.isna().any():
        raise DataError(f"{int(idv.isna().sum())} row(s) have a missing series id in column {id_col!r}; drop or fill them")
    t_all, tz = _time_values(cols[time_col], time_col)
    exog = [c for c in cols if c not in (id_col, time_col, target_col)]
    id_arr = idv.to_numpy()
    y = _numeric(cols[target_col], target_col, id_arr, "target")
    xs = [_numeric(cols[c], c, id_arr, "covariate") for c in exog]
    vals = np.column_stack([y] + xs) if xs else y[:, None]
    try:
        codes, uniques = pd.factorize(idv, sort=True)
    except TypeError:
        codes, uniques = pd.factorize(idv, sort=False)
    if t_all.dtype.kind == "M":
        order = np.lexsort((t_all.view(np.int64), codes))
    else:
        order = np.lexsort((t_all, codes))
    codes, t_all, vals = codes[order], t_all[order], vals[order]
    bounds = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(codes)]])
    ids = [_py(uniques[codes[a]]) for a in starts]
    times = [t_all[a:b] for a, b in zip(starts, stops)]
    values = [vals[a:b] for a, b in zip(starts, stops)]
    return ids, times, values, exog, tz


def _py(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


def _read_wide(cols, time_col, target_cols):
    tcol = None
    if time_col in cols:
        tcol = time_col
    elif "date" in cols:
        tcol = "date"
    else:
        for c, s in cols.items():
            if _is_datetime(s):
                tcol = c
                break
    if tcol is None:
        raise ColumnError(
            f"cannot recognise the frame: no long-format columns (unique_id, ds, y) and no time column "
            f"({time_col!r}, 'date' or a datetime column) for the wide format; got columns {list(cols)[:8]}"
        )
    t, tz = _time_values(cols[tcol], tcol)
    others = [c for c in cols if c != tcol]
    if target_cols is None:
        targets, exog = others, []
    else:
        targets = list(target_cols)
        missing = [c for c in targets if c not in cols]
        if missing:
            raise ColumnError(f"target_cols {missing} are not columns of the frame")
        exog = [c for c in others if c not in targets]
    if not targets:
        raise ColumnError(f"the wide frame has a time column {tcol!r} but no series columns")
    tv = {c: _numeric(cols[c], c, None, "series") for c in targets}
    xv = [_numeric(cols[c], c, np.array([c] * len(cols[c]), dtype=object), "covariate") for c in exog]
    order = np.argsort(t, kind="stable")
    t = t[order]
    values = []
    for c in targets:
        v = np.column_stack([tv[c]] + xv) if xv else tv[c][:, None]
        values.append(v[order])
    return list(targets), [t] * len(targets), values, exog, tz
