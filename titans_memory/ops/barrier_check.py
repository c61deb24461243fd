"""What the drivers of the persistent kernels do with a barrier failure count, with or without a
host sync.

A persistent launch counts the head barriers that gave up waiting in a one-element device tensor
``err`` (``triton_persistent_kernels._head_sync``); non-zero means that call's numbers are wrong.
Two policies, the drivers' ``check`` argument:

- ``check=True`` (:func:`check_barriers`): synchronise and raise :class:`BarrierTimeout` at once.
  One host sync per call: in a W1 training step at 8k on an H200 the two syncs (forward and
  backward) left the GPU idle 4-5 ms of a 38 ms step while the host caught up.
- ``check="async"`` (:func:`watch_barriers`, the default): no host sync. On the device, the
  call's outputs are filled with NaN if the count is non-zero (so a wrong result is never
  returned as numbers); the count is copied to pinned host memory behind an event, and the next
  call of these drivers (or :func:`raise_pending_barrier_timeouts`, which can also wait) raises
  :class:`BarrierTimeout` once the copy shows a failure. The shared training loop
  (``titans_memory.training.fit_module``) waits for the pending counts when training ends.

``check=False`` skips both (for captures of the caller's own CUDA graph).
"""

from __future__ import annotations

import threading
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import BarrierTimeout, ConfigError

# more pending counts than this: the oldest is waited for (bounds the host memory held)
MAX_PENDING = 64


def _message(n: int) -> str:
    return f"{n} head barrier(s) of the persistent memory kernels timed out"


def check_barriers(err: Tensor) -> None:
    """Raise :class:`BarrierTimeout` if any barrier of a persistent launch gave up (syncs)."""
    n = int(err.sum().item())
    if n:
        raise BarrierTimeout(_message(n))


class _PendingCount:
    """A failure count on its way to the host: pinned memory filled behind an event on CUDA, a
    plain copy elsewhere (there is nothing to overlap with on the CPU)."""

    def __init__(self, err: Tensor):
        if err.is_cuda:
            self.host = torch.empty(err.shape, dtype=err.dtype, pin_memory=True)
            self.host.copy_(err, non_blocking=True)
            self.done: Optional[torch.cuda.Event] = torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(err.device))
        else:
            self.host, self.done = err.detach().clone(), None

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def count(self) -> int:
        if self.done is not None:
            self.done.synchronize()
        return int(self.host.sum())


_PENDING: List[_PendingCount] = []
_LOCK = threading.Lock()


def raise_pending_barrier_timeouts(wait: bool = False) -> None:
    """Raise :class:`BarrierTimeout` for the earlier ``check="async"`` calls whose failure count has
    reached the host and is non-zero (``wait``: wait for every pending count first, e.g. at the end
    of training). Counts found zero are dropped; the others stay pending."""
    with _LOCK:
        keep, failed = [], 0
        for i, p in enumerate(_PENDING):
            if wait or p.ready() or len(_PENDING) - i > MAX_PENDING:
                failed += p.count()
            else:
                keep.append(p)
        _PENDING[:] = keep
    if failed:
        raise BarrierTimeout(_message(failed) + " in an earlier call (check='async': its outputs were NaN)")


def watch_barriers(err: Tensor, outputs: Sequence[Tensor]) -> None:
    """``check="async"`` for one call: ``outputs`` are set to NaN in place where ``err`` is non-zero
    (device-side, no sync) and the count joins the pending ones."""
    bad = err.reshape(()) != 0
    for t in outputs:
        t.masked_fill_(bad, float("nan"))
    with _LOCK:
        _PENDING.append(_PendingCount(err))


def validate_check(check: Union[bool, str]) -> None:
    if not (check is True or check is False or (isinstance(check, str) and check == "async")):
        raise ConfigError(f"check must be True (sync and raise), 'async' (no sync: NaN outputs, raised at the next "
                          f"call) or False, got {check!r}")


def apply_check(check: Union[bool, str], err: Tensor, outputs: Sequence[Tensor]) -> None:
    """The driver's policy for one persistent call (module docstring); pending failures of earlier
    calls are raised first."""
    if check is False:
        return
    raise_pending_barrier_timeouts()
    if check is True:
        check_barriers(err)
    else:
        watch_barriers(err, outputs)
