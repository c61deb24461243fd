"""``titans-genomics``: train a Titans DNA sequence classifier and predict from the command line.

Train from one FASTA file per class, or from a CSV with ``sequence`` and ``label`` columns::

    titans-genomics train --fasta oct4.fa:Oct4 mafk.fa:MafK --out model/ --epochs 5
    titans-genomics train --csv train.csv --val-csv dev.csv --out model/

Predict (a FASTA, or a CSV/TSV with a sequence column); writes a TSV with the record id, the
predicted label and one probability column per class, to stdout or ``-o``::

    titans-genomics predict model/ reads.fa -o predictions.tsv

User errors (missing files, malformed input, bad options) print one line on stderr and exit 1
(argparse usage errors exit 2); no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from titans_memory.errors import DataError, TitansError

PROG = "titans-genomics"


def _fasta_spec(text: str):
    path, sep, label = text.rpartition(":")
    if not sep or not path or not label:
        raise argparse.ArgumentTypeError(f"expected FILE:LABEL, got {text!r}")
    return path, label


def _read_table(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    name = p.name.lower()
    sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")) else ","
    try:
        return pd.read_csv(p, sep=sep)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {p} as a {'TSV' if sep == chr(9) else 'CSV'} table: {exc}") from None


def _is_table(path: str) -> bool:
    return Path(path).name.lower().endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz"))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a classifier and save it to a directory",
                       description="Train a TitansSequenceClassifier and save it (safetensors + JSON).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--fasta", nargs="+", type=_fasta_spec, metavar="FILE:LABEL",
                     help="one FASTA file per class, each as FILE:LABEL")
    src.add_argument("--csv", metavar="FILE", help="CSV/TSV with a sequence and a label column")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-csv", metavar="FILE", help="validation CSV/TSV (default: --val-size of the training data)")
    val.add_argument("--val-fasta", nargs="+", type=_fasta_spec, metavar="FILE:LABEL", help="validation FASTA files")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="directory to save the model in")
    p.add_argument("--sequence-col", default="sequence")
    p.add_argument("--label-col", default="label")
    g = p.add_argument_group("model")
    g.add_argument("--variant", default="lmm", choices=["lmm", "mac", "mag", "mal"])
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--n-layers", type=int, default=2)
    g.add_argument("--n-heads", type=int, default=4)
    g.add_argument("--memory-depth", type=int, default=2)
    g.add_argument("--memory-expansion", type=int, default=2)
    g.add_argument("--chunk-size", type=int, default=32)
    g.add_argument("--ffn-mult", type=int, default=2)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--pooling", default="mean", choices=["mean", "last", "mean+last"])
    g.add_argument("--max-length", type=int, default=None, help="cut longer sequences to this many bp")
    g.add_argument("--no-rc-augment", action="store_true", help="no reverse-complement augmentation")
    g.add_argument("--no-rc-average", action="store_true", help="no strand averaging at prediction")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--val-size", type=float, default=0.1)
    t.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs")
    t.add_argument("--class-weight", choices=["balanced"], default=None)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict labels with a saved model, as TSV",
                       description="Predict with a saved model. Output TSV columns: id, predicted_label, "
                                   "prob_<class> for each class.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("input", metavar="INPUT", help="FASTA (.fa/.fasta/.fna, optionally .gz) or CSV/TSV with a sequence column")
    p.add_argument("-o", "--output", default=None, help="output TSV (default: stdout)")
    p.add_argument("--sequence-col", default=None, help="sequence column of a CSV/TSV input")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per inference batch")
    p.add_argument("--piece-length", type=int, default=None,
                   help="bp per piece for chunked inference of long sequences (LMM models)")
    p.add_argument("--long", action="store_true",
                   help="run every sequence in pieces with the carried memory state (constant memory)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: as saved)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Titans neural-memory DNA sequence classification.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,predict}")
    _add_train(sub)
    _add_predict(sub)
    return parser


def _train(args) -> int:
    from .classifier import TitansSequenceClassifier

    clf = TitansSequenceClassifier(
        variant=args.variant, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        memory_depth=args.memory_depth, memory_expansion=args.memory_expansion, chunk_size=args.chunk_size,
        ffn_mult=args.ffn_mult, dropout=args.dropout, pooling=args.pooling, max_length=args.max_length,
        rc_augment=not args.no_rc_augment, rc_average=not args.no_rc_average, max_epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
        val_size=args.val_size, early_stopping_patience=args.patience, class_weight=args.class_weight,
        device=args.device, sequence_col=args.sequence_col, label_col=args.label_col,
        random_state=args.seed, enable_progress_bar=not args.quiet,
    )
    if args.fasta:
        X, y = [path for path, _ in args.fasta], [label for _, label in args.fasta]
    else:
        X, y = _read_table(args.csv), None
    X_val = y_val = None
    if args.val_csv:
        X_val = _read_table(args.val_csv)
    elif args.val_fasta:
        X_val, y_val = [path for path, _ in args.val_fasta], [label for _, label in args.val_fasta]
    clf.fit(X, y, X_val=X_val, y_val=y_val)
    out = clf.save(args.out)
    val = clf.best_val_loss_
    msg = f"saved model to {out} ({len(clf.classes_)} classes, {clf.n_epochs_} epochs"
    msg += f", best val loss {val:.4f})" if val == val else ")"
    print(msg, file=sys.stderr)
    return 0


def _predict(args) -> int:
    from .classifier import TitansSequenceClassifier

    overrides = {"enable_progress_bar": not args.quiet}
    if args.device:
        overrides["device"] = args.device
    if args.batch_size:
        overrides["predict_batch_size"] = args.batch_size
    if args.piece_length:
        overrides["piece_length"] = args.piece_length
    if args.sequence_col:
        overrides["sequence_col"] = args.sequence_col
    clf = TitansSequenceClassifier.load(args.model_dir, **overrides)
    src = args.input
    if _is_table(src):
        X = _read_table(src)
    else:
        if not Path(src).is_file():
            raise DataError(f"input file not found: {src}")
        X = Path(src)
    seqs, _, ids = clf._read(X)  # read once; record ids stay in error messages through the id column
    X = pd.DataFrame({"id": ids, clf.sequence_col: seqs})
    proba = clf.predict_proba_long(X) if args.long else clf.predict_proba(X)
    labels = clf.classes_[proba.argmax(axis=1)]
    table = pd.DataFrame({"id": ids, "predicted_label": labels})
    for j, c in enumerate(clf.classes_):
        table[f"prob_{c}"] = proba[:, j]
    if args.output:
        try:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(args.output, sep="\t", index=False, float_format="%.6g")
        except OSError as exc:
            raise DataError(f"cannot write {args.output}: {exc}") from None
    else:
        table.to_csv(sys.stdout, sep="\t", index=False, float_format="%.6g")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``titans-genomics`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return _train(args) if args.command == "train" else _predict(args)
    except TitansError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
