"""Character-level (and optional k-mer) DNA tokenizer.

Vocabulary (fixed ids, identical for every ``k``)::

    0 [PAD]   1 [CLS]   2 [MASK]   3 [UNK]
    4 A   5 C   6 G   7 T   8 N                      (single nucleotides)
    9 .. 9+4**k-1      the 4**k ACGT k-mers, lexicographic (k > 1 only)
    9+4**k             [NKMER]: any k-mer containing an N   (k > 1 only)

so ``vocab_size`` is 9 for ``k=1`` and ``10 + 4**k`` for ``k>1``.

Input rules: lowercase (soft-masked) bases are accepted and upper-cased; the IUPAC ambiguity
codes R Y S W K M B D H V become N (``iupac='N'``, default) or raise (``iupac='error'``); any
other character raises :class:`~titans_memory.errors.DataError` naming the record id, the 0-based
position and the character (``unknown='error'``, default), or becomes ``[UNK]``
(``unknown='unk'``), or is dropped (``unknown='skip'``).

k-mer mode (``k > 1``): ``stride=1`` (default) gives overlapping k-mers (DNABERT-1 style,
``L-k+1`` tokens); ``stride=k`` gives non-overlapping k-mers and the ``L % k`` trailing bases
become single-nucleotide tokens (Nucleotide-Transformer style), so nothing is dropped. A
sequence shorter than ``k`` is encoded base by base. A window that contains an ``[UNK]``
character is ``[UNK]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from titans_memory.errors import ConfigError, DataError, ShapeError

PAD_ID, CLS_ID, MASK_ID, UNK_ID = 0, 1, 2, 3
NUC_OFFSET = 4  # A=4 C=5 G=6 T=7 N=8
N_ID = 8
KMER_OFFSET = 9
SPECIAL_TOKENS = {PAD_ID: "[PAD]", CLS_ID: "[CLS]", MASK_ID: "[MASK]", UNK_ID: "[UNK]"}

_IUPAC = "RYSWKMBDHV"
# IUPAC complement, case preserved: A<->T, C<->G, R<->Y, K<->M, B<->V, D<->H, S, W, N fixed.
_COMP_SRC = "ACGTURYKMBVDHSWN"
_COMP_DST = "TGCAAYRMKVBHDSWN"
_COMP_TABLE = str.maketrans(_COMP_SRC + _COMP_SRC.lower(), _COMP_DST + _COMP_DST.lower())
_RC_ALLOWED = frozenset(_COMP_SRC + _COMP_SRC.lower())


def reverse_complement(seq: str) -> str:
    """Reverse complement of a DNA string, IUPAC-aware, preserving case (``'acgN'`` -> ``'Ncgt'``).

    Raises :class:`DataError` (naming the 0-based position) on a non-nucleotide character.
    """
    bad = set(seq) - _RC_ALLOWED
    if bad:
        pos = next(i for i, c in enumerate(seq) if c in bad)
        raise DataError(f"cannot reverse-complement character {seq[pos]!r} at position {pos}")
    return seq.translate(_COMP_TABLE)[::-1]


class NucleotideTokenizer:
    """Map DNA strings to integer ids (see the module docstring for the vocabulary).

    Args:
        k: k-mer size (1 = one token per base).
        stride: k-mer step, 1 (overlapping) or ``k`` (non-overlapping); ignored for ``k=1``.
        iupac: ``'N'`` (map ambiguity codes to N) or ``'error'``.
        unknown: policy for other characters: ``'error'``, ``'unk'`` or ``'skip'``.
    """

    def __init__(self, k: int = 1, stride: int = 1, iupac: str = "N", unknown: str = "error"):
        if not isinstance(k, int) or not 1 <= k <= 8:
            raise ConfigError(f"k must be an int in [1, 8], got {k!r}")
        if k > 1 and stride not in (1, k):
            raise ConfigError(f"stride must be 1 (overlapping) or k={k} (non-overlapping), got {stride}")
        if iupac not in ("N", "error"):
            raise ConfigError(f"iupac must be 'N' or 'error', got {iupac!r}")
        if unknown not in ("error", "unk", "skip"):
            raise ConfigError(f"unknown must be 'error', 'unk' or 'skip', got {unknown!r}")
        self.k, self.stride, self.iupac, self.unknown = k, (stride if k > 1 else 1), iupac, unknown
        lut = np.full(256, -1, dtype=np.int64)  # -1 = invalid character
        for i, b in enumerate("ACGTN"):
            lut[ord(b)] = lut[ord(b.lower())] = NUC_OFFSET + i
        if iupac == "N":
            for b in _IUPAC:
                lut[ord(b)] = lut[ord(b.lower())] = N_ID
        self._lut = lut
        self._comp_ids = np.arange(self.vocab_size, dtype=np.int64)
        self._comp_ids[NUC_OFFSET:NUC_OFFSET + 4] = [7, 6, 5, 4]  # A<->T, C<->G

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of token ids: 9 for ``k=1``, ``10 + 4**k`` otherwise."""
        return KMER_OFFSET if self.k == 1 else KMER_OFFSET + 4 ** self.k + 1

    @property
    def nkmer_id(self) -> int | None:
        """Id of the ``[NKMER]`` token (k-mers containing N); ``None`` for ``k=1``."""
        return None if self.k == 1 else KMER_OFFSET + 4 ** self.k

    pad_id, cls_id, mask_id, unk_id = PAD_ID, CLS_ID, MASK_ID, UNK_ID

    def get_vocab(self) -> dict[str, int]:
        """``{token string: id}`` for the whole vocabulary (k-mers as e.g. ``'ACG'``)."""
        return {("[NKMER]" if t == self.nkmer_id else self._token_str(t)): t
                for t in range(self.vocab_size)}

    # ------------------------------------------------------------------ encoding
    def _base_ids(self, seq: str, record_id) -> np.ndarray:
        """Per-character ids (4..8, or UNK), applying the policies. Returns int64 [L]."""
        try:
            raw = seq.encode("ascii")
        except UnicodeEncodeError:  # keep 1 byte per character so positions stay exact
            raw = "".join(c if ord(c) < 128 else "\x00" for c in seq).encode("ascii")
        ids = self._lut[np.frombuffer(raw, dtype=np.uint8)]
        bad = ids < 0
        if bad.any():
            if self.unknown == "error":
                pos = int(np.flatnonzero(bad)[0])
                kind = "IUPAC ambiguity code (iupac='error')" if seq[pos].upper() in _IUPAC else "character"
                where = f" in record {record_id!r}" if record_id is not None else ""
                raise DataError(f"invalid {kind} {seq[pos]!r} at position {pos} (0-based){where}; "
                                "allowed: A C G T N (any case) and IUPAC codes R Y S W K M B D H V")
            ids = ids[~bad] if self.unknown == "skip" else np.where(bad, UNK_ID, ids)
        return ids

    def _kmerize(self, base: np.ndarray) -> np.ndarray:
        k, n = self.k, base.shape[0]
        if k == 1 or n < k:
            return base
        n_full = (n - k) // self.stride + 1
        win = np.lib.stride_tricks.sliding_window_view(base, k)[:: self.stride][:n_full]
        digits = win - NUC_OFFSET  # 0..3 = ACGT, 4 = N, negative = UNK
        idx = (np.clip(digits, 0, 3) * (4 ** np.arange(k - 1, -1, -1))).sum(axis=1)
        out = KMER_OFFSET + idx
        out = np.where((digits == 4).any(axis=1), self.nkmer_id, out)
        out = np.where((digits < 0).any(axis=1), UNK_ID, out)
        if self.stride == k and n % k:
            out = np.concatenate([out, base[n_full * k:]])
        return out.astype(np.int64)

    def encode(self, seq: str, record_id: str | None = None, add_cls: bool = False) -> np.ndarray:
        """Encode one sequence. Returns ``np.ndarray[int64]`` of shape ``[T]`` (``T = L`` for k=1,
        plus one if ``add_cls``)."""
        if not isinstance(seq, str):
            raise DataError(f"sequence must be a str, got {type(seq).__name__}"
                            + (f" in record {record_id!r}" if record_id is not None else ""))
        ids = self._kmerize(self._base_ids(seq, record_id))
        return np.concatenate([[CLS_ID], ids]).astype(np.int64) if add_cls else ids

    def batch_encode(self, seqs: Sequence[str], max_length: int | None = None,
                     pad_to_multiple_of: int | None = None, add_cls: bool = False,
                     truncation: str = "error", padding: str = "longest",
                     record_ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Encode and right-pad a batch.

        Sequences longer than ``max_length`` tokens (the CLS counts) are cut according to
        ``truncation`` (``'error'`` raises, ``'right'`` keeps the start, ``'left'`` keeps the end,
        ``'center'`` keeps the middle); without ``max_length`` nothing is cut. ``padding``:
        ``'longest'`` pads to the longest sequence, ``'max_length'`` to ``max_length``; the
        length is then rounded up to ``pad_to_multiple_of``.

        Returns ``{'input_ids': LongTensor [B, T], 'attention_mask': BoolTensor [B, T]}``
        (mask True on real tokens, CLS included).
        """
        if truncation not in ("error", "right", "left", "center"):
            raise ConfigError(f"truncation must be error/right/left/center, got {truncation!r}")
        if padding not in ("longest", "max_length") or (padding == "max_length" and max_length is None):
            raise ConfigError("padding must be 'longest', or 'max_length' together with max_length")
        if max_length is not None and max_length < 1 + int(add_cls):
            raise ConfigError(f"max_length={max_length} leaves no room for a token")
        if isinstance(seqs, str):
            seqs = [seqs]
        rows = []
        for i, s in enumerate(seqs):
            rid = record_ids[i] if record_ids is not None else i
            ids = self.encode(s, record_id=rid)
            if max_length is not None and len(ids) + add_cls > max_length:
                keep = max_length - int(add_cls)
                if truncation == "error":
                    raise DataError(f"record {rid!r} has {len(ids)} tokens > max_length={max_length}"
                                    " (pass truncation='right'|'left'|'center' to cut it)")
                start = {"right": 0, "left": len(ids) - keep, "center": (len(ids) - keep) // 2}[truncation]
                ids = ids[start:start + keep]
            rows.append(np.concatenate([[CLS_ID], ids]) if add_cls else ids)
        width = max((len(r) for r in rows), default=0)
        if padding == "max_length":
            width = max_length
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
            mask[i, :len(r)] = True
        return {"input_ids": torch.from_numpy(out), "attention_mask": torch.from_numpy(mask)}

    __call__ = batch_encode

    # ------------------------------------------------------------------ decoding
    def _token_str(self, t: int) -> str:
        if t in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[t]
        if t < KMER_OFFSET:
            return "ACGTN"[t - NUC_OFFSET]
        if t == self.nkmer_id:
            return "N" * self.k
        idx, s = t - KMER_OFFSET, []
        for _ in range(self.k):
            idx, r = divmod(idx, 4)
            s.append("ACGT"[r])
        return "".join(reversed(s))

    def decode(self, ids, skip_special_tokens: bool = True) -> str | list[str]:
        """Ids ``[T]`` -> str (``[B, T]`` -> list of str). Upper-case; exact for k=1 inputs made of
        A/C/G/T/N. Overlapping k-mers are stitched (first k-mer, then the last base of each next
        one); an ``[NKMER]`` decodes to N's, so k-mer decoding is lossy around N."""
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(r, skip_special_tokens) for r in arr]
        if arr.ndim != 1:
            raise ShapeError(f"decode expects ids of shape [T] or [B, T], got {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"token id out of range [0, {self.vocab_size})")
        parts, prev_kmer = [], False
        for t in arr.tolist():
            if t in SPECIAL_TOKENS:
                if not skip_special_tokens:
                    parts.append(SPECIAL_TOKENS[t])
                prev_kmer = False
                continue
            s = self._token_str(t)
            is_kmer = t >= KMER_OFFSET
            if is_kmer and prev_kmer and self.stride == 1:
                s = s[-1]
            parts.append(s)
            prev_kmer = is_kmer
        return "".join(parts)

    # ------------------------------------------------------------------ strand
    @staticmethod
    def reverse_complement(seq: str) -> str:
        """Reverse complement of a string (IUPAC-aware, case preserved)."""
        return reverse_complement(seq)

    def reverse_complement_ids(self, ids):
        """Reverse complement of k=1 ids, ``[T]`` or ``[B, T]`` (numpy or torch, same type out).

        [PAD] and [CLS] stay in place; the other tokens (bases, [MASK], [UNK]) form each row's
        body, which is reversed, bases complemented. Assumes the layout ``batch_encode`` makes
        (optional leading CLS, right padding). Applying it twice gives back the input.
        """
        if self.k != 1:
            raise ConfigError("reverse_complement_ids needs a k=1 tokenizer")
        is_torch = isinstance(ids, torch.Tensor)
        arr = ids.detach().cpu().numpy() if is_torch else np.asarray(ids)
        if arr.ndim not in (1, 2):
            raise ShapeError(f"expected ids of shape [T] or [B, T], got {arr.shape}")
        a2 = np.atleast_2d(arr).astype(np.int64)
        body = (a2 != PAD_ID) & (a2 != CLS_ID)
        T = a2.shape[1]
        j = np.arange(T)
        first = np.where(body.any(1), body.argmax(1), 0)
        last = np.where(body.any(1), T - 1 - body[:, ::-1].argmax(1), -1)
        if (body.sum(1) != np.maximum(last - first + 1, 0)).any():
            raise DataError("reverse_complement_ids: [PAD]/[CLS] found inside a sequence body")
        src = np.clip(first[:, None] + last[:, None] - j[None, :], 0, T - 1)
        rc = self._comp_ids[np.take_along_axis(a2, src, axis=1)]
        out = np.where(body, rc, a2).reshape(arr.shape)
        return torch.from_numpy(out).to(ids.device) if is_torch else out.astype(arr.dtype)

    def __repr__(self) -> str:
        return (f"NucleotideTokenizer(k={self.k}, stride={self.stride}, iupac={self.iupac!r}, "
                f"unknown={self.unknown!r}, vocab_size={self.vocab_size})")

