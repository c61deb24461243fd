"""scikit-learn style DNA sequence classifier on the Titans backbone.

>>> clf = TitansSequenceClassifier(max_epochs=3)                  # doctest: +SKIP
>>> clf.fit(["ACGT...", ...], ["promoter", ...])                  # doctest: +SKIP
>>> clf.predict_proba(test_sequences)                             # doctest: +SKIP
>>> clf.save("model_dir"); TitansSequenceClassifier.load("model_dir")  # doctest: +SKIP

Inputs (``fit``, ``predict``, ``predict_proba``, ``score``, ``embed``...) may be:

- a list (or array / pandas Series) of DNA strings;
- a pandas or polars DataFrame with a ``sequence_col`` column (and ``label_col`` when ``y`` is
  None in ``fit``/``score``; an ``id``/``record_id`` column is used as record ids when present);
- FASTA files: a dict ``{label: path}`` (one file per class), a list of paths (with ``y`` = one
  label per file in ``fit``), or, for prediction, a single path.

Training runs through :func:`titans_memory.training.fit_module` (the library's one training loop:
AdamW, cosine schedule, early stopping on validation loss, best-epoch restore, bf16 on GPU).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from titans_memory import MemoryConfig, TitansConfig
from titans_memory.errors import CheckpointError, ConfigError, DataError, NotFittedError, ShapeError
from titans_memory.training import TrainingConfig, fit_module

from .module import POOLINGS, TitansSequenceNetwork
from .tokenizer import PAD_ID, NucleotideTokenizer, reverse_complement

FORMAT = "titans-genomics-classifier"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_FASTA_SUFFIX = re.compile(r"\.(fa|fasta|fna|fas|ffn|frn|seq)(\.gz|\.bgz)?$", re.IGNORECASE)
_TOKENS_PER_BATCH = 1 << 18  # inference batches hold at most this many tokens (one sequence minimum)


# ---------------------------------------------------------------------------------------------
# input handling
def _is_path_like(x: Any) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return isinstance(x, str) and bool(_FASTA_SUFFIX.search(x) or "/" in x or os.sep in x)


def _is_polars(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "polars"


def _read_fasta_records(path) -> Tuple[List[str], List[str]]:
    from .fasta import read_fasta

    p = Path(path)
    if not p.is_file():
        raise DataError(f"FASTA file not found: {p}")
    names, seqs = [], []
    for name, seq in read_fasta(p):
        names.append(name)
        seqs.append(seq)
    if not seqs:
        raise DataError(f"FASTA file {p} has no records")
    return names, seqs


def _as_label_array(y: Any) -> np.ndarray:
    if _is_polars(y):
        y = y.to_list()
    arr = np.asarray(list(y) if not isinstance(y, np.ndarray) else y)
    if arr.ndim != 1:
        raise ShapeError(f"labels must be one-dimensional, got shape {arr.shape}")
    if len(arr) and pd.isna(pd.Series(arr)).any():
        raise DataError("labels contain missing values")
    return arr


class _SeqDataset(Dataset):
    def __init__(self, ids: List[np.ndarray], labels: np.ndarray) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], int(self.labels[i])


def _pad(rows: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask


class _Collate:
    """Right-pads a batch; with ``rc_prob > 0`` reverse-complements each sample with that probability."""

    def __init__(self, tokenizer: NucleotideTokenizer, rc_prob: float) -> None:
        self.tokenizer, self.rc_prob = tokenizer, rc_prob

    def __call__(self, batch):
        ids, mask = _pad([b[0] for b in batch])
        if self.rc_prob > 0:
            flip = (torch.rand(len(batch)) < self.rc_prob).numpy()
            if flip.any():
                ids = np.where(flip[:, None], self.tokenizer.reverse_complement_ids(ids), ids)
        labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
        return torch.from_numpy(ids), torch.from_numpy(mask), labels


class _CrossEntropy:
    """``loss_fn(network, batch)`` for :func:`fit_module`."""

    def __init__(self, weight: Optional[torch.Tensor] = None) -> None:
        self.weight = weight

    def __call__(self, network, batch):
        ids, mask, y = batch
        logits = network(ids, mask).float()
        w = self.weight.to(logits.device) if self.weight is not None else None
        return F.cross_entropy(logits, y, weight=w)


# ---------------------------------------------------------------------------------------------
class TitansSequenceClassifier(ClassifierMixin, BaseEstimator):
    """DNA sequence classifier: nucleotide tokens -> Titans backbone -> pooling -> head.

    Args:
        variant: backbone variant, ``"lmm"`` (memory alone, as in the paper's DNA experiments;
            the only one that supports chunked long-sequence inference), ``"mac"``, ``"mag"``
            or ``"mal"``.
        d_model, n_layers, n_heads: backbone width, depth and memory heads.
        memory_depth: layers of the per-head memory MLP (1 = linear memory).
        memory_expansion: hidden width of the memory MLP as a multiple of the head width.
        chunk_size: tokens per chunk of the memory's chunked parallel update.
        ffn_mult: feed-forward width multiple in every block (0 disables it).
        dropout: dropout in the blocks and the head.
        pooling: ``"mean"`` (masked mean over real tokens), ``"last"`` or ``"mean+last"``.
        persistent_tokens, window_size, segment_size: settings of the MAC/MAG/MAL variants.
        max_length: sequences longer than this many bp are cut (``truncation``) in ``fit`` and
            ``predict``; None keeps full length (sequences over ``piece_length`` are then
            predicted in pieces with the carried memory state).
        truncation: ``"center"``, ``"right"`` (keep the start) or ``"left"`` (keep the end).
        rc_augment: reverse-complement each training sample with probability 1/2.
        rc_average: average the predicted probabilities of a sequence and its reverse complement
            (the prediction is then strand-symmetric).
        max_epochs, batch_size, learning_rate, weight_decay, warmup_steps: optimisation.
        class_weight: None or ``"balanced"`` (loss weights inversely proportional to class counts).
        val_size: fraction of the training data held out for early stopping and best-epoch
            selection when ``fit`` gets no ``X_val`` (0 or None: no validation).
        early_stopping_patience: epochs without validation improvement before stopping.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        devices, strategy, num_nodes: passed to the Lightning trainer (``devices=N,
            strategy="ddp"`` for data-parallel training; it relaunches the script).
        precision: Lightning precision for training; None = bf16-mixed on GPU, fp32 on CPU
            (inference then also runs under bf16 autocast on GPU).
        num_workers: DataLoader workers for training.
        predict_batch_size: sequences per inference batch (None: ``2 * batch_size``).
        piece_length: bp per piece in chunked long-sequence inference.
        sequence_col, label_col: DataFrame column names.
        random_state: seed for weights, the validation split, shuffling and augmentation.
        checkpoint_dir: directory for training checkpoints; when set, a fit that was interrupted
            resumes from its ``last.ckpt`` there when the same fit is run again (use a fresh
            directory for a new fit). None: a temporary directory, no resume.
        enable_progress_bar: show training and (long) prediction progress bars.

    Fitted attributes: ``classes_``, ``model_`` (:class:`TitansSequenceNetwork`), ``tokenizer_``,
    ``backbone_config_``, ``history_`` (per-epoch losses), ``best_val_loss_``, ``n_epochs_``,
    ``train_seconds_``.
    """

    def __init__(
        self,
        variant: str = "lmm",
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        memory_depth: int = 2,
        memory_expansion: int = 2,
        chunk_size: int = 32,
        ffn_mult: int = 2,
        dropout: float = 0.1,
        pooling: str = "mean",
        persistent_tokens: int = 4,
        window_size: int = 64,
        segment_size: int = 64,
        max_length: Optional[int] = None,
        truncation: str = "center",
        rc_augment: bool = True,
        rc_average: bool = True,
        max_epochs: int = 10,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        class_weight: Optional[str] = None,
        val_size: Optional[float] = 0.1,
        early_stopping_patience: Optional[int] = 3,
        device: str = "auto",
        devices: Any = 1,
        strategy: Any = "auto",
        num_nodes: int = 1,
        precision: Optional[str] = None,
        num_workers: int = 0,
        predict_batch_size: Optional[int] = None,
        piece_length: int = 16384,
        sequence_col: str = "sequence",
        label_col: str = "label",
        random_state: Optional[int] = None,
        checkpoint_dir: Optional[str] = None,
        enable_progress_bar: bool = True,
    ) -> None:
        self.variant = variant
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.memory_depth = memory_depth
        self.memory_expansion = memory_expansion
        self.chunk_size = chunk_size
        self.ffn_mult = ffn_mult
        self.dropout = dropout
        self.pooling = pooling
        self.persistent_tokens = persistent_tokens
        self.window_size = window_size
        self.segment_size = segment_size
        self.max_length = max_length
        self.truncation = truncation
        self.rc_augment = rc_augment
        self.rc_average = rc_average
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.class_weight = class_weight
        self.val_size = val_size
        self.early_stopping_patience = early_stopping_patience
        self.device = device
        self.devices = devices
        self.strategy = strategy
        self.num_nodes = num_nodes
        self.precision = precision
        self.num_workers = num_workers
        self.predict_batch_size = predict_batch_size
        self.piece_length = piece_length
        self.sequence_col = sequence_col
        self.label_col = label_col
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.enable_progress_bar = enable_progress_bar

    # -----------------------------------------------------------------------------------------
    # configuration
    def _backbone_config(self) -> TitansConfig:
        memory = MemoryConfig(depth=self.memory_depth, expansion=self.memory_expansion, chunk_size=self.chunk_size)
        return TitansConfig(
            d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, variant=self.variant,
            memory=memory, persistent_tokens=self.persistent_tokens, segment_size=self.segment_size,
            window_size=self.window_size, ffn_mult=self.ffn_mult, dropout=self.dropout,
        )

    def _validate_params(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.truncation not in ("center", "right", "left"):
            raise ConfigError(f"truncation must be 'center', 'right' or 'left', got {self.truncation!r}")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length must be >= 1 or None, got {self.max_length}")
        if self.val_size is not None and not 0.0 <= self.val_size < 1.0:
            raise ConfigError(f"val_size must be in [0, 1) or None, got {self.val_size}")
        if self.class_weight not in (None, "balanced"):
            raise ConfigError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        if self.piece_length < 1:
            raise ConfigError(f"piece_length must be >= 1, got {self.piece_length}")

    def _torch_device(self) -> torch.device:
        d = self.device
        if d in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"unknown device {d!r}: {exc}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={d!r} but CUDA is not available")
        return dev

    def _autocast(self, device: torch.device):
        use = device.type == "cuda" and (self.precision is None or "bf16" in str(self.precision))
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)

    def _init_network(self, config: TitansConfig, n_classes: int) -> TitansSequenceNetwork:
        """A freshly initialised network (seeded by ``random_state`` without touching the global RNG)."""
        with torch.random.fork_rng(devices=[]):
            if self.random_state is not None:
                torch.manual_seed(self.random_state)
            return TitansSequenceNetwork(
                config, n_classes, vocab_size=NucleotideTokenizer(k=1).vocab_size, pad_id=PAD_ID,
                pooling=self.pooling, head_dropout=self.dropout,
            )

    # -----------------------------------------------------------------------------------------
    # data
    def _read(self, X, y=None, need_labels: bool = False) -> Tuple[List[str], Optional[np.ndarray], List[str]]:
        """``(sequences, labels or None, record ids)`` from any accepted input form."""
        labels = None
        if isinstance(X, pd.DataFrame) or (_is_polars(X) and hasattr(X, "columns")):
            cols = list(X.columns)
            col = (lambda c: X[c].tolist()) if isinstance(X, pd.DataFrame) else (lambda c: X[c].to_list())
            if self.sequence_col not in cols:
                raise DataError(f"DataFrame has no sequence column {self.sequence_col!r} (columns: {cols})")
            seqs = col(self.sequence_col)
            id_col = next((c for c in ("record_id", "id", "name") if c in cols), None)
            if id_col:
                ids = [str(v) for v in col(id_col)]
            else:
                ids = [str(v) for v in (X.index if isinstance(X, pd.DataFrame) else range(len(seqs)))]
            if y is not None:
                labels = _as_label_array(y)
            elif need_labels:
                if self.label_col not in cols:
                    raise DataError(f"no labels: pass y or give the DataFrame a {self.label_col!r} column (columns: {cols})")
                labels = _as_label_array(col(self.label_col))
        elif isinstance(X, dict):
            if y is not None:
                raise DataError("with a {label: fasta_path} dict, labels come from the keys; pass y=None")
            seqs, ids, lab = [], [], []
            for label, path in X.items():
                names, s = _read_fasta_records(path)
                seqs += s
                ids += names
                lab += [label] * len(s)
            labels = _as_label_array(lab)
        elif _is_path_like(X):
            ids, seqs = _read_fasta_records(X)
            if y is not None:
                labels = _as_label_array(y)
        else:
            if isinstance(X, str):
                raise DataError(
                    f"got a single string {X[:30]!r}...; pass a list of sequences, or a FASTA path "
                    "ending in .fa/.fasta/.fna (optionally .gz)"
                )
            if _is_polars(X):
                X = X.to_list()
            try:
                items = list(X)
            except TypeError:
                raise DataError(f"cannot read sequences from {type(X).__name__}") from None
            if items and all(_is_path_like(i) for i in items):
                seqs, ids, lab = [], [], []
                if y is not None:
                    y_files = _as_label_array(y)
                    if len(y_files) != len(items):
                        raise ShapeError(
                            f"with a list of {len(items)} FASTA files, y must have one label per file, got {len(y_files)}"
                        )
                for j, path in enumerate(items):
                    names, s = _read_fasta_records(path)
                    seqs += s
                    ids += names
                    if y is not None:
                        lab += [y_files[j]] * len(s)
                if y is not None:
                    labels = _as_label_array(lab)
            else:
                seqs = items
                ids = [str(i) for i in range(len(seqs))]
                if y is not None:
                    labels = _as_label_array(y)
        if need_labels and labels is None:
            raise DataError("labels are needed: pass y, a DataFrame with a label column, or a {label: fasta} dict")
        if labels is not None and len(labels) != len(seqs):
            raise ShapeError(f"{len(seqs)} sequences but {len(labels)} labels")
        if not len(seqs):
            raise DataError("no sequences")
        for i, s in enumerate(seqs):
            if not isinstance(s, str):
                raise DataError(f"record {ids[i]!r}: sequence must be a str, got {type(s).__name__}")
            if not s:
                raise DataError(f"record {ids[i]!r} is an empty sequence")
        return seqs, labels, ids

    def _tokenize(self, seqs: Sequence[str], ids: Sequence[str], truncate: bool = True) -> List[np.ndarray]:
        tok = self.tokenizer_
        out = []
        for s, rid in zip(seqs, ids):
            t = tok.encode(s, record_id=rid)
            if truncate and self.max_length is not None and len(t) > self.max_length:
                keep = self.max_length
                start = {"right": 0, "left": len(t) - keep, "center": (len(t) - keep) // 2}[self.truncation]
                t = t[start : start + keep]
            if len(t) == 0:
                raise DataError(f"record {rid!r} has no valid bases")
            out.append(t)
        return out

    def _encode_labels(self, labels: np.ndarray, what: str) -> np.ndarray:
        try:
            idx = np.searchsorted(self.classes_, labels)
            idx = np.clip(idx, 0, len(self.classes_) - 1)
            bad = np.asarray(self.classes_[idx] != labels, dtype=bool)
        except TypeError:
            raise DataError(
                f"{what} labels ({np.asarray(labels).dtype}) are not comparable with the training classes "
                f"{self.classes_.tolist()}"
            ) from None
        if np.any(bad):
            unseen = sorted({str(v) for v in np.asarray(labels)[bad]})
            raise DataError(f"{what} labels {unseen[:10]} are not among the training classes {self.classes_.tolist()}")
        return idx.astype(np.int64)

    # -----------------------------------------------------------------------------------------
    def fit(self, X, y=None, X_val=None, y_val=None, callbacks: Sequence[Any] = ()):
        """Train on ``X`` (see the module docstring for the input forms) and labels ``y``.

        Args:
            X, y: training sequences and labels (any hashable, sortable type: ints, strings...).
            X_val, y_val: explicit validation data (else ``val_size`` of ``X`` is held out).
            callbacks: extra Lightning callbacks passed to :func:`fit_module`.
        Returns:
            self.
        """
        self._validate_params()
        config = self._backbone_config()  # raises ConfigError on bad backbone settings
        seqs, labels, ids = self._read(X, y, need_labels=True)
        try:
            classes = np.unique(labels)
        except TypeError as exc:
            raise DataError(f"labels must be of one sortable type (all str or all int...): {exc}") from None
        if len(classes) < 2:
            raise DataError(f"need at least two classes to train, got {classes.tolist()}")
        self.classes_ = classes
        self.tokenizer_ = NucleotideTokenizer(k=1)
        self.backbone_config_ = config
        y_idx = self._encode_labels(labels, "training")
        tokens = self._tokenize(seqs, ids)

        rng = np.random.RandomState(self.random_state)
        val_tokens = val_idx = None
        if X_val is not None:
            vs, vl, vids = self._read(X_val, y_val, need_labels=True)
            val_tokens, val_idx = self._tokenize(vs, vids), self._encode_labels(vl, "validation")
        elif self.val_size:
            n_val = int(round(self.val_size * len(tokens)))
            if n_val >= 1 and len(tokens) - n_val >= 1:
                from sklearn.model_selection import train_test_split

                counts = np.bincount(y_idx, minlength=len(classes))
                stratify = y_idx if counts.min() >= 2 and n_val >= len(classes) else None
                tr, va = train_test_split(np.arange(len(tokens)), test_size=n_val, stratify=stratify, random_state=rng)
                val_tokens, val_idx = [tokens[i] for i in va], y_idx[va]
                tokens, y_idx = [tokens[i] for i in tr], y_idx[tr]

        weight = None
        if self.class_weight == "balanced":
            counts = np.bincount(y_idx, minlength=len(classes)).astype(np.float64)
            weight = torch.tensor(len(y_idx) / (len(classes) * np.maximum(counts, 1.0)), dtype=torch.float32)

        network = self._init_network(config, len(classes))

        device = self._torch_device()
        tcfg = TrainingConfig(
            max_epochs=self.max_epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
            weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
            early_stopping_patience=self.early_stopping_patience if val_tokens is not None else None,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index] if device.type == "cuda" and device.index is not None and self.devices == 1 else self.devices,
            strategy=self.strategy, num_nodes=self.num_nodes, precision=self.precision, num_workers=self.num_workers,
            enable_progress_bar=self.enable_progress_bar, seed=self.random_state,
            checkpoint_dir=None if self.checkpoint_dir is None else str(self.checkpoint_dir),
            resume=self.checkpoint_dir is not None,
        )
        train_loader = DataLoader(
            _SeqDataset(tokens, y_idx), batch_size=self.batch_size, shuffle=True,
            collate_fn=_Collate(self.tokenizer_, 0.5 if self.rc_augment else 0.0),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )
        val_loader = None
        if val_tokens is not None and len(val_tokens):
            val_loader = DataLoader(
                _SeqDataset(val_tokens, val_idx), batch_size=2 * self.batch_size,
                shuffle=False, collate_fn=_Collate(self.tokenizer_, 0.0), num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        start = time.perf_counter()
        result = fit_module(network, _CrossEntropy(weight), train_loader, val_loader, tcfg, callbacks=callbacks)
        self.train_seconds_ = time.perf_counter() - start
        network.eval()
        self.model_ = network
        self.history_ = result.history
        self.best_val_loss_ = result.best_val_loss
        self.n_epochs_ = result.epochs
        return self

    # -----------------------------------------------------------------------------------------
    # inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit() or load() first")

    def _model_on(self, device: torch.device) -> TitansSequenceNetwork:
        model = self.model_
        p = next(model.parameters())
        if p.device != device:
            model.to(device)
        model.eval()
        return model

    def _batches(self, lengths: np.ndarray) -> List[np.ndarray]:
        """Index batches, shortest sequences first, each within the count and token budgets."""
        order = np.argsort(lengths, kind="stable")
        per = self.predict_batch_size or 2 * self.batch_size
        batches, cur = [], []
        for i in order:
            width = lengths[i]
            if cur and (len(cur) >= per or (len(cur) + 1) * width > _TOKENS_PER_BATCH):
                batches.append(np.asarray(cur))
                cur = []
            cur.append(i)
        if cur:
            batches.append(np.asarray(cur))
        return batches

    def _short_outputs(self, tokens: List[np.ndarray], want: str, rc: bool, desc: str) -> np.ndarray:
        """Per-sequence features (``want="features"``) or probabilities, one pass per batch."""
        device = self._torch_device()
        model = self._model_on(device)
        lengths = np.array([len(t) for t in tokens])
        batches = self._batches(lengths)
        dim = model.feature_dim if want == "features" else model.n_classes
        out = np.zeros((len(tokens), dim), dtype=np.float64)
        bar = tqdm(batches, desc=desc, unit="batch", leave=False,
                   disable=not self.enable_progress_bar or len(batches) < 8)
        with torch.inference_mode(), self._autocast(device):
            for b in bar:
                ids, mask = _pad([tokens[i] for i in b])
                strands = [ids, self.tokenizer_.reverse_complement_ids(ids)] if rc else [ids]
                m = torch.from_numpy(mask).to(device)
                acc = None
                for s in strands:
                    t = torch.from_numpy(s).to(device)
                    r = model.features(t, m) if want == "features" else torch.softmax(model(t, m).float(), dim=-1)
                    r = r.double()
                    acc = r if acc is None else acc + r
                out[b] = (acc / len(strands)).cpu().numpy()
        return out

    def _stream_pieces(self, seq: str, rid: str, piece: int, rc: bool, device: torch.device, bar) -> Iterator[torch.Tensor]:
        tok = self.tokenizer_
        n = len(seq)
        for start in range(0, n, piece):
            stop = min(n, start + piece)
            try:
                rows = [tok.encode(seq[start:stop], record_id=rid)]
                if rc:
                    rows.append(tok.encode(reverse_complement(seq[n - stop : n - start]), record_id=rid))
            except DataError as exc:
                raise DataError(f"{exc} (in the piece starting at bp {start})") from None
            if len(rows[0]) != stop - start:
                raise DataError(f"record {rid!r}: chunked inference needs one token per base")
            if bar is not None:
                bar.update(stop - start)
            yield torch.from_numpy(np.stack(rows)).to(device)

    def _stream_outputs(self, seqs: Sequence[str], ids: Sequence[str], want: str, rc: bool, piece: int) -> np.ndarray:
        device = self._torch_device()
        model = self._model_on(device)
        dim = model.feature_dim if want == "features" else model.n_classes
        out = np.zeros((len(seqs), dim), dtype=np.float64)
        total = sum(len(s) for s in seqs)
        show = self.enable_progress_bar and total > 8 * piece
        bar = tqdm(total=total, desc="long sequences", unit="bp", unit_scale=True, leave=False) if show else None
        try:
            with torch.inference_mode(), self._autocast(device):
                for i, (s, rid) in enumerate(zip(seqs, ids)):
                    feats = model.features_stream(self._stream_pieces(s, rid, piece, rc, device, bar))
                    r = feats if want == "features" else torch.softmax(model.head(feats).float(), dim=-1)
                    out[i] = r.double().mean(0).cpu().numpy()
        finally:
            if bar is not None:
                bar.close()
        return out

    def _outputs(self, X, want: str, rc: bool, piece_length: Optional[int] = None, stream_all: bool = False) -> np.ndarray:
        self._check_fitted()
        seqs, _, ids = self._read(X)
        piece = int(piece_length or self.piece_length)
        if piece < 1:
            raise ConfigError(f"piece_length must be >= 1, got {piece}")
        if stream_all:
            long_idx = list(range(len(seqs)))
        elif self.max_length is None:
            long_idx = [i for i, s in enumerate(seqs) if len(s) > piece]
        else:
            long_idx = []
        dim = self.model_.feature_dim if want == "features" else self.model_.n_classes
        out = np.zeros((len(seqs), dim), dtype=np.float64)
        is_long = np.zeros(len(seqs), dtype=bool)
        is_long[long_idx] = True
        short = np.flatnonzero(~is_long)
        if len(short):
            tokens = self._tokenize([seqs[i] for i in short], [ids[i] for i in short])
            out[short] = self._short_outputs(tokens, want, rc, "predict")
        if long_idx:
            out[long_idx] = self._stream_outputs([seqs[i] for i in long_idx], [ids[i] for i in long_idx], want, rc, piece)
        if want != "features":
            out /= out.sum(axis=1, keepdims=True)
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``[n_sequences, n_classes]`` (columns follow ``classes_``).

        With ``rc_average`` the probabilities of each sequence and its reverse complement are
        averaged. Sequences longer than ``piece_length`` (when ``max_length`` is None) run in
        pieces with the carried memory state (LMM variant).
        """
        return self._outputs(X, "proba", bool(self.rc_average))

    def predict(self, X) -> np.ndarray:
        """Predicted labels (elements of ``classes_``)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def decision_function(self, X) -> np.ndarray:
        """Binary: ``log p(classes_[1]) - log p(classes_[0])`` ``[n]``; multiclass: log-probabilities ``[n, C]``."""
        logp = np.log(np.clip(self.predict_proba(X), 1e-300, None))
        return logp[:, 1] - logp[:, 0] if logp.shape[1] == 2 else logp

    def score(self, X, y=None, sample_weight=None) -> float:
        """Accuracy; labels from ``y`` or, when None, from the DataFrame label column / FASTA dict keys."""
        from sklearn.metrics import accuracy_score

        if y is None:
            _, y, _ = self._read(X, None, need_labels=True)
        return float(accuracy_score(_as_label_array(y), self.predict(X), sample_weight=sample_weight))

    def predict_proba_long(self, X, piece_length: Optional[int] = None) -> np.ndarray:
        """Like :meth:`predict_proba`, but every sequence runs in pieces of ``piece_length`` bp with
        the carried memory state: constant memory in the sequence length (any variant). No
        truncation."""
        return self._outputs(X, "proba", bool(self.rc_average), piece_length, stream_all=True)

    def predict_long(self, X, piece_length: Optional[int] = None) -> np.ndarray:
        """Labels from :meth:`predict_proba_long`."""
        proba = self.predict_proba_long(X, piece_length)
        return self.classes_[np.argmax(proba, axis=1)]

    def embed(self, X, piece_length: Optional[int] = None, rc_average: bool = False, chunked: bool = False) -> np.ndarray:
        """Pooled sequence embeddings ``[n, feature_dim]`` (the head's input).

        ``chunked=True`` runs every sequence in pieces with the carried state;
        otherwise only sequences longer than ``piece_length`` do (when ``max_length`` is None).
        ``rc_average`` averages the embeddings of both strands.
        """
        return self._outputs(X, "features", rc_average, piece_length, stream_all=chunked)

    # -----------------------------------------------------------------------------------------
    # persistence
    def save(self, path) -> Path:
        """Write ``model.safetensors`` (weights) and ``config.json`` (parameters, classes, backbone
        configuration, history) into the directory ``path``. No pickle. Returns the directory."""
        self._check_fitted()
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        params = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in self.get_params().items()}
        classes = self.classes_
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "params": params,
            "classes": [c.item() if hasattr(c, "item") else c for c in classes.tolist()],
            "classes_dtype": classes.dtype.str if classes.dtype != object else "object",
            "backbone": self.backbone_config_.to_dict(),
            "tokenizer": {"k": self.tokenizer_.k, "stride": self.tokenizer_.stride,
                          "iupac": self.tokenizer_.iupac, "unknown": self.tokenizer_.unknown},
            "history": getattr(self, "history_", []),
            "best_val_loss": _finite_or_none(getattr(self, "best_val_loss_", None)),
            "n_epochs": getattr(self, "n_epochs_", None),
            "train_seconds": getattr(self, "train_seconds_", None),
        }
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model_.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=str))
        return out

    @classmethod
    def load(cls, path, **overrides) -> "TitansSequenceClassifier":
        """Load a model saved by :meth:`save`. ``overrides`` replace saved parameters that do not
        change the network (e.g. ``device="cpu"``, ``predict_batch_size=...``)."""
        from safetensors.torch import load_file

        d = Path(path)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not d.is_dir() or not cfg_path.is_file() or not w_path.is_file():
            raise CheckpointError(f"{d} is not a saved TitansSequenceClassifier (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            meta = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{cfg_path} is not a {FORMAT} config")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{cfg_path} has format version {meta['format_version']}; this library reads <= {FORMAT_VERSION}")
        known = set(cls().get_params())
        params = {k: v for k, v in meta["params"].items() if k in known}
        params.update(overrides)
        est = cls(**params)
        dtype = meta.get("classes_dtype", "object")
        est.classes_ = np.array(meta["classes"], dtype=object if dtype == "object" else np.dtype(dtype))
        est.backbone_config_ = TitansConfig.from_dict(meta["backbone"])
        est.tokenizer_ = NucleotideTokenizer(**meta.get("tokenizer", {}))
        net = TitansSequenceNetwork(
            est.backbone_config_, len(est.classes_), vocab_size=est.tokenizer_.vocab_size, pad_id=PAD_ID,
            pooling=params.get("pooling", "mean"), head_dropout=float(params.get("dropout", 0.0)),
        )
        try:
            net.load_state_dict(load_file(str(w_path), device="cpu"), strict=True)
        except Exception as exc:  # safetensors header errors, missing or mis-shaped tensors
            raise CheckpointError(f"cannot load weights from {w_path}: {exc}") from exc
        net.eval()
        est.model_ = net
        est.history_ = meta.get("history", [])
        bvl = meta.get("best_val_loss")
        est.best_val_loss_ = float("nan") if bvl is None else float(bvl)
        est.n_epochs_ = meta.get("n_epochs")
        est.train_seconds_ = meta.get("train_seconds")
        return est


def _finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


__all__ = ["TitansSequenceClassifier"]
