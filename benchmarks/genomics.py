#!/usr/bin/env python
"""DNA benchmark of TitansSequenceClassifier: GUE promoter / TF-binding tasks, Oct4 vs MafK, and
long-sequence (chunked, carried-state) inference.

Tasks (data under DATA_DIR, default ``$TITANS_DATA_DIR`` else ``../shared/data`` beside the repo):

- GUE (DNABERT-2 benchmark, ``DATA_DIR/GUE/<task>/{train,dev,test}.csv.gz``): prom_core_all,
  prom_core_notata, prom_core_tata, prom_300_tata, tf/0 .. tf/4. The dev split is the validation
  set (early stopping, best-epoch restore, and the choice among ``--lrs`` by dev MCC); the test
  split is evaluated once, with the selected model.
- Oct4 vs MafK ChIP-seq peaks straight from FASTA (``DATA_DIR/fasta``): train on sample.fa (Oct4)
  vs sample2.fa (MafK), test on sample_test.fa / sample2_test.fa; dev = a stratified 10 % of train.

Every model is trained from scratch (no pre-training) with the library's training loop (bf16 on
GPU). Defaults fit one H100 in about 8 minutes: ``--max-train`` caps the training rows per task
(stratified sample; shown in the table), epochs per task follow a token budget (``--train-tokens``:
small tasks get more passes, within ``--min-epochs``..``--epochs``), early stopping on dev, and
``--task-seconds`` caps each fit's training time. Results: ``benchmarks/results/genomics.csv`` (rows of the same task/model/variant/seed are
replaced), a markdown table on stdout beside published AUCs (Nature Communications 2025,
"Benchmarking DNA foundation models for genomic and genetic tasks", Table 1, mean-pooled
embeddings) and MCCs (DNABERT-2 paper, fine-tuned), and with ``--out-md`` a "## Genomics"
section in ``benchmarks/RESULTS.md`` (replaced if present, the rest of the file kept).

``--long`` measures chunked inference with the carried memory state on single 100 kbp and 1 Mbp
sequences (pseudo-genome, tiled where needed, or random): seconds, bp/s and peak GPU memory, which
stays flat in the length (lengths whose projected time exceeds ``--long-max-seconds`` are
skipped and marked). ``--long-only`` skips the classification tasks and uses an untrained LMM.

Typical run on one H100 (about 8 minutes in all)::

    python benchmarks/genomics.py --long --out-md benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

GUE_TASKS = {
    "prom_core_all": "prom/prom_core_all",
    "prom_core_notata": "prom/prom_core_notata",
    "prom_core_tata": "prom/prom_core_tata",
    "prom_300_tata": "prom/prom_300_tata",
    "tf_0": "tf/0",
    "tf_1": "tf/1",
    "tf_2": "tf/2",
    "tf_3": "tf/3",
    "tf_4": "tf/4",
}
ALL_TASKS = list(GUE_TASKS) + ["oct4_mafk"]

# Nature Communications 2025, "Benchmarking DNA foundation models for genomic and genetic tasks",
# Table 1 (AUC, mean-pooled embeddings): DNABERT-2 / NT-v2 / HyenaDNA / Caduceus-Ph / GROVER.
FOUNDATION = ["DNABERT-2", "NT-v2", "HyenaDNA", "Caduceus-Ph", "GROVER"]
AUC_PUBLISHED = {
    "prom_core_all": [0.831, 0.853, 0.832, 0.875, 0.851],
    "prom_core_notata": [0.853, 0.873, 0.852, 0.896, 0.870],
    "prom_core_tata": [0.778, 0.795, 0.783, 0.810, 0.796],
    "prom_300_tata": [0.765, 0.779, 0.808, 0.760, 0.780],
}
AUC_BEST = {**{k: max(v) for k, v in AUC_PUBLISHED.items()},
            "tf_0": 0.880, "tf_1": 0.869, "tf_2": 0.825, "tf_3": 0.773, "tf_4": 0.931}
# DNABERT-2 paper (ICLR 2024), GUE, fine-tuned, MCC x 100: best of DNABERT / NT / DNABERT-2 variants,
# and DNABERT-2 alone.
MCC_BEST = {"prom_core_all": 70.92, "prom_core_notata": 71.58, "prom_core_tata": 78.15, "prom_300_tata": 79.43,
            "tf_0": 71.99, "tf_1": 76.06, "tf_2": 66.52, "tf_3": 58.54, "tf_4": 77.43}
MCC_DNABERT2 = {"prom_core_all": 69.37, "prom_core_notata": 68.04, "prom_core_tata": 74.17, "prom_300_tata": 71.59,
                "tf_0": 71.99, "tf_1": 76.06, "tf_2": 66.52, "tf_3": 58.54, "tf_4": 77.43}

CSV_COLUMNS = ["task", "model", "variant", "accuracy", "mcc", "auc", "seed", "train_seconds", "device", "date"]
LONG_COLUMNS = ["length_bp", "source", "model", "piece_length", "strands", "seconds", "bp_per_s",
                "peak_gpu_mib", "device", "date"]


def default_data_dir() -> Path:
    for env in ("TITANS_DATA_DIR", "TITANS_TEST_DATA"):
        if os.environ.get(env):
            return Path(os.environ[env])
    return REPO.parent / "shared" / "data"


def device_name(device: str) -> str:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "cpu"


# ------------------------------------------------------------------------------------------ data
def _cap(df: pd.DataFrame, n: Optional[int], seed: int) -> pd.DataFrame:
    if not n or len(df) <= n:
        return df
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(df, train_size=n, stratify=df["label"], random_state=seed)
    return keep.reset_index(drop=True)


def load_task(name: str, data_dir: Path, max_train: Optional[int], seed: int):
    """``(train, dev, test, n_train_full)`` DataFrames with ``sequence`` and integer ``label``."""
    from titans_genomics.datasets import load_fasta_classes, load_gue

    if name in GUE_TASKS:
        task = GUE_TASKS[name]
        train, dev, test = (load_gue(task, s, data_dir=data_dir, download=False) for s in ("train", "dev", "test"))
    elif name == "oct4_mafk":
        fa = data_dir / "fasta"
        full = load_fasta_classes({1: fa / "sample.fa", 0: fa / "sample2.fa"})
        test = load_fasta_classes({1: fa / "sample_test.fa", 0: fa / "sample2_test.fa"})
        from sklearn.model_selection import train_test_split

        train, dev = train_test_split(full, test_size=0.1, stratify=full["label"], random_state=seed)
        train, dev = train.reset_index(drop=True), dev.reset_index(drop=True)
    else:
        raise SystemExit(f"unknown task {name!r}; choose from {', '.join(ALL_TASKS)}")
    n_full = len(train)
    return _cap(train, max_train, seed), dev, test, n_full


def metrics(y: np.ndarray, proba: np.ndarray) -> Dict[str, float]:
    from sklearn.metrics import accuracy_score, matthews_corrcoef, roc_auc_score

    pred = proba.argmax(1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "mcc": float(matthews_corrcoef(y, pred)),
        "auc": float(roc_auc_score(y, proba[:, 1])) if proba.shape[1] == 2 else float("nan"),
    }


# ----------------------------------------------------------------------------------------- models
def model_params(args) -> dict:
    return dict(
        variant=args.variant, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        memory_depth=args.memory_depth, memory_expansion=args.memory_expansion, chunk_size=args.chunk_size,
        ffn_mult=args.ffn_mult, dropout=args.dropout, max_epochs=args.epochs, batch_size=args.batch_size,
        warmup_steps=args.warmup, early_stopping_patience=args.patience, device=args.device,
        random_state=args.seed, enable_progress_bar=args.progress, piece_length=args.piece_length,
    )


def model_name(args) -> str:
    return (f"titans-{args.variant}-d{args.d_model}-L{args.n_layers}-h{args.n_heads}"
            f"-m{args.memory_depth}x{args.memory_expansion}-c{args.chunk_size}")


def _timer(seconds: Optional[float]):
    if not seconds:
        return []
    from lightning.pytorch.callbacks import Timer

    return [Timer(duration=_dt.timedelta(seconds=seconds), interval="step", verbose=False)]


def epochs_for(args, train: pd.DataFrame) -> int:
    """``--epochs``, or with ``--train-tokens`` the epochs that see about that many tokens
    (between ``--min-epochs`` and ``--epochs``): small tasks get more passes, large ones fewer."""
    if not args.train_tokens:
        return args.epochs
    tokens = float(train["sequence"].str.len().sum())
    return int(np.clip(round(args.train_tokens / max(tokens, 1.0)), args.min_epochs, args.epochs))


def memory_impl(clf) -> str:
    """Which neural-memory operator ``impl="auto"`` picks for this model (informational)."""
    dev = clf._torch_device()
    if dev.type != "cuda":
        return "torch (cpu)"
    try:
        from titans_memory import ops

        reason_fn = getattr(ops, "triton_unsupported_reason", None)
        if reason_fn is None:
            return "torch"
        mem = clf.model_.backbone.layers[0].mixer.memory
        cfg = clf.backbone_config_
        q = torch.zeros(1, cfg.n_heads, mem.config.chunk_size, cfg.head_dim, device=dev)
        weights = [w.detach().float().unsqueeze(0).to(dev) for w in mem.init_weights]
        reason = reason_fn(q, weights, mem.spec, mem.config.chunk_size, mem.config.max_update_norm)
        if reason is None and getattr(ops, "triton_available", lambda: False)():
            return "triton"
        return f"torch ({reason or 'triton unavailable'})"
    except Exception as exc:  # the operator API is optional here
        return f"unknown ({type(exc).__name__})"


def warm_up(args, train: pd.DataFrame) -> None:
    """One forward/backward pass on a few training sequences with a throwaway network of the same
    configuration, so that kernel compilation (Triton) is not counted in the timed, time-capped fit."""
    from titans_genomics import TitansSequenceClassifier
    from titans_genomics.tokenizer import NucleotideTokenizer

    clf = TitansSequenceClassifier(**model_params(args))
    device = clf._torch_device()
    if device.type != "cuda":
        return
    net = clf._init_network(clf._backbone_config(), 2).to(device)
    seqs = train["sequence"].iloc[:8].tolist()
    enc = NucleotideTokenizer().batch_encode(seqs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().sum()
    out.backward()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        net.eval()(enc["input_ids"].to(device), enc["attention_mask"].to(device))
    torch.cuda.synchronize()


def run_task(name: str, args, data_dir: Path) -> dict:
    from titans_genomics import TitansSequenceClassifier

    train, dev, test, n_full = load_task(name, data_dir, args.max_train, args.seed)
    epochs = epochs_for(args, train)
    small = len(train) < args.small_rows
    lrs = args.small_lrs if small else args.lrs
    batch = args.small_batch_size if small else args.batch_size
    patience = args.small_patience if small else args.patience
    warm_up(args, train)
    best = None
    for lr in lrs:
        clf = TitansSequenceClassifier(learning_rate=lr, **{**model_params(args), "max_epochs": epochs, "batch_size": batch,
                                                            "early_stopping_patience": patience})
        clf.fit(train["sequence"].tolist(), train["label"].to_numpy(), X_val=dev["sequence"].tolist(),
                y_val=dev["label"].to_numpy(), callbacks=_timer(args.task_seconds))
        dev_m = metrics(dev["label"].to_numpy(), clf.predict_proba(dev["sequence"].tolist()))
        print(f"  {name}: lr={lr:g} epochs={clf.n_epochs_} train {clf.train_seconds_:.1f}s "
              f"dev acc={dev_m['accuracy']:.3f} mcc={dev_m['mcc']:.3f} auc={dev_m['auc']:.3f}", flush=True)
        if best is None or dev_m["mcc"] > best[1]["mcc"]:
            best = (clf, dev_m, lr)
    clf, dev_m, lr = best
    t0 = time.perf_counter()
    test_m = metrics(test["label"].to_numpy(), clf.predict_proba(test["sequence"].tolist()))
    predict_s = time.perf_counter() - t0
    print(f"  {name}: TEST acc={test_m['accuracy']:.3f} mcc={test_m['mcc']:.3f} auc={test_m['auc']:.3f} "
          f"(predict {predict_s:.1f}s)", flush=True)
    row = {
        "task": name, "model": model_name(args), "variant": args.variant, **test_m, "seed": args.seed,
        "train_seconds": round(clf.train_seconds_, 1), "device": device_name(args.device),
        "date": _dt.date.today().isoformat(),
    }
    extra = {"n_train": len(train), "n_train_full": n_full, "epochs": clf.n_epochs_, "max_epochs": epochs, "lr": lr,
             "batch": batch, "lrs": lrs,
             "dev_mcc": dev_m["mcc"], "impl": memory_impl(clf)}
    return {"row": row, "extra": extra, "model": clf}


# -------------------------------------------------------------------------------------- long mode
def long_sequence(length: int, source: str, data_dir: Path, seed: int) -> str:
    if source == "random":
        return "".join(np.random.default_rng(seed).choice(list("ACGT"), length))
    from titans_genomics.fasta import FastaGenome

    genome = FastaGenome(data_dir / "fasta" / "pseudo_genome.fa")
    parts, total = [], 0
    while total < length:  # tile the records when the genome is shorter than the request
        for name in genome.names:
            s = genome.fetch_record(name)
            parts.append(s)
            total += len(s)
            if total >= length:
                break
    return "".join(parts)[:length]


def _untrained(args):
    """An LMM classifier with freshly initialised weights (speed and memory do not depend on them)."""
    from titans_genomics import TitansSequenceClassifier
    from titans_genomics.tokenizer import NucleotideTokenizer

    clf = TitansSequenceClassifier(**{**model_params(args), "variant": "lmm"})
    clf.classes_ = np.array([0, 1])
    clf.tokenizer_ = NucleotideTokenizer(k=1)
    clf.backbone_config_ = clf._backbone_config()
    clf.model_ = clf._init_network(clf.backbone_config_, 2).eval()
    return clf, model_name(args).replace(f"titans-{args.variant}", "titans-lmm") + " (untrained)"


def run_long(args, data_dir: Path, trained=None) -> List[dict]:
    clf, name = (trained, model_name(args)) if trained is not None else _untrained(args)
    cuda = clf._torch_device().type == "cuda"
    piece = args.piece_length
    rows = []
    rate = None
    for length in sorted(args.long_lengths):
        if rate and args.long_max_seconds and length / rate > args.long_max_seconds:
            print(f"  long {length:,} bp: skipped, projected {length / rate:.0f}s > --long-max-seconds "
                  f"{args.long_max_seconds:g}", flush=True)
            rows.append({"length_bp": length, "source": args.long_source, "model": name, "piece_length": piece,
                         "strands": 2 if clf.rc_average else 1, "seconds": float("nan"), "bp_per_s": float("nan"),
                         "peak_gpu_mib": float("nan"), "device": device_name(args.device),
                         "date": _dt.date.today().isoformat(), "skipped": round(length / rate)})
            continue
        seq = long_sequence(length, args.long_source, data_dir, args.seed)
        # warm-up on a prefix with the same piece shapes (one full piece and the same remainder):
        # kernel compilation and allocator growth are not timed
        clf.predict_proba_long([seq[: min(length, piece + length % piece)]], piece_length=piece)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        proba = clf.predict_proba_long([seq], piece_length=piece)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
        assert np.isfinite(proba).all()
        rate = length / dt
        rows.append({
            "length_bp": length, "source": args.long_source, "model": name, "piece_length": piece,
            "strands": 2 if clf.rc_average else 1, "seconds": round(dt, 2), "bp_per_s": round(length / dt),
            "peak_gpu_mib": round(peak, 1) if cuda else float("nan"), "device": device_name(args.device),
            "date": _dt.date.today().isoformat(), "impl": memory_impl(clf),
        })
        print(f"  long {length:,} bp: {dt:.1f}s, {length / dt:,.0f} bp/s, peak GPU {peak:.0f} MiB", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- outputs
def _merge_csv(path: Path, rows: List[dict], columns: List[str], keys: List[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = pd.DataFrame(rows, columns=columns)
    if path.is_file():
        old = pd.read_csv(path)
        if list(old.columns) == columns:
            k_new = set(map(tuple, new[keys].astype(str).to_numpy()))
            old = old[[tuple(r) not in k_new for r in old[keys].astype(str).to_numpy()]]
            new = pd.concat([old, new], ignore_index=True)
    new.to_csv(path, index=False)


def _f(x, fmt="{:.3f}") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def markdown(results: List[dict], long_rows: List[dict], args) -> str:
    lines = ["## Genomics", ""]
    if results:
        r0 = results[0]["row"]
        lines += [
            f"TitansSequenceClassifier `{r0['model']}` trained from scratch per task (no pre-training), "
            f"seed {args.seed}, on {r0['device']}, {r0['date']}; memory operator {results[0]['extra']['impl']}; "
            + (f"epochs per task from a budget of {args.train_tokens:,.0f} training tokens ({args.min_epochs}-{args.epochs}), "
               if args.train_tokens else f"up to {args.epochs} epochs, ")
            + f"batch {args.batch_size} and learning rate{'s' if len(args.lrs) > 1 else ''} "
            f"{', '.join(f'{x:g}' for x in args.lrs)}; tasks under {args.small_rows:,} training rows: batch "
            f"{args.small_batch_size}, learning rates {', '.join(f'{x:g}' for x in args.small_lrs)} and early-stopping "
            f"patience {args.small_patience}; "
            "reverse-complement augmentation and strand-averaged prediction. Model selection on dev "
            f"(early stopping, patience {args.patience} unless stated, and best epoch by dev loss; where several learning "
            "rates are listed, the one with the best dev MCC, shown in the `lr` column); test evaluated once. "
            "Oct4/MafK: dev = 10 % of train."
            + (f" Training rows capped at {args.max_train:,} per task (stratified sample; `n train` shows used/full)."
               if args.max_train else "")
            + (f" Training time capped at {args.task_seconds:g} s per fit (kernel compilation is done before, untimed)."
               if args.task_seconds else ""),
            "",
            "Published: AUC of DNABERT-2 / NT-v2 / HyenaDNA / Caduceus-Ph / GROVER from Nature Communications 2025 "
            "(\"Benchmarking DNA foundation models\", Table 1, mean-pooled embeddings; TF tasks: best of the five only); "
            "MCC x 100 fine-tuned, best of DNABERT / NT / DNABERT-2 variants and DNABERT-2 alone (DNABERT-2 paper, GUE). "
            "Target: AUC above the best of the five foundation models. Caveat: those AUCs were obtained from "
            "mean-pooled embeddings of the pre-trained models, not from end-to-end training on each task as here; "
            "the fine-tuned MCC column is the stricter comparison.",
            "",
            "| task | n train | epochs | lr | acc | MCC x100 | AUC | AUC DNABERT-2 / NT-v2 / HyenaDNA / Caduceus-Ph / GROVER | best AUC | target | MCC best (DNABERT-2) | train s (selected fit) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        met = 0
        scored = 0
        for res in results:
            r, e = res["row"], res["extra"]
            t = r["task"]
            pub = AUC_PUBLISHED.get(t)
            pub_s = " / ".join(f"{v:.3f}" for v in pub) if pub else ("— (best only)" if t in AUC_BEST else "—")
            best = AUC_BEST.get(t)
            if best is not None:
                scored += 1
                ok = r["auc"] > best
                met += ok
                target = "met" if ok else "missed"
            else:
                target = "n/a"
            mcc_pub = f"{MCC_BEST[t]:.2f} ({MCC_DNABERT2[t]:.2f})" if t in MCC_BEST else "—"
            n_train = f"{e['n_train']:,}" + (f"/{e['n_train_full']:,}" if e["n_train"] != e["n_train_full"] else "")
            lines.append(
                f"| {t} | {n_train} | {e['epochs']} | {e['lr']:g} | {_f(r['accuracy'])} | {_f(100 * r['mcc'], '{:.2f}')} | {_f(r['auc'])} | {pub_s} | "
                f"{_f(best)} | {target} | {mcc_pub} | {r['train_seconds']:.0f} |"
            )
        lines += ["", f"AUC target met on {met} of {scored} tasks with published AUCs."]
    if long_rows:
        lines += [
            "",
            "Long sequences: one sequence at a time, cut into pieces with the memory state carried between them "
            "(`predict_proba_long`, here the benchmark's LMM model; both strands as a batch of two when strand averaging is on). "
            "Peak GPU memory is independent of the length. Memory operator: "
            + ", ".join(sorted({r.get("impl", "?") for r in long_rows if "impl" in r})) + ".",
            "",
            "| length (bp) | source | model | piece (bp) | strands | seconds | bp/s | peak GPU MiB | device |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in long_rows:
            if "skipped" in r:
                lines.append(f"| {r['length_bp']:,} | {r['source']} | {r['model']} | {r['piece_length']:,} | {r['strands']} | "
                             f"skipped (projected {r['skipped']:,} s > --long-max-seconds) | — | — | {r['device']} |")
                continue
            lines.append(
                f"| {r['length_bp']:,} | {r['source']} | {r['model']} | {r['piece_length']:,} | {r['strands']} | "
                f"{r['seconds']:.1f} | {r['bp_per_s']:,} | {_f(r['peak_gpu_mib'], '{:.0f}')} | {r['device']} |"
            )
    lines.append("")
    return "\n".join(lines)


def write_section(md_path: Path, section: str) -> None:
    """Replace the ``## Genomics`` section of ``md_path`` (or append it), keeping the rest."""
    text = md_path.read_text() if md_path.is_file() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Genomics"), None)
    if start is None:
        out = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        before = "\n".join(lines[:start]).rstrip("\n")
        after = "\n".join(lines[end:])
        out = (before + "\n\n" if before else "") + section.rstrip("\n") + "\n" + ("\n" + after + "\n" if after else "")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(out)


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None, help="root with GUE/ and fasta/ (default: $TITANS_DATA_DIR or ../shared/data)")
    p.add_argument("--tasks", default="all", help=f"comma list from {', '.join(ALL_TASKS)} (default all)")
    p.add_argument("--max-train", type=int, default=0, help="cap on training rows per task (0: none)")
    p.add_argument("--task-seconds", type=float, default=45.0, help="training-time cap per fit in seconds (0: none)")
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs per task")
    p.add_argument("--min-epochs", type=int, default=3)
    p.add_argument("--train-tokens", type=float, default=2e7,
                   help="epochs per task = this many training tokens / task tokens, within [--min-epochs, --epochs] (0: --epochs)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lrs", default="2e-3", help="comma list of learning rates, chosen by dev MCC")
    p.add_argument("--small-rows", type=int, default=6000,
                   help="tasks with fewer training rows use --small-batch-size and --small-lrs")
    p.add_argument("--small-batch-size", type=int, default=64)
    p.add_argument("--small-lrs", default="1e-3,5e-3", help="learning rates tried on small tasks, chosen by dev MCC")
    p.add_argument("--small-patience", type=int, default=8,
                   help="early-stopping patience on small tasks (their loss can sit on a plateau for several epochs)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--variant", default="lmm", choices=["lmm", "mac", "mag", "mal"])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--memory-depth", type=int, default=2)
    p.add_argument("--memory-expansion", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--ffn-mult", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    p.add_argument("--long", action="store_true", help="also run the long-sequence inference measurement")
    p.add_argument("--long-only", action="store_true", help="only the long-sequence measurement")
    p.add_argument("--long-lengths", default="100000,1000000")
    p.add_argument("--long-source", default="pseudo", choices=["pseudo", "random"])
    p.add_argument("--long-max-seconds", type=float, default=60.0,
                   help="skip a long length whose time, projected from the shorter ones, exceeds this (0: never)")
    p.add_argument("--piece-length", type=int, default=16384, help="bp per piece in chunked inference")
    p.add_argument("--out-csv", type=Path, default=REPO / "benchmarks" / "results" / "genomics.csv")
    p.add_argument("--out-long-csv", type=Path, default=REPO / "benchmarks" / "results" / "genomics_long.csv")
    p.add_argument("--out-md", type=Path, default=None, help="write the '## Genomics' section into this markdown file")
    args = p.parse_args(argv)
    args.lrs = [float(x) for x in args.lrs.split(",") if x]
    args.small_lrs = [float(x) for x in args.small_lrs.split(",") if x]
    args.long_lengths = [int(float(x)) for x in args.long_lengths.split(",") if x]
    args.tasks = ALL_TASKS if args.tasks == "all" else [t.strip().replace("/", "_") for t in args.tasks.split(",") if t.strip()]
    args.max_train = args.max_train or None
    args.task_seconds = args.task_seconds or None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    if not data_dir.is_dir():
        print(f"data directory {data_dir} not found (set --data-dir or TITANS_DATA_DIR)", file=sys.stderr)
        return 1
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    results, last_lmm = [], None
    if not args.long_only:
        for name in args.tasks:
            print(f"[{time.perf_counter() - start:6.0f}s] {name}", flush=True)
            res = run_task(name, args, data_dir)
            results.append(res)
            if args.variant == "lmm":
                last_lmm = res.pop("model")
            else:
                res.pop("model")
            # saved after every task, so an interrupted run keeps what it finished
            _merge_csv(args.out_csv, [res["row"]], CSV_COLUMNS, ["task", "model", "variant", "seed"])
    long_rows = []
    if args.long or args.long_only:
        print(f"[{time.perf_counter() - start:6.0f}s] long-sequence inference", flush=True)
        long_rows = run_long(args, data_dir, last_lmm)
        _merge_csv(args.out_long_csv, [r for r in long_rows if "skipped" not in r], LONG_COLUMNS, ["length_bp", "source", "model", "piece_length", "device"])
    section = markdown(results, long_rows, args)
    print()
    print(section)
    if args.out_md:
        write_section(args.out_md, section)
        print(f"wrote the Genomics section of {args.out_md}")
    print(f"total {time.perf_counter() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
