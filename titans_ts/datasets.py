"""Long-term forecasting (LTSF) benchmark files: find, download, validate and load them.

The datasets are described by the manifest ``datasets/ltsf.json`` (URL, checksums, shape).
:func:`load` looks for a dataset in this order and returns the first copy it finds:

1. the ``data_dir`` argument,
2. the directory named by the environment variable ``TITANS_DATA_DIR``,
3. the cache (``cache_dir`` argument, else ``TITANS_CACHE_DIR``, else ``~/.cache/titans``),
4. a download from the manifest URL into the cache (only when ``download=True``).

In each directory the file may sit directly (``ETTh1.csv``) or in its standard subfolder
(``ETT-small/ETTh1.csv``), plain or gzip-compressed (``.csv.gz``). Every copy is checked for the
expected columns and row count; with ``verify=True`` also for the checksum of its values
(``values_sha256``, see :func:`values_sha256`), which is independent of how the floats were
written. Downloads are checked against the sha256 of the file bytes where the manifest has one.
A copy that exists but fails a check raises :class:`DatasetError`; it is never silently skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from titans_memory.errors import DatasetError

__all__ = ["DatasetError", "dataset_info", "find_local", "load", "names", "values_sha256"]

MANIFEST_PATH = Path(__file__).resolve().parent / "ltsf.json"  # a link to datasets/ltsf.json in the repo
_DOWNLOAD_TIMEOUT_S = 120


@lru_cache(maxsize=1)
def _manifest() -> dict:
    """Returns the parsed manifest (``datasets/ltsf.json``)."""
    try:
        return json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the dataset manifest {MANIFEST_PATH}: {exc}") from exc


def names() -> list[str]:
    """Returns the canonical names of every dataset in the manifest."""
    return list(_manifest()["datasets"])


def dataset_info(name: str) -> dict:
    """Returns a copy of the manifest entry of ``name`` (case-insensitive, aliases allowed),
    with its canonical name under ``"name"``."""
    key = str(name).strip().lower()
    for canonical, entry in _manifest()["datasets"].items():
        if key == canonical.lower() or key in (a.lower() for a in entry.get("aliases", [])):
            return {"name": canonical, **entry}
    raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(names())}")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """Returns the cache directory: argument, else ``TITANS_CACHE_DIR``, else ``~/.cache/titans``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("TITANS_CACHE_DIR"):
        return Path(os.environ["TITANS_CACHE_DIR"]).expanduser()
    return Path.home() / ".cache" / "titans"


def find_local(name: str, directory: str | os.PathLike) -> Path | None:
    """Returns the path of the dataset's file in ``directory`` (directly or in its standard
    subfolder, ``.csv`` or ``.csv.gz``), or ``None`` if there is none."""
    info, root = dataset_info(name), Path(directory).expanduser()
    for folder in (root, root / info["subdir"]):
        for fname in (info["file"], info["file"] + ".gz"):
            if (folder / fname).is_file():
                return folder / fname
    return None


def values_sha256(frame: pd.DataFrame, columns: list[str] | None = None) -> str:
    """Returns the sha256 (hex) of the numeric values: the columns (default: all but ``date``) as
    a C-ordered, row-major little-endian float32 array. Rounding to float32 makes the checksum
    independent of how the floats were serialised (``41.13000106811523`` and
    ``41.130001068115234`` give the same bytes); NaNs are written as one canonical NaN."""
    columns = [c for c in frame.columns if c != "date"] if columns is None else columns
    values = np.ascontiguousarray(frame[columns].to_numpy(np.float64).astype("<f4"))
    values[np.isnan(values)] = np.float32("nan")
    return hashlib.sha256(values.tobytes()).hexdigest()


def _file_sha256(path: Path) -> str:
    """Returns the sha256 (hex) of the bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read(path: Path, info: dict, verify: bool, fix: str | None = None) -> pd.DataFrame:
    """Returns the validated frame of ``path``: ``date`` as datetime64, then the numeric columns
    in file order. Raises DatasetError when the file cannot be parsed or fails a check; ``fix``
    is the advice appended to the message."""
    fix = fix or (f"delete or replace {path} (a fresh copy is downloaded into the cache when "
                  "none is found), or point data_dir / TITANS_DATA_DIR at an intact copy")
    try:
        frame = pd.read_csv(path)
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{info['name']}: cannot parse {path} ({exc}); {fix}") from exc
    columns, n_rows = info.get("columns"), info["n_rows"]
    if columns is not None and list(frame.columns) != columns:
        missing = [c for c in columns if c not in frame.columns]
        extra = [c for c in frame.columns if c not in columns]
        raise DatasetError(f"{info['name']}: {path} has unexpected columns (missing {missing}, "
                           f"unexpected {extra}, or a different order); {fix}")
    if (frame.shape[1] != info["n_columns"] or frame.columns[0] != "date"
            or frame.columns[-1] != info.get("target", "OT")):
        raise DatasetError(f"{info['name']}: {path} has {frame.shape[1]} columns starting with "
                           f"{frame.columns[0]!r}, expected {info['n_columns']} from 'date' to "
                           f"{info.get('target', 'OT')!r}; {fix}")
    if len(frame) != n_rows:
        raise DatasetError(f"{info['name']}: {path} has {len(frame)} rows, expected {n_rows} "
                           f"(truncated or altered file?); {fix}")
    bad = [c for c in frame.columns[1:] if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise DatasetError(f"{info['name']}: non-numeric values in columns {bad} of {path}; {fix}")
    try:
        frame["date"] = pd.to_datetime(frame["date"])
    except (ValueError, TypeError):
        try:
            frame["date"] = pd.to_datetime(frame["date"], format="mixed")
        except (ValueError, TypeError) as exc:
            raise DatasetError(f"{info['name']}: bad timestamps in {path} ({exc}); {fix}") from exc
    expected = info.get("values_sha256")
    if verify and expected and values_sha256(frame) != expected:
        raise DatasetError(f"{info['name']}: the values in {path} differ from the reference "
                           f"(values_sha256 {values_sha256(frame)} != {expected}); {fix}")
    return frame


def _fetch(url: str, dest: Path) -> None:
    """Downloads ``url`` into the file ``dest`` (overwritten). Returns nothing."""
    request = urllib.request.Request(url, headers={"User-Agent": "titans-memory"})
    with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response, \
            open(dest, "wb") as out:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            out.write(chunk)


def _download(info: dict, cache: Path) -> tuple[Path, pd.DataFrame]:
    """Downloads the dataset into ``cache/<subdir>/<file>`` atomically: fetched into a temporary
    file, verified (sha256 of the bytes, then columns, rows and values), renamed. Returns the
    final path and the validated frame; on any failure no file is left behind and DatasetError
    is raised."""
    dest = cache / info["subdir"] / info["file"]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{info['file']}.", suffix=".part",
                                        dir=dest.parent)
    except OSError as exc:
        raise DatasetError(f"{info['name']}: cannot write to the cache folder {dest.parent} "
                           f"({exc}); pass cache_dir= or set TITANS_CACHE_DIR to a writable "
                           "folder") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    retry = ("nothing was written to the cache; retry, or place a verified copy in a folder "
             "named by data_dir / TITANS_DATA_DIR")
    try:
        try:
            _fetch(info["url"], tmp)
        except OSError as exc:  # URLError, HTTPError and timeouts are OSErrors
            raise DatasetError(f"{info['name']}: download of {info['url']} failed ({exc}); check "
                               f"the network; {retry}") from exc
        got, want = _file_sha256(tmp), info.get("sha256")
        if want and got != want:
            raise DatasetError(f"{info['name']}: the download of {info['url']} has sha256 {got}, "
                               f"expected {want} (changed upstream or corrupted in transfer); "
                               f"{retry}")
        frame = _read(tmp, info, verify=True, fix=f"the download of {info['url']} is not the "
                      f"expected file; {retry}")
        os.chmod(tmp, 0o644)  # mkstemp creates it 0600
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest, frame


def load(name: str, data_dir: str | os.PathLike | None = None,
         cache_dir: str | os.PathLike | None = None, download: bool = True,
         verify: bool = True) -> pd.DataFrame:
    """Returns the dataset as a DataFrame: a ``date`` column (datetime64) followed by the numeric
    columns in file order. See the module docstring for where it is looked for; raises
    DatasetError when it is unknown, not found (and ``download=False``), or fails validation."""
    info = dataset_info(name)
    searched = []
    for directory in (data_dir, os.environ.get("TITANS_DATA_DIR"), _cache_root(cache_dir)):
        if directory:
            searched.append(str(directory))
            path = find_local(info["name"], directory)
            if path is not None:
                return _read(path, info, verify)
    if not download:
        raise DatasetError(f"{info['name']}: {info['file']}(.gz) not found in {searched} (also "
                           f"looked in the subfolder {info['subdir']}/) and download=False; pass "
                           "download=True, or set data_dir / TITANS_DATA_DIR to a folder holding it")
    try:
        return _download(info, _cache_root(cache_dir))[1]
    except DatasetError as exc:
        raise DatasetError(f"{info['name']}: not found in {searched} (also looked in the subfolder "
                           f"{info['subdir']}/), so a download was tried: {exc}") from exc
