"""DNA classification datasets: GUE (DNABERT-2), FASTA-per-class tasks, coordinate (BED-like) tasks.

Data location for :func:`load_gue` and :func:`load_oct4_mafk`: ``data_dir=``, else
``$TITANS_DATA_DIR``; then the download cache (``cache_dir=``, else ``$TITANS_CACHE_DIR``, else
``~/.cache/titans_memory``). GUE files are looked up as ``<root>/GUE/<task>/<split>.csv[.gz]``
or ``<root>/<task>/<split>.csv[.gz]``. Sources and checksums are in the manifest
``datasets/gue.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from titans_genomics.fasta import FastaGenome, bed_rows, default_cache_dir, read_fasta
from titans_memory.errors import DataError, DatasetError

_SPLIT_ALIASES = {"val": "dev", "valid": "dev", "validation": "dev", "eval": "dev"}
# Oct4 (sample*.fa) vs MafK (sample2*.fa) ChIP-seq peaks, 200 bp, from the janggu package.
_JANGGU = "https://raw.githubusercontent.com/BIMSBbioinfo/janggu/cfee10656b0bab2ef755f3282e56d7f8987410f4/src/janggu/resources/"
OCT4_MAFK_FILES = {
    "sample.fa": "effef1417ad2ca12514d5a4fe72741aaada7b29c16553655c4ed84ad83640e82",
    "sample2.fa": "0228f9e016bd91c642526136270b4efef75dc2916f906d47785fbe11c0fb94f8",
    "sample_test.fa": "8972da4ec4dd2de58f52da113eb2d5c79d1584fb2662aa3a43349e78b0b23724",
    "sample2_test.fa": "014cdfc16a3b57fc98f4bf8a7885dbbdf8f9e4a6b03a381365a8ddb415f27f5f",
}


# ---------------------------------------------------------------------------- manifest / paths
@lru_cache(maxsize=1)
def gue_manifest() -> dict:
    """The GUE manifest (``datasets/gue.json``; a copy inside the package takes precedence)."""
    here = Path(__file__).resolve().parent
    for p in (here / "gue.json", here.parent / "datasets" / "gue.json"):
        if p.is_file():
            return json.loads(p.read_text())
    raise DatasetError("GUE manifest gue.json not found (looked in titans_genomics/ and datasets/)")


def gue_tasks() -> list[str]:
    """All GUE task names, e.g. ``'prom/prom_core_tata'``, ``'tf/0'``."""
    return list(gue_manifest()["tasks"])


def _resolve_task(task: str) -> str:
    tasks = gue_tasks()
    t = task.strip().strip("/")
    if t in tasks:
        return t
    aliases: dict[str, list[str]] = {}
    for full in tasks:
        group, name = full.split("/")
        for a in (name, f"{group}_{name}", f"{group}{name}", full.lower()):
            aliases.setdefault(a.lower(), []).append(full)
    hit = aliases.get(t.lower().replace("human_", ""), [])
    if len(hit) == 1:
        return hit[0]
    raise DatasetError(f"unknown GUE task {task!r}" + (f" (ambiguous: {hit})" if hit else "")
                       + f"; known: {', '.join(tasks)}")


def _roots(data_dir) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    env = os.environ.get("TITANS_DATA_DIR")
    return [Path(env)] if env else []


def _find(roots: list[Path], rel: str, names: list[str]) -> Path | None:
    for root in roots:
        for base in (root / "GUE" / rel, root / rel):
            for n in names:
                if (base / n).is_file():
                    return base / n
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically; check sha256 when given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".dl-")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        if sha256 and _sha256(Path(tmp)) != sha256:
            raise DatasetError(f"checksum mismatch for {url} (expected sha256 {sha256})")
        os.replace(tmp, dest)
    except DatasetError:
        raise
    except OSError as e:
        raise DatasetError(f"download of {url} failed: {e}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------- GUE
def _download_gue(task: str, split: str, cache: Path) -> Path:
    man = gue_manifest()
    entry = man["tasks"][task]["files"][split]
    dest = cache / "GUE" / task / f"{split}.csv"
    errors = []
    if entry.get("mirror"):
        try:
            return _fetch(f"{man['mirror']['base_url']}{task}/{split}.csv", dest, entry.get("sha256"))
        except DatasetError as e:
            errors.append(str(e))
    archive = cache / "GUE.zip"
    try:
        if not (archive.exists() and zipfile.is_zipfile(archive)):
            _fetch(man["archive"]["download_url"], archive, man["archive"].get("sha256"))
        if not zipfile.is_zipfile(archive):
            archive.unlink()
            raise DatasetError("the archive download did not return a zip file (Google Drive may "
                               "have served a confirmation page)")
        with zipfile.ZipFile(archive) as z:
            member = next((m for m in z.namelist() if m.endswith(f"GUE/{task}/{split}.csv")), None)
            if member is None:
                raise DatasetError(f"GUE/{task}/{split}.csv not in {archive}")
            data = z.read(member)
        if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DatasetError(f"checksum mismatch for {member} in {archive}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return dest
    except (DatasetError, OSError, zipfile.BadZipFile) as e:
        errors.append(str(e))
    raise DatasetError(
        f"could not download GUE {task}/{split}: {'; '.join(errors)}. Download the archive by hand "
        f"from {man['archive']['url']}, unzip it so that <dir>/GUE/{task}/{split}.csv exists, and "
        "pass data_dir=<dir> or set TITANS_DATA_DIR")


def _verify_gue(df: pd.DataFrame, path: Path, task: str, split: str) -> None:
    info = gue_manifest()["tasks"][task]
    if list(df.columns) != ["sequence", "label"]:
        raise DatasetError(f"{path}: columns {list(df.columns)}, expected ['sequence', 'label']")
    n = info["files"][split].get("n_rows")
    if n is not None and len(df) != n:
        raise DatasetError(f"{path}: {len(df)} rows, expected {n} for GUE {task}/{split}")
    if df.isna().any().any():
        raise DatasetError(f"{path}: missing values")
    labels = set(np.unique(df["label"]).tolist())
    if not labels <= set(range(info["num_labels"])):
        raise DatasetError(f"{path}: labels {sorted(labels)} outside 0..{info['num_labels'] - 1}")


def load_gue(task: str, split: str = "train", data_dir=None, cache_dir=None,
             download: bool = True) -> pd.DataFrame:
    """One split of a GUE task.

    Args:
        task: e.g. ``'prom/prom_core_tata'`` (or ``'prom_core_tata'``), ``'tf/0'`` (or ``'tf_0'``);
            see :func:`gue_tasks`.
        split: ``'train'``, ``'dev'`` (alias ``'val'``) or ``'test'``.
        data_dir: root holding ``GUE/<task>/<split>.csv[.gz]``; default ``$TITANS_DATA_DIR``.
        cache_dir: download cache (also searched).
        download: fetch missing files (per-file mirror, else the GUE archive).

    Returns:
        ``pandas.DataFrame`` with columns ``sequence`` (str) and ``label`` (int64), ``[N, 2]``;
        checked against the manifest (columns, row count, label range).
    """
    task = _resolve_task(task)
    split = _SPLIT_ALIASES.get(split, split)
    if split not in ("train", "dev", "test"):
        raise DatasetError(f"split must be train/dev/test, got {split!r}")
    cache = default_cache_dir(cache_dir)
    names = [f"{split}.csv.gz", f"{split}.csv"]
    path = _find(_roots(data_dir) + [cache], task, names)
    if path is None:
        if not download:
            raise DatasetError(f"GUE {task}/{split} not found under {_roots(data_dir) + [cache]} "
                               "and download=False")
        path = _download_gue(task, split, cache)
    try:
        df = pd.read_csv(path, dtype={"sequence": str})
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    _verify_gue(df, path, task, split)
    df["label"] = df["label"].astype(np.int64)
    return df


# ---------------------------------------------------------------------------- FASTA tasks
def load_fasta_classes(class_files: Mapping, cache_dir=None, validate: bool = True) -> pd.DataFrame:
    """One FASTA file per class, e.g. ``{1: 'oct4.fa', 0: 'mafk.fa'}``.

    Returns ``pandas.DataFrame[sequence, label, record_id]`` (rows in mapping then file order).
    """
    rows = []
    for label, path in class_files.items():
        rows += [(seq, label, name) for name, seq in read_fasta(path, cache_dir, validate)]
    df = pd.DataFrame(rows, columns=["sequence", "label", "record_id"])
    if all(isinstance(k, (int, np.integer)) for k in class_files):
        df["label"] = df["label"].astype(np.int64)
    return df


def load_oct4_mafk(split: str = "train", data_dir=None, cache_dir=None,
                   download: bool = True) -> pd.DataFrame:
    """Oct4 (label 1, ``fasta/sample*.fa``) vs MafK (label 0, ``fasta/sample2*.fa``) ChIP-seq
    peaks, 200 bp (janggu resources). ``split``: ``'train'`` (3897 + 3900) or ``'test'`` (100 + 100).

    Returns ``pandas.DataFrame[sequence, label, record_id]``.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    suffix = "" if split == "train" else "_test"
    cache = default_cache_dir(cache_dir) / "janggu"
    paths = {}
    for label, stem in ((1, "sample"), (0, "sample2")):
        name = f"{stem}{suffix}.fa"
        found = next((r / sub / name for r in _roots(data_dir) for sub in ("fasta", ".")
                      if (r / sub / name).is_file()), None)
        if found is None and (cache / name).is_file():
            found = cache / name
        if found is None:
            if not download:
                raise DatasetError(f"{name} not found under {_roots(data_dir)} and download=False")
            found = _fetch(_JANGGU + name, cache / name, OCT4_MAFK_FILES[name])
        paths[label] = found
    return load_fasta_classes(paths, cache_dir=cache_dir)


# ---------------------------------------------------------------------------- coordinate tasks
def read_genomic_benchmarks_intervals(dataset_dir, split: str = "train") -> pd.DataFrame:
    """Read a Genomic Benchmarks interval-list dataset: ``<dataset_dir>/<split>/<class>.csv[.gz]``
    with columns ``id, region, start, end, strand`` (0-based half-open, as the package slices).

    Returns ``pandas.DataFrame[id, chrom, start, end, strand, label, class_name]``; ``label`` is
    the index of ``class_name`` among the sorted class names.
    """
    folder = Path(dataset_dir) / split
    files = sorted(p for p in folder.glob("*.csv*") if p.name.endswith((".csv", ".csv.gz")))
    if not files:
        raise DatasetError(f"no <class>.csv[.gz] files in {folder}")
    classes = sorted({p.name.split(".csv")[0] for p in files})
    frames = []
    for p in files:
        df = pd.read_csv(p)
        missing = {"region", "start", "end"} - set(df.columns)
        if missing:
            raise DatasetError(f"{p}: missing columns {sorted(missing)}")
        cls = p.name.split(".csv")[0]
        frames.append(df.rename(columns={"region": "chrom"}).assign(
            label=classes.index(cls), class_name=cls))
    return pd.concat(frames, ignore_index=True)


def load_coordinate_dataset(coords, genome_fasta, label_col: str = "label",
                            cache_dir=None) -> pd.DataFrame:
    """Sequences for a labelled interval table, fetched through :class:`FastaGenome`.

    Args:
        coords: pandas/polars DataFrame or a CSV/TSV path with columns chrom (or region/chr),
            start, end (0-based half-open), optional strand, and ``label_col``.
        genome_fasta: FASTA path or an open :class:`FastaGenome`.

    Returns:
        ``pandas.DataFrame[sequence, label, chrom, start, end, strand]`` (minus-strand rows are
        reverse-complemented).
    """
    if isinstance(coords, (str, os.PathLike)):
        p = Path(coords)
        sep = "\t" if p.name.endswith((".tsv", ".tsv.gz", ".bed", ".bed.gz")) else ","
        coords = pd.read_csv(p, sep=sep)
    if label_col not in list(coords.columns):
        raise DataError(f"coordinate table has no label column {label_col!r} "
                        f"(columns: {list(coords.columns)})")
    genome = genome_fasta if isinstance(genome_fasta, FastaGenome) else FastaGenome(
        genome_fasta, cache_dir=cache_dir)
    rows = bed_rows(coords)
    out = pd.DataFrame(rows, columns=["chrom", "start", "end", "strand"])
    out.insert(0, "sequence", [genome.fetch(*r) for r in rows])
    out.insert(1, "label", list(coords[label_col]))
    return out


__all__ = ["gue_manifest", "gue_tasks", "load_gue", "load_fasta_classes", "load_oct4_mafk",
           "read_genomic_benchmarks_intervals", "load_coordinate_dataset", "OCT4_MAFK_FILES"]
