"""What the persistent drivers do with a head-barrier failure count (``check`` of
:mod:`titans_memory.ops.triton_tiled`, policies in :mod:`titans_memory.ops.barrier_check`): with
``check="async"`` (the default, no host sync) a failed call's outputs are NaN and the next call
raises :class:`BarrierTimeout`; with ``check=True`` the call itself raises. Failures are injected
by raising the count the kernels report (a real barrier cannot time out under the interpreter,
which runs one tile per head). On the CPU and, where there is one, on the GPU."""

import pytest
import torch

import titans_memory.ops.triton_tiled as tt
from titans_memory.errors import BarrierTimeout, ConfigError
from titans_memory.ops import barrier_check as bc
from titans_memory.ops.mlp import MemoryMLPSpec

from test_triton_tiled import CHUNK, make_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _no_pending():
    bc._PENDING.clear()
    tt.clear_backward_graphs()
    yield
    bc._PENDING.clear()
    tt.clear_backward_graphs()


@pytest.mark.parametrize("device", DEVICES)
def test_async_check_poisons_then_raises_at_the_next_call(device):
    out = [torch.randn(3, 4, device=device), torch.randn(5, device=device)]
    kept = [t.clone() for t in out]
    bc.apply_check("async", torch.zeros(1, dtype=torch.int32, device=device), out)  # no failure: untouched
    assert all(torch.equal(a, b) for a, b in zip(out, kept))
    bc.apply_check("async", torch.tensor([3], dtype=torch.int32, device=device), out)  # no raise yet
    assert all(torch.isnan(t).all() for t in out)
    if device == "cuda":
        torch.cuda.synchronize()
    with pytest.raises(BarrierTimeout, match="3 head barrier.*earlier call"):
        bc.apply_check("async", torch.zeros(1, dtype=torch.int32, device=device), [torch.ones(2, device=device)])
    bc.raise_pending_barrier_timeouts(wait=True)  # reported once, then gone
    assert not bc._PENDING


@pytest.mark.parametrize("device", DEVICES)
def test_sync_check_raises_in_the_call_and_false_ignores(device):
    err = torch.tensor([2], dtype=torch.int32, device=device)
    with pytest.raises(BarrierTimeout, match="2 head barrier"):
        bc.apply_check(True, err, [])
    out = torch.ones(4, device=device)
    bc.apply_check(False, err, [out])
    assert torch.equal(out, torch.ones(4, device=device)) and not bc._PENDING


def test_pending_counts_are_bounded_and_wait_flushes(monkeypatch):
    monkeypatch.setattr(bc, "MAX_PENDING", 2)
    monkeypatch.setattr(bc._PendingCount, "ready", lambda self: False)  # as if the copies were in flight
    for _ in range(4):
        bc.apply_check("async", torch.zeros(1, dtype=torch.int32), [])
    # before each new count is added, the oldest beyond MAX_PENDING are waited for: 2 kept + the new one
    assert len(bc._PENDING) == 3
    bc.raise_pending_barrier_timeouts(wait=True)
    assert not bc._PENDING


# the driver tests run where the kernels do: on the GPU if there is one, else under the interpreter
DEV = DEVICES[-1]


def _inputs(**kw):
    gates, W, S = make_inputs(**kw)
    return [t.to(DEV) for t in gates], [t.to(DEV) for t in W], [t.to(DEV) for t in S]


def test_check_values_are_validated():
    gates, W, S = _inputs(B=1, H=1, T=4)
    for bad in ("sync", 1, None):
        with pytest.raises(ConfigError, match="check must be"):
            tt.neural_memory_tiled_triton(*gates, W, S, MemoryMLPSpec(), CHUNK, None, n_tiles=1, check=bad)


def _failing(fn, where):
    """``fn`` with one barrier failure added to the count it reports (argument ``where``)."""
    def wrapped(*args, **kw):
        res = fn(*args, **kw)
        (args[where] if isinstance(where, int) else res[-1]).add_(1)
        return res
    return wrapped


def test_inference_driver_wires_the_check(monkeypatch):
    monkeypatch.setattr(tt, "_forward_persistent", _failing(tt._forward_persistent, 11))
    gates, W, S = _inputs(B=1, H=2)
    o, W_T, S_T = tt.neural_memory_tiled_triton(*gates, W, S, MemoryMLPSpec(), CHUNK, None, n_tiles=1,
                                                persistent=True)
    assert all(torch.isnan(t).all() for t in (o, *W_T, *S_T))
    with pytest.raises(BarrierTimeout, match="earlier call"):
        tt.neural_memory_tiled_triton(*gates, W, S, MemoryMLPSpec(), CHUNK, None, n_tiles=1, persistent=True)
    with pytest.raises(BarrierTimeout, match="1 head barrier"):
        tt.neural_memory_tiled_triton(*gates, W, S, MemoryMLPSpec(), CHUNK, None, n_tiles=1, persistent=True,
                                      check=True)


def test_training_driver_wires_the_check_in_both_directions(monkeypatch):
    gates, W, S = _inputs(B=1, H=2)
    leaves = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]

    def run():
        o, W_T, S_T = tt.neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], MemoryMLPSpec(),
                                                          CHUNK, None, n_tiles=1, persistent=True)
        return o, torch.autograd.grad(o.sum() + sum(t.sum() for t in (*W_T, *S_T)), leaves)

    o, grads = run()  # no failure: finite numbers
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)
    monkeypatch.setattr(tt, "_backward_body", _failing(tt._backward_body, "result"))
    o, grads = run()  # the forward is fine, the backward failed: NaN gradients, not numbers
    assert torch.isfinite(o).all()
    assert all(torch.isnan(g).all() for g in grads[:6]) and all(torch.isnan(g).all() for g in grads[6:])
    with pytest.raises(BarrierTimeout):
        run()


def test_fit_raises_a_failure_left_pending_by_the_last_calls():
    """``fit_module`` waits for the pending counts at the end of training: a barrier failure in
    the last step (reported by ``check="async"`` only at the next call) is raised, not lost."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from titans_memory.training import TrainingConfig, fit_module

    x, y = torch.randn(32, 3), torch.randn(32, 1)

    def loss_fn(net, batch):  # as if every step's memory call had one barrier fail
        bc.watch_barriers(torch.ones(1, dtype=torch.int32), [])
        return nn.functional.mse_loss(net(batch[0]), batch[1])

    with pytest.raises(BarrierTimeout, match="earlier call"):
        fit_module(nn.Linear(3, 1), loss_fn, TensorDataset(x, y), None,
                   TrainingConfig(max_epochs=1, batch_size=32, enable_progress_bar=False, seed=0))
