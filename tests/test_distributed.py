"""Data-parallel training on CPU: 2 processes (gloo, ``strategy="ddp"``) against 1 process.

Each fit runs in a fresh Python process started with ``subprocess`` (``strategy="ddp"`` then
launches the second rank by re-running the same command, as it does for any script; nothing is
spawned from inside pytest). Real data: ETTh1, z-scored.

1. :func:`titans_memory.training.fit_module` with the same data, seed and effective batch
   (1 x 32 vs 2 x 16; each rank reads every other window, so that the union of the two
   per-rank batches is the single-process batch): the weights after two epochs agree to
   ``1e-4`` (float32 reduction order only), the validation losses to ``1e-5`` relative, and the
   best-epoch weights restored at the end are the same on both ranks.
2. :class:`titans_ts.TitansForecaster` with ``devices=2, strategy="ddp"`` (Lightning's shuffled
   ``DistributedSampler``, so the batches differ from the single-process run): both ranks end with
   the same weights and the validation loss is within 15% of the single-process one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("TITANS_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np, pandas as pd, torch
    from torch.utils.data import DataLoader, Dataset
    from torch.utils.data.distributed import DistributedSampler

    class Windows(Dataset):
        def __init__(self, arr, starts, L, H):
            self.a, self.s, self.L, self.H = arr, starts, L, H
        def __len__(self):
            return len(self.s)
        def __getitem__(self, i):
            w = self.a[self.s[i] : self.s[i] + self.L + self.H]
            return {"x": w[: self.L, :, None], "y": w[self.L :]}

    def fit_module_run(devices, data, out):
        from titans_memory import MemoryConfig, TitansConfig
        from titans_memory.training import TrainingConfig, fit_module
        from titans_ts.module import ForecastLoss, TitansForecastNetwork
        import lightning.pytorch as pl
        v = pd.read_csv(data).iloc[:1200, 1:].to_numpy(np.float32)
        arr = torch.from_numpy((v - v.mean(0)) / v.std(0))
        L, H, rank = 48, 24, int(os.environ.get("LOCAL_RANK", 0))
        train = Windows(arr, list(range(0, 128 * 6, 6)), L, H)
        val = Windows(arr, list(range(800, 1100, 10)), L, H)
        bs = 32 // devices
        # every other window per rank: rank r's k-th batch + the other rank's = single batch k
        sampler = DistributedSampler(train, num_replicas=devices, rank=rank, shuffle=False)
        torch.manual_seed(0)
        net = TitansForecastNetwork(L, H, 1, 7, TitansConfig(d_model=16, n_layers=1, n_heads=2,
            memory=MemoryConfig(depth=1, chunk_size=4), ffn_mult=0, dropout=0.0), patch_len=8, stride=4)
        world = []
        class World(pl.Callback):
            def on_train_start(self, trainer, module):
                world.append(trainer.world_size)
        cfg = TrainingConfig(max_epochs=2, batch_size=bs, seed=0, accelerator="cpu", devices=devices,
                             strategy="ddp" if devices > 1 else "auto", enable_progress_bar=False,
                             early_stopping_patience=None)
        res = fit_module(net, ForecastLoss("mse"), DataLoader(train, batch_size=bs, sampler=sampler),
                         DataLoader(val, batch_size=bs, shuffle=False), cfg, callbacks=[World()])
        torch.save(net.state_dict(), f"{out}.rank{rank}.pt")
        json.dump({"history": res.history, "best": res.best_val_loss, "world": world}, open(f"{out}.rank{rank}.json", "w"))

    def forecaster_run(devices, data, out):
        from titans_ts import TitansForecaster
        df = pd.read_csv(data, parse_dates=["date"]).iloc[:1000]
        rank = int(os.environ.get("LOCAL_RANK", 0))
        model = TitansForecaster(h=24, input_size=48, patch_len=8, stride=4, d_model=16, n_layers=1, n_heads=2,
                                 memory_depth=1, chunk_size=4, ffn_mult=0, dropout=0.0, max_epochs=2,
                                 batch_size=32 // devices, window_step=4, val_size=96, device="cpu",
                                 devices=devices, strategy="ddp" if devices > 1 else "auto",
                                 random_state=0, enable_progress_bar=False, early_stopping_patience=None)
        model.fit(df)
        torch.save(model.model_.state_dict(), f"{out}.rank{rank}.pt")
        json.dump({"best": model.best_val_loss_, "pred": model.predict()["TitansForecaster"].tolist()},
                  open(f"{out}.rank{rank}.json", "w"))

    if __name__ == "__main__":
        kind, devices, data, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
        {"fit_module": fit_module_run, "forecaster": forecaster_run}[kind](devices, data, out)
        if torch.distributed.is_initialized():  # tear gloo down before interpreter exit
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
''')


def _run(tmp_path: Path, kind: str, devices: int) -> Path:
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{kind}_{devices}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000 + devices),
           "PL_DISABLE_FORK": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR"):
        env.pop(key, None)
    data = SHARED_DATA / "ETT-small" / "ETTh1.csv.gz"
    if not data.is_file():
        pytest.fail(f"real test data not found at {data}; set TITANS_TEST_DATA")
    proc = subprocess.run([sys.executable, str(script), kind, str(devices), str(data), str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def _load(out: Path, rank: int):
    return torch.load(f"{out}.rank{rank}.pt"), json.loads(Path(f"{out}.rank{rank}.json").read_text())


def test_ddp_two_processes_match_one_process(tmp_path):
    single = _run(tmp_path, "fit_module", 1)
    ddp = _run(tmp_path, "fit_module", 2)
    w1, h1 = _load(single, 0)
    w2, h2 = _load(ddp, 0)
    w2b, h2b = _load(ddp, 1)
    assert h1["world"] == [1] and h2["world"] == [2] and h2b["world"] == [2]      # really 2 processes
    assert len(h1["history"]) == len(h2["history"]) == 2
    for a, b in zip(h1["history"], h2["history"]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert h2["best"] == pytest.approx(h1["best"], rel=1e-5)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff < 1e-4, f"DDP weights differ from single-process weights by {diff}"
    for k in w2:                                        # rank 1 restored rank 0's best weights
        assert torch.equal(w2[k], w2b[k])


def test_forecaster_ddp_fit(tmp_path):
    single = _run(tmp_path, "forecaster", 1)
    ddp = _run(tmp_path, "forecaster", 2)
    _, r1 = _load(single, 0)
    w0, r2 = _load(ddp, 0)
    w1, r2b = _load(ddp, 1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)                            # same model on both ranks
    assert r2["pred"] == r2b["pred"] and r2["best"] == pytest.approx(r2b["best"])
    assert r2["best"] == pytest.approx(r1["best"], rel=0.15)
