"""The shared Lightning training loop and the synthetic associative-recall example."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from titans_memory import ConfigError
from titans_memory.training import TrainingConfig, fit_module


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.05 * torch.randn(n, 1, generator=g)
    return TensorDataset(x[: n * 3 // 4], y[: n * 3 // 4]), TensorDataset(x[n * 3 // 4 :], y[n * 3 // 4 :])


def _mse(net, batch):
    return nn.functional.mse_loss(net(batch[0]), batch[1])


def _val_loss(net, val):
    with torch.no_grad():
        return _mse(net, val.tensors).item()


def quiet(**kw):
    return TrainingConfig(enable_progress_bar=False, seed=0, batch_size=16, **kw)


def test_fit_reduces_loss_and_restores_best_epoch():
    train, val = _data()
    net = nn.Linear(6, 1)
    before = _val_loss(net, val)
    result = fit_module(net, _mse, train, val, quiet(max_epochs=8, learning_rate=0.05))
    after = _val_loss(net, val)
    assert after < before / 4
    assert len(result.history) == result.epochs == 8
    best = min(row["val_loss"] for row in result.history)
    assert result.best_val_loss == pytest.approx(best, rel=1e-5)
    assert after == pytest.approx(best, rel=1e-4)  # the restored weights are the best epoch's


def test_early_stopping_stops_on_plateau():
    train, val = _data()

    def flat(net, batch):  # a loss the weights cannot change: validation never improves
        return nn.functional.mse_loss(net(batch[0]) * 0.0, batch[1])

    result = fit_module(nn.Linear(6, 1), flat, train, val, quiet(max_epochs=50, early_stopping_patience=2))
    assert result.epochs == 3  # the first epoch sets the best, two more without improvement


def test_resume_continues_from_last_checkpoint(tmp_path):
    train, val = _data()
    cfg = dict(learning_rate=0.05, checkpoint_dir=str(tmp_path), resume=True)
    fit_module(nn.Linear(6, 1), _mse, train, val, quiet(max_epochs=3, **cfg))
    assert (tmp_path / "last.ckpt").exists()
    result = fit_module(nn.Linear(6, 1), _mse, train, val, quiet(max_epochs=5, **cfg))
    assert [row["epoch"] for row in result.history] == [3.0, 4.0]  # epochs 0-2 were not rerun


def test_non_finite_loss_is_an_error():
    train, val = _data()

    def bad(net, batch):
        return net(batch[0]).sum() * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite"):
        fit_module(nn.Linear(6, 1), bad, train, val, quiet(max_epochs=1))


def test_config_errors():
    with pytest.raises(ConfigError):
        TrainingConfig(max_epochs=0)
    with pytest.raises(ConfigError):
        TrainingConfig(scheduler="step")


def test_associative_recall_example_learns():
    """The examples/ script: the memory model learns to recall (loss falls well below chance)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from associative_recall import train

    losses = train("lmm", steps=160, n_pairs=4, batch=64, seed=0, log_every=0)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
