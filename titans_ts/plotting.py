"""Plot a forecast against its history with matplotlib."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from .errors import ColumnError, DataError

__all__ = ["plot_forecast"]


def _to_pandas(df: Any) -> pd.DataFrame:
    if isinstance(df, pd.DataFrame):
        return df
    if type(df).__module__.startswith("polars"):
        return pd.DataFrame({c: df[c].to_numpy() for c in df.columns})
    raise DataError(f"expected a pandas or polars DataFrame, got {type(df).__name__}")


def _long_history(history: pd.DataFrame, id_col: str, time_col: str, target_col: str) -> pd.DataFrame:
    """History as long ``id, time, target``; a wide frame (time column + one column per series) is melted."""
    if {id_col, time_col, target_col} <= set(history.columns):
        return history[[id_col, time_col, target_col]]
    tcol = time_col if time_col in history.columns else ("date" if "date" in history.columns else None)
    if tcol is None:
        raise ColumnError(f"history has neither long columns ({id_col}, {time_col}, {target_col}) nor a time column")
    value_cols = [c for c in history.columns if c != tcol]
    long = history.melt(id_vars=[tcol], value_vars=value_cols, var_name=id_col, value_name=target_col)
    return long.rename(columns={tcol: time_col})


def plot_forecast(
    history_df: Any,
    forecast_df: Any,
    unique_id: Any = None,
    model: Optional[str] = None,
    *,
    id_col: str = "unique_id",
    time_col: str = "ds",
    target_col: str = "y",
    last_n: Optional[int] = None,
    actual_df: Any = None,
    levels: Optional[Sequence[float]] = None,
    ax: Any = None,
    title: Optional[str] = None,
    figsize: tuple = (10, 3.5),
):
    """Plot the history, the forecast and its quantile bands for one series.

    Args:
        history_df: past values, long (``unique_id, ds, y``) or wide (time column + one column per
            series), pandas or polars.
        forecast_df: the output of :meth:`TitansForecaster.predict` (long; quantile columns
            ``<model>-lo-<l>`` / ``<model>-hi-<l>`` are drawn as bands).
        unique_id: the series to plot (default: the first series of ``forecast_df``).
        model: the forecast column (default: the first column after id and time that is not a
            quantile column, ``cutoff`` or ``y``).
        last_n: show only the last ``last_n`` history steps.
        actual_df: optional true future values (same layout as ``history_df``), drawn dashed.
        levels: bands to draw (default: every level present).
        ax: draw into this axes; else a new figure is made.
        title: plot title (default: the series id).
    Returns:
        the matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    fc = _to_pandas(forecast_df)
    hist = _long_history(_to_pandas(history_df), id_col, time_col, target_col)
    if id_col not in fc.columns or time_col not in fc.columns:
        raise ColumnError(f"forecast_df needs columns {id_col!r} and {time_col!r}, got {list(fc.columns)}")
    if unique_id is None:
        unique_id = fc[id_col].iloc[0]
    fc = fc[fc[id_col] == unique_id]
    if fc.empty:
        raise DataError(f"series {unique_id!r} is not in forecast_df")
    if model is None:
        skip = {id_col, time_col, "cutoff", target_col}
        cands = [c for c in fc.columns if c not in skip and "-lo-" not in c and "-hi-" not in c]
        if not cands:
            raise ColumnError("forecast_df has no forecast column")
        model = cands[0]
    h = hist[hist[id_col] == unique_id].sort_values(time_col)
    if last_n is not None:
        h = h.iloc[-last_n:]
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    ax.plot(h[time_col].to_numpy(), h[target_col].to_numpy(), color="0.25", lw=1.0, label="history")
    if actual_df is not None:
        act = _long_history(_to_pandas(actual_df), id_col, time_col, target_col)
        act = act[act[id_col] == unique_id].sort_values(time_col)
        ax.plot(act[time_col].to_numpy(), act[target_col].to_numpy(), color="0.25", lw=1.0, ls="--", label="actual")
    present = sorted({float(c.rsplit("-", 1)[1]) for c in fc.columns if c.startswith(f"{model}-lo-") and f"{model}-hi-" + c.rsplit("-", 1)[1] in fc.columns}, reverse=True)
    if levels is not None:
        present = [lv for lv in present if any(abs(lv - float(x)) < 1e-9 for x in levels)]
    t = fc[time_col].to_numpy()
    for k, lv in enumerate(present):
        tag = f"{lv:g}"
        lo, hi = fc[f"{model}-lo-{tag}"].to_numpy(), fc[f"{model}-hi-{tag}"].to_numpy()
        ax.fill_between(t, lo, hi, color="tab:blue", alpha=0.15 + 0.15 * k / max(1, len(present)), lw=0, label=f"{tag}% interval")
    ax.plot(t, fc[model].to_numpy(), color="tab:blue", lw=1.5, label=model)
    ax.set_title(str(unique_id) if title is None else title)
    ax.set_xlabel(time_col)
    ax.legend(loc="upper left", fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    if fig is not None:
        if np.issubdtype(np.asarray(t).dtype, np.datetime64):
            fig.autofmt_xdate()
        fig.tight_layout()
    return fig
