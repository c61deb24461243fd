"""Distributed training and tuning of TitansForecaster: DDP over N devices, Optuna over N workers.

(a) **Data-parallel training.** ETTm1, h = 96, look-back 96, TSLib split (train / val / test
borders, train-only z-scoring, as ``benchmarks/ltsf.py``): the same model is fit with
``devices=1`` and with ``devices=N, strategy="ddp"``, the *effective* batch equal (per-device
batch = batch / N, so both runs take the same number of optimiser steps on the same windows per
epoch), and each run reports its wall time (the fit, process launch included) and the test
MSE / MAE over every test window. Every run is a fresh process (``strategy="ddp"`` then starts
ranks 1..N-1 by re-running the same command, as Lightning does for any script).

(b) **Parallel tuning.** One Optuna study in one SQLite file; N worker processes (one per GPU
with ``CUDA_VISIBLE_DEVICES=i``; on CPU N processes) run the same :func:`titans_ts.tune` call on
it. The script checks the union of the workers' trials: trial numbers unique and contiguous,
every trial run by exactly one worker (none lost, none duplicated), and the study holding at
least ``--trials`` finished trials. For several nodes use a PostgreSQL URL (``--storage
postgresql+psycopg2://user:pw@host/db``) and start the workers on every node.

Usage::

    python benchmarks/distributed.py --devices 4                   # 4 GPUs, full settings
    python benchmarks/distributed.py --quick                       # CPU or 1 GPU, small settings
    python benchmarks/distributed.py --quick --devices 2 --accelerator cpu   # 2 CPU processes (gloo)
    python benchmarks/distributed.py --devices 8 --out-md benchmarks/RESULTS.md

``--out-md`` replaces (or appends) the ``## Distributed`` section of that file; rows also go to
``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET, HORIZON, INPUT_SIZE = "ETTm1", 96, 96
# the ETTm1 configuration of benchmarks/ltsf.py
MODEL = dict(input_size=INPUT_SIZE, patch_len=16, stride=8, d_model=64, n_layers=2, n_heads=4, ffn_mult=2,
             dropout=0.2, memory_depth=2, memory_expansion=2, chunk_size=16, loss="mse", scaler=None, freq=1,
             learning_rate=1e-3, early_stopping_patience=3, enable_progress_bar=False, eval_batch_size=1024)
QUICK_MODEL = dict(d_model=16, n_layers=1, n_heads=2, ffn_mult=0, memory_depth=1, chunk_size=4, window_step=16)


def _rank() -> int:
    return int(os.environ.get("NODE_RANK", 0)) * 1000 + int(os.environ.get("LOCAL_RANK", 0))


def _device_name(accelerator: str) -> str:
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def prepare(data_dir: Optional[str], quick: bool):
    """``(z-scored values [rows, 7], (train_end, val_end, test_start, test_end), columns)`` of ETTm1
    with the TSLib split: rows ``[0, train_end)`` train, ``[train_end, val_end)`` validation, test
    targets ``[test_start, test_end)`` (their look-back reaches ``INPUT_SIZE`` rows earlier).
    ``quick`` keeps the last 4000 train rows, the first 1000 validation rows and the first 1000
    test rows."""
    from titans_ts import datasets as tsdata
    from titans_ts.splits import split as tslib_split

    df = tsdata.load(DATASET, data_dir=data_dir)
    sp = tslib_split(df, DATASET, INPUT_SIZE)
    cols = list(sp.scaler.columns)
    values = sp.scaler.transform(df[cols].to_numpy(np.float64)).astype(np.float32)
    train_end, val_end, test_end = sp.borders.train[1], sp.borders.val[1], sp.borders.test[1]
    if not quick:
        return values, (train_end, val_end, val_end, test_end), cols
    head = values[train_end - 4000:train_end + 1000]
    test = values[val_end - INPUT_SIZE:val_end + 1000]
    return np.concatenate([head, test]), (4000, 5000, 5000 + INPUT_SIZE, 5000 + len(test)), cols


def training_frame(values: np.ndarray, val_end: int, cols: List[str]) -> pd.DataFrame:
    frame = pd.DataFrame(values[:val_end], columns=cols)
    frame.insert(0, "date", np.arange(val_end, dtype=np.int64))
    return frame


def evaluate(model, values: np.ndarray, test_start: int, test_end: int, stride: int) -> tuple:
    """MSE / MAE over the test windows (targets in ``[test_start, test_end)``, every ``stride``-th)."""
    starts = np.arange(test_start - INPUT_SIZE, test_end - INPUT_SIZE - HORIZON + 1, stride)
    sse = sae = 0.0
    count = 0
    for a in range(0, len(starts), 2048):
        idx = starts[a:a + 2048, None]
        x = values[idx + np.arange(INPUT_SIZE)]
        y = values[idx + INPUT_SIZE + np.arange(HORIZON)].astype(np.float64)
        p = model.predict_array(x)
        sse += float(((p - y) ** 2).sum())
        sae += float(np.abs(p - y).sum())
        count += y.size
    return sse / count, sae / count, len(starts)


# ------------------------------------------------------------------------------------------------
# workers (run in their own processes)
def worker_fit(args) -> None:
    from titans_ts import TitansForecaster

    values, (train_end, val_end, test_start, test_end), cols = prepare(args.data_dir, args.quick)
    n = args.devices
    if args.batch_size % n:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by --devices {n}")
    params = dict(MODEL, h=HORIZON, variant=args.variant, random_state=args.seed, max_epochs=args.max_epochs,
                  batch_size=args.batch_size // n, val_size=val_end - train_end, devices=n,
                  strategy=args.strategy if n > 1 else "auto",
                  device="cpu" if args.accelerator == "cpu" else ("gpu" if args.accelerator == "gpu" else "auto"))
    if args.quick:
        params.update(QUICK_MODEL)
    model = TitansForecaster(**params)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        model.fit(training_frame(values, val_end, cols), format="wide", time_col="date")
    fit_s = time.perf_counter() - t0
    if _rank() != 0:
        return
    mse, mae, n_windows = evaluate(model, values, test_start, test_end, args.test_stride)
    row = dict(devices=n, strategy=params["strategy"], per_device_batch=params["batch_size"],
               effective_batch=params["batch_size"] * n, epochs=model.n_epochs_, fit_seconds=round(fit_s, 2),
               train_seconds=round(model.train_seconds_, 2), best_val=round(model.best_val_loss_, 6),
               test_mse=round(mse, 6), test_mae=round(mae, 6), test_windows=n_windows,
               device=_device_name(args.accelerator))
    Path(args.result).write_text(json.dumps(row))
    print(json.dumps(row), flush=True)


def tune_space(quick: bool):
    from titans_ts.tuning import default_search_space

    if not quick:
        return default_search_space(INPUT_SIZE)

    def space(trial) -> Dict[str, Any]:
        return {"variant": trial.suggest_categorical("variant", ["lmm", "mag"]),
                "d_model": trial.suggest_categorical("d_model", [8, 16]),
                "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}

    return space


def worker_tune(args) -> None:
    import optuna

    from titans_ts import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    values, (train_end, val_end, _, _), cols = prepare(args.data_dir, args.quick)
    base = dict(MODEL, max_epochs=args.tune_epochs, batch_size=args.batch_size,
                device="cpu" if args.accelerator == "cpu" else "auto")
    base.pop("eval_batch_size")
    if args.quick:
        base.update(QUICK_MODEL)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        res = tune(training_frame(values, val_end, cols), h=HORIZON, n_trials=args.trials, storage=args.storage,
                   study_name=args.study_name, search_space=tune_space(args.quick), val_size=val_end - train_end,
                   base_params=base, refit=False, seed=args.seed, format="wide", time_col="date")
    out = dict(worker=args.worker_index, trials=res.trials_run, seconds=round(time.perf_counter() - t0, 2),
               cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    Path(args.result).write_text(json.dumps(out))
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------
# orchestration
def _worker_cmd(args, kind: str, extra: List[str]) -> List[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--variant", args.variant,
           "--seed", str(args.seed), "--max-epochs", str(args.max_epochs), "--batch-size", str(args.batch_size),
           "--accelerator", args.accelerator, "--strategy", args.strategy, "--test-stride", str(args.test_stride),
           "--tune-epochs", str(args.tune_epochs), "--trials", str(args.trials)]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    if args.quick:
        cmd.append("--quick")
    return cmd + extra


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def run_fits(args, tmp: Path) -> List[dict]:
    rows = []
    for n in sorted({1, args.devices}):
        result = tmp / f"fit_{n}.json"
        cmd = _worker_cmd(args, "fit", ["--devices", str(n), "--result", str(result)])
        print(f"[fit] devices={n}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(), cwd=str(tmp), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result.is_file():
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"the devices={n} fit failed (exit {proc.returncode})")
        row = json.loads(result.read_text())
        row["process_seconds"] = round(wall, 2)
        rows.append(row)
    return rows


def run_tuning(args, tmp: Path) -> dict:
    import optuna

    from titans_memory.tuning import create_study

    storage = args.storage or f"sqlite:///{tmp / 'study.db'}"
    name = args.study_name or f"distributed-{int(time.time())}"
    create_study(name, storage, load_if_exists=True)  # create the schema and the study once, up front
    gpus = torch.cuda.device_count() if args.accelerator != "cpu" else 0
    procs = []
    t0 = time.perf_counter()
    for i in range(args.workers):
        result = tmp / f"tune_{i}.json"
        extra = {"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else {"CUDA_VISIBLE_DEVICES": ""}
        if not gpus:
            extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
        cmd = _worker_cmd(args, "tune", ["--storage", storage, "--study-name", name, "--result", str(result),
                                         "--worker-index", str(i)])
        procs.append((i, result, subprocess.Popen(cmd, env=_env(extra), cwd=str(tmp), stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True)))
    workers = []
    for i, result, p in procs:
        out, _ = p.communicate()
        if p.returncode != 0 or not result.is_file():
            print(out[-6000:], file=sys.stderr)
            raise SystemExit(f"tuning worker {i} failed (exit {p.returncode})")
        workers.append(json.loads(result.read_text()))
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    ran = [n for w in workers for n in w["trials"]]
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in trials if t.state in finished_states]
    check = {
        "unique_numbers": len(numbers) == len(set(numbers)),
        "contiguous_numbers": sorted(numbers) == list(range(len(numbers))),
        "none_duplicated": len(ran) == len(set(ran)),
        "none_lost": sorted(ran) == sorted(numbers),
        "reached_n_trials": len(finished) >= args.trials,
    }
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return dict(workers=args.workers, trials_requested=args.trials, trials_total=len(trials), finished=len(finished),
                complete=len(complete), pruned=len(finished) - len(complete),
                failed=sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
                per_worker=[len(w["trials"]) for w in workers], seconds=round(wall, 2), storage=storage.split("://")[0],
                best_value=None if best is None else round(best.value, 6),
                best_params=None if best is None else best.params, ok=all(check.values()), checks=check,
                device=_device_name(args.accelerator))


def markdown(fits: List[dict], tuning: Optional[dict], args) -> str:
    lines = ["## Distributed", "",
             f"Produced by `python benchmarks/distributed.py {' '.join(args.argv)}` on {_dt.date.today().isoformat()}"
             + (" (quick settings: small model, 4000 train rows, 1000 val / test rows, every 16th window)" if args.quick else "")
             + ".", ""]
    if fits:
        lines += [f"(a) TitansForecaster, {DATASET} h={HORIZON}, look-back {INPUT_SIZE}, variant `{args.variant}`, "
                  f"max {args.max_epochs} epochs; the effective batch is the same in every row "
                  "(per-device batch x devices). Fit = wall time of `fit` (process launch and DDP set-up included); "
                  "test metrics on z-scored data" + (f", every {args.test_stride}th test window" if args.test_stride > 1 else
                                                     ", every test window") + ".", "",
                  "| devices | strategy | batch / device | epochs | fit s | speed-up | best val | test MSE | test MAE | device |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        base = next((r for r in fits if r["devices"] == 1), fits[0])
        for r in fits:
            lines.append(f"| {r['devices']} | {r['strategy']} | {r['per_device_batch']} | {r['epochs']} | "
                         f"{r['fit_seconds']:.1f} | {base['fit_seconds'] / r['fit_seconds']:.2f}x | {r['best_val']:.4f} | "
                         f"{r['test_mse']:.4f} | {r['test_mae']:.4f} | {r['device']} |")
        lines.append("")
    if tuning:
        t = tuning
        lines += [f"(b) One Optuna study ({t['storage']} storage), {t['workers']} worker processes running the same "
                  "`titans_ts.tune(...)`" + (" (one GPU each, `CUDA_VISIBLE_DEVICES`)" if "cpu" not in t["device"] else "")
                  + f", {args.tune_epochs} epoch(s) per trial.", "",
                  "| workers | trials asked | trials in study | complete | pruned | failed | per worker | unique numbers | lost | duplicated | wall s | best val |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: |",
                  f"| {t['workers']} | {t['trials_requested']} | {t['trials_total']} | {t['complete']} | {t['pruned']} | "
                  f"{t['failed']} | {'/'.join(map(str, t['per_worker']))} | {'yes' if t['checks']['unique_numbers'] else 'NO'} | "
                  f"{'none' if t['checks']['none_lost'] else 'SOME'} | {'none' if t['checks']['none_duplicated'] else 'SOME'} | "
                  f"{t['seconds']:.1f} | {t['best_value'] if t['best_value'] is not None else '-'} |", ""]
    return "\n".join(lines)


def write_md(path: Path, section: str) -> None:
    """Replace (or append) the ``## Distributed`` section of ``path``, keeping the rest."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Distributed"), None)
    body = section.rstrip().splitlines() + [""]
    if start is None:
        new = lines + ([""] if lines and lines[-1].strip() else []) + body
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = lines[:start] + body + lines[end:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(new).rstrip() + "\n", encoding="utf-8")


def parse_args(argv: Optional[List[str]] = None):
    gpus = torch.cuda.device_count()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=max(1, gpus), help="devices of the DDP run (default: all GPUs, or 1)")
    ap.add_argument("--workers", type=int, default=None, help="Optuna worker processes (default: --devices)")
    ap.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--strategy", default="ddp", help="Lightning strategy of the multi-device run")
    ap.add_argument("--data-dir", default=os.environ.get("TITANS_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--variant", default="lmm", choices=["lmm", "mac", "mag", "mal"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-epochs", type=int, default=None, help="epochs of (a) (default 10, quick 1)")
    ap.add_argument("--batch-size", type=int, default=256, help="effective batch of (a), per-trial batch of (b)")
    ap.add_argument("--test-stride", type=int, default=None, help="evaluate every k-th test window (default 1, quick 16)")
    ap.add_argument("--trials", type=int, default=None, help="finished trials the study must reach (default 4 x workers)")
    ap.add_argument("--tune-epochs", type=int, default=None, help="epochs per trial (default 3, quick 1)")
    ap.add_argument("--storage", default=None, help="Optuna storage URL (default: a fresh SQLite file)")
    ap.add_argument("--study-name", default=None)
    ap.add_argument("--quick", action="store_true", help="small settings that run on CPU in a few minutes")
    ap.add_argument("--skip-fit", action="store_true", help="only (b)")
    ap.add_argument("--skip-tune", action="store_true", help="only (a)")
    ap.add_argument("--out-md", nargs="?", const=str(ROOT / "benchmarks" / "RESULTS.md"), default=None,
                    help="write the '## Distributed' section into this file (default benchmarks/RESULTS.md)")
    ap.add_argument("--out-json", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    # internal: one worker process
    ap.add_argument("--worker", choices=["fit", "tune"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.data_dir = str(Path(args.data_dir).resolve())  # the worker processes run in a temporary folder
    args.workers = args.workers or args.devices
    args.max_epochs = args.max_epochs or (1 if args.quick else 10)
    args.tune_epochs = args.tune_epochs or (1 if args.quick else 3)
    args.test_stride = args.test_stride or (16 if args.quick else 1)
    args.trials = args.trials or 4 * args.workers
    if args.quick and args.batch_size == 256:
        args.batch_size = 64
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker == "fit":
        worker_fit(args)
        return 0
    if args.worker == "tune":
        worker_tune(args)
        return 0
    if args.devices < 1 or args.workers < 1:
        raise SystemExit("--devices and --workers must be >= 1")
    if args.accelerator != "cpu" and torch.cuda.is_available() and args.devices > torch.cuda.device_count():
        raise SystemExit(f"--devices {args.devices} > {torch.cuda.device_count()} visible GPUs")
    fits, tuning = [], None
    with tempfile.TemporaryDirectory(prefix="titans-distributed-") as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_fit:
            fits = run_fits(args, tmp)
            print("\n| devices | batch/device | epochs | fit s | process s | best val | test MSE | test MAE |")
            for r in fits:
                print(f"| {r['devices']} | {r['per_device_batch']} | {r['epochs']} | {r['fit_seconds']:.1f} | "
                      f"{r['process_seconds']:.1f} | {r['best_val']:.4f} | {r['test_mse']:.4f} | {r['test_mae']:.4f} |")
        if not args.skip_tune:
            tuning = run_tuning(args, tmp)
            print(f"\nOptuna: {tuning['workers']} workers, {tuning['trials_total']} trials "
                  f"({tuning['complete']} complete, {tuning['pruned']} pruned, {tuning['failed']} failed), "
                  f"per worker {tuning['per_worker']}, {tuning['seconds']:.1f} s, best {tuning['best_value']}; "
                  f"checks {tuning['checks']} -> {'OK' if tuning['ok'] else 'FAILED'}")
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": _dt.date.today().isoformat(), "argv": args.argv, "fits": fits, "tuning": tuning},
                              indent=1, default=str))
    section = markdown(fits, tuning, args)
    print("\n" + section)
    if args.out_md:
        write_md(Path(args.out_md), section)
        print(f"wrote the '## Distributed' section of {args.out_md}")
    return 0 if (tuning is None or tuning["ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
