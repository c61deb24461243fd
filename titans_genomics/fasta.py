"""FASTA reading and indexed random access (through pyfaidx and a samtools-compatible ``.fai``).

Index location: a fresh ``<fasta>.fai`` next to the file is used when present; otherwise the
index is built in the cache (``<cache>/fai/<hash>/<name>.fai``), so read-only data directories
work and data directories are never written to. The cache is ``cache_dir=``, else
``$TITANS_CACHE_DIR``, else ``~/.cache/titans_memory``.

Compressed input: any gzip FASTA (plain gzip or bgzip) is decompressed once into
``<cache>/fasta/<hash>/`` (keyed on path, size and mtime) and the copy is indexed; no
Biopython is needed.

Worker safety: a :class:`FastaGenome` opens its pyfaidx handle lazily per process (it stores the
pid and reopens after a fork) and drops the handle when pickled, so each DataLoader worker gets
its own file handle.
"""

from __future__ import annotations

import gzip
import hashlib
import operator
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import pyfaidx

from titans_genomics.tokenizer import reverse_complement
from titans_memory.errors import DataError, DatasetError

_INVALID = re.compile(r"[^ACGTNRYSWKMBDHVacgtnryswkmbdhv]")
_CHROM_COLS = ("chrom", "chr", "chromosome", "region", "seqname", "contig")
_START_COLS, _END_COLS = ("start", "chromStart"), ("end", "chromEnd")


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$TITANS_CACHE_DIR``, else ``~/.cache/titans_memory``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("TITANS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "titans_memory"


def _key(path: Path, with_stat: bool) -> str:
    text = str(path.resolve())
    if with_stat:
        st = path.stat()
        text += f"|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _decompress(path: Path, cache: Path) -> Path:
    name = re.sub(r"\.b?gz$", "", path.name)
    if name == path.name or name.endswith((".gz", ".bgz")):
        name += ".fa"  # pyfaidx must not see a .gz name (it would expect BGZF + Biopython)
    out = cache / "fasta" / _key(path, True) / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-")
    try:
        with gzip.open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, out)
    except (OSError, EOFError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"{path}: cannot decompress gzip FASTA ({e})") from e
    return out


def _header_lines(path: Path, name: str) -> list[int]:
    """1-based line numbers of the header lines whose first word is ``name``."""
    hits = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.startswith(b">") and line[1:].split(maxsplit=1)[:1] == [name.encode()]:
                hits.append(i)
    return hits


def _explain_bad_line(path: Path, record: str, lineno: int) -> str:
    """Turn pyfaidx's 'inconsistent line' report into: is it a blank line inside the record?"""
    lines, in_rec = [], False
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.startswith(b">"):
                if in_rec:
                    break
                in_rec = line[1:].split(maxsplit=1)[:1] == [record.encode()]
            elif in_rec:
                lines.append((i, line.strip()))
    while lines and not lines[-1][1]:
        lines.pop()  # blank lines at the end of a record are fine
    blank = next((i for i, s in lines if not s), None)
    if blank is not None:
        return f"blank line {blank} inside record {record!r}"
    return (f"line {lineno} of record {record!r} has a different length than the record's other "
            "sequence lines (only the last line of a record may be shorter)")


class FastaGenome:
    """Indexed random access to a (multi-)FASTA file.

    Args:
        path: FASTA file (plain, or gzip/bgzip-compressed: see the module docstring).
        cache_dir: where decompressed copies and ``.fai`` indexes go.
        validate: check fetched sequences for non-DNA characters (allowed: ACGTN, IUPAC codes,
            any case); a violation raises :class:`DataError` naming record and position.

    Raises:
        DatasetError: missing file. DataError: empty file, duplicate record names, blank lines
        inside a record, malformed headers, non-DNA letters (on fetch).
    """

    def __init__(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 validate: bool = True):
        self.path, self.validate = Path(path), validate
        if not self.path.is_file():
            raise DatasetError(f"FASTA file not found: {self.path}")
        if self.path.stat().st_size == 0:
            raise DataError(f"FASTA file is empty: {self.path}")
        cache = default_cache_dir(cache_dir)
        with open(self.path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        if not gz and self.path.name.endswith((".gz", ".bgz")):
            raise DataError(f"{self.path}: named like a gzip file but not gzip-compressed")
        self._source = _decompress(self.path, cache) if gz else self.path
        if self._source.stat().st_size == 0:
            raise DataError(f"FASTA file is empty (after decompression): {self.path}")
        side = Path(str(self._source) + ".fai")
        if side.is_file() and side.stat().st_mtime >= self._source.stat().st_mtime:
            self._index = side
        else:
            self._index = cache / "fai" / _key(self._source, False) / (self._source.name + ".fai")
            self._index.parent.mkdir(parents=True, exist_ok=True)
        self._fa, self._pid = None, None
        idx = self._handle.faidx.index  # opens now: builds the index, surfaces format errors
        self._lengths = {name: rec.rlen for name, rec in idx.items()}

    # -------------------------------------------------------------- handle management
    def _open(self) -> pyfaidx.Fasta:
        try:
            return pyfaidx.Fasta(str(self._source), indexname=str(self._index), as_raw=True,
                                 strict_bounds=True, rebuild=True, build_index=True)
        except pyfaidx.FastaIndexingError as e:
            msg = str(e)
            m = re.search(r"Inconsistent line found in >(\S*) at line (\d+)", msg)
            if m:
                why = _explain_bad_line(self._source, m.group(1), int(m.group(2)))
                raise DataError(f"{self.path}: {why}; remove blank lines / rewrap the record "
                                "(pyfaidx and samtools faidx need equal line lengths)") from e
            if "does not contain a valid sequence" in msg:
                raise DataError(f"{self.path}: no FASTA record found (no line starting with '>')") from e
            raise DataError(f"{self.path}: malformed FASTA: {msg}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not a text FASTA file ({e})") from e
        except pyfaidx.FastaNotFoundError as e:
            raise DatasetError(f"FASTA file not found: {self._source}") from e
        except ValueError as e:
            m = re.search(r'Duplicate key "(.*)"', str(e))
            if not m:
                raise
            lines = _header_lines(self._source, m.group(1))
            raise DataError(f"{self.path}: duplicate record name {m.group(1)!r} "
                            f"(header lines {', '.join(map(str, lines))})") from e

    @property
    def _handle(self) -> pyfaidx.Fasta:
        if self._fa is None or self._pid != os.getpid():
            self._fa, self._pid = self._open(), os.getpid()
        return self._fa

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fa"], state["_pid"] = None, None
        return state

    def close(self) -> None:
        """Close this process's handle (it is reopened on the next fetch)."""
        if self._fa is not None and self._pid == os.getpid():
            self._fa.close()
        self._fa, self._pid = None, None

    # -------------------------------------------------------------- queries
    @property
    def names(self) -> list[str]:
        """Record names (first word of each header), in file order."""
        return list(self._lengths)

    @property
    def lengths(self) -> dict[str, int]:
        """``{name: length in bp}``."""
        return dict(self._lengths)

    def __len__(self) -> int:
        return len(self._lengths)

    def __contains__(self, name) -> bool:
        return name in self._lengths

    def _check(self, name: str, seq: str, offset: int) -> str:
        if self.validate:
            m = _INVALID.search(seq)
            if m:
                raise DataError(f"{self.path}: record {name!r} has non-DNA character {m.group()!r} "
                                f"at position {offset + m.start()} (0-based)")
        return seq

    def fetch(self, chrom: str, start: int, end: int, strand: str = "+") -> str:
        """Sequence of ``chrom[start:end]`` (0-based, half-open, BED coordinates), case as in the
        file; ``strand='-'`` returns the reverse complement. Returns a str of length end-start."""
        chrom = str(chrom)
        if chrom not in self._lengths:
            known = ", ".join(self.names[:8]) + (" ..." if len(self) > 8 else "")
            raise DataError(f"{self.path}: unknown chromosome {chrom!r} (known: {known})")
        try:
            s, e = operator.index(start), operator.index(end)
        except TypeError as err:
            raise DataError(f"non-integer coordinates {start!r}, {end!r}") from err
        n = self._lengths[chrom]
        if not 0 <= s <= e <= n:
            raise DataError(f"{self.path}: interval {chrom}:{s}-{e} out of range "
                            f"(need 0 <= start <= end <= {n}, the length of {chrom!r})")
        if strand not in ("+", "-", ".", None):
            raise DataError(f"strand must be '+', '-' or '.', got {strand!r}")
        seq = self._check(chrom, self._handle[chrom][s:e] if e > s else "", s)
        return reverse_complement(seq) if strand == "-" else seq

    def fetch_record(self, name: str) -> str:
        """The whole sequence of record ``name``."""
        if name not in self._lengths:
            raise DataError(f"{self.path}: unknown record {name!r}")
        return self.fetch(name, 0, self._lengths[name])

    def fetch_bed(self, table) -> list[str]:
        """Sequences for many intervals.

        ``table``: a pandas or polars DataFrame with a chrom column (``chrom``/``chr``/``region``
        /...), ``start``, ``end`` and optional ``strand``; or a list of ``(chrom, start, end)`` /
        ``(chrom, start, end, strand)`` tuples. Returns a list of str, one per row.
        """
        return [self.fetch(*row) for row in bed_rows(table)]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for name in self.names:
            yield name, self.fetch_record(name)

    def __repr__(self) -> str:
        return f"FastaGenome({str(self.path)!r}, records={len(self)})"


def bed_rows(table) -> list[tuple[str, int, int, str]]:
    """Normalise a coordinate table (see :meth:`FastaGenome.fetch_bed`) to
    ``[(chrom, start, end, strand), ...]``; a missing/NA strand becomes ``'+'``."""
    def strand_of(v):
        return "+" if v is None or v != v or v == "." else str(v)

    if hasattr(table, "columns"):
        cols = list(table.columns)
        c, s, e = (_column(cols, o, w) for o, w in
                   ((_CHROM_COLS, "chrom"), (_START_COLS, "start"), (_END_COLS, "end")))
        strands = list(table["strand"]) if "strand" in cols else ["+"] * len(table)
        return [(str(a), b, d, strand_of(x))
                for a, b, d, x in zip(list(table[c]), list(table[s]), list(table[e]), strands)]
    rows = []
    for i, r in enumerate(table):
        if len(r) not in (3, 4):
            raise DataError(f"coordinate row {i} must be (chrom, start, end[, strand]), got {r!r}")
        rows.append((str(r[0]), r[1], r[2], strand_of(r[3]) if len(r) == 4 else "+"))
    return rows


def _column(cols: Sequence[str], options: Sequence[str], what: str) -> str:
    for c in options:
        if c in cols:
            return c
    raise DataError(f"coordinate table has no {what} column (columns: {list(cols)})")


def read_fasta(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
               validate: bool = True) -> Iterator[tuple[str, str]]:
    """Records of a FASTA file as ``(name, sequence)`` pairs, in file order.

    File-level problems (missing, empty, duplicate names, blank lines) raise at call time;
    non-DNA letters raise while iterating, naming the record and 0-based position.
    """
    genome = FastaGenome(path, cache_dir=cache_dir, validate=validate)
    return iter(genome)
