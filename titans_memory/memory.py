"""The neural long-term memory layer (LMM), arXiv 2501.00663 sections 3 and 4.4."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import MemoryConfig
from .errors import ShapeError
from .layers import CausalDepthwiseConv1d
from .ops import MemoryMLPSpec, layer_shapes, memory_apply, neural_memory
from .ops.fused import interpret_mode
from .ops.output_gate import output_norm_gate
from .ops.qkv_prep import qkv_prep, stream_reference
from .state import MemoryState

_GATES = ("theta", "eta", "alpha")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Memory state and update arithmetic run in fp32 (fp64 when the model is fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class NeuralMemory(nn.Module):
    """Neural long-term memory: a per-head MLP whose weights learn while the layer reads.

    For input ``x`` ``[B, T, D]``:

    - ``q, k, v = silu(conv(x W_Q)), silu(conv(x W_K)), silu(conv(x W_V))`` (causal depthwise conv),
      ``q`` and ``k`` l2-normalised per head;
    - gates ``theta_t = theta_max * sigmoid(.)``, ``eta_t = sigmoid(.)``, ``alpha_t = sigmoid(.)``,
      linear in ``x_t``, one per head;
    - the memory update/retrieval of :func:`~titans_memory.ops.neural_memory` from learned
      per-head initial weights (meta-learned by the outer optimiser);
    - output ``RMSNorm(o) * sigmoid(x W_G)``, projected back to ``D``.

    Args:
        d_model: model width D.
        n_heads: heads H.
        head_dim: per-head width d.
        config: :class:`~titans_memory.config.MemoryConfig`.
        impl: operator implementation passed to :func:`~titans_memory.ops.neural_memory`
            (``None``: ``config.impl``).
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, config: MemoryConfig = MemoryConfig(), impl: Optional[str] = None) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.config = config
        self.impl = impl or config.impl
        self.spec = MemoryMLPSpec(config.activation, config.residual, config.norm)
        inner = n_heads * head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.use_conv = config.conv_kernel > 1
        if self.use_conv:
            self.conv = nn.ModuleDict({name: CausalDepthwiseConv1d(inner, config.conv_kernel) for name in "qkv"})
        self.gates = nn.Linear(d_model, 3 * n_heads)
        nn.init.normal_(self.gates.weight, std=0.02)
        with torch.no_grad():
            bias = self.gates.bias.view(3, n_heads)
            bias[0].fill_(_logit(config.theta_init / config.theta_max))
            bias[1].fill_(_logit(config.eta_init))
            bias[2].fill_(_logit(config.alpha_init))
        # Learned initial memory weights, one independent tensor per head (no stride-0 expand).
        self.init_weights = nn.ParameterList()
        for d_in, d_out in layer_shapes(head_dim, config.depth, config.expansion):
            self.init_weights.append(nn.Parameter(torch.randn(n_heads, d_in, d_out) / math.sqrt(d_in)))
        self.out_norm = nn.RMSNorm(head_dim)
        self.out_gate = nn.Linear(d_model, inner, bias=False)
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    # ----------------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, device: torch.device | None = None) -> MemoryState:
        """A fresh state: the learned initial weights, zero momentum, nothing pending."""
        dtype = state_dtype(self.init_weights[0].dtype)
        weights = [w.to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1) for w in self.init_weights]
        if device is not None:
            weights = [w.to(device) for w in weights]
        return MemoryState(weights=weights, momentum=[torch.zeros_like(w) for w in weights])

    def _io_impl(self, t: Tensor) -> str:
        """``impl`` of the fused input/output kernels (:func:`~titans_memory.ops.qkv_prep.qkv_prep`,
        :func:`~titans_memory.ops.output_gate.output_norm_gate`): PyTorch with the PyTorch memory
        operators, else the kernels on CUDA (where they cover the inputs), and under the Triton
        interpreter on the CPU with an explicit Triton operator (the CI tests)."""
        if self.impl in ("torch", "naive", "checkpointed"):
            return "torch"
        if self.impl == "auto" or t.is_cuda or not interpret_mode():
            return "auto"
        return "triton"

    def _project(self, x: Tensor, conv_cache: Dict[str, Tensor], streams: str, prefix: str) -> Dict[str, Tensor]:
        """q/k/v of ``x`` for the named streams, as ``[B, H, T, d]`` fp32; updates ``conv_cache``."""
        p = self.qkv(x)
        names = [prefix + name for name in "qkv"]
        if streams == "qkv":  # all three: one fused pass (conv, silu, l2 norm, head layout)
            convs = [(self.conv[n].weight, self.conv[n].bias) for n in "qkv"] if self.use_conv else None
            caches = [conv_cache.get(n) for n in names]
            impl = self._io_impl(p)
            if impl == "triton" and torch.is_grad_enabled() and any(c is not None and c.requires_grad for c in caches):
                impl = "torch"  # the kernels give no gradient to a carried cache ("auto" does the same)
            outs, caches = qkv_prep(p, convs, caches, self.n_heads, state_dtype(p.dtype), impl=impl)
            if self.use_conv:
                conv_cache.update(zip(names, caches))
            return dict(zip("qkv", outs))
        parts = dict(zip("qkv", p.chunk(3, dim=-1)))
        out = {}
        for name in streams:
            conv = (self.conv[name].weight, self.conv[name].bias) if self.use_conv else None
            out[name], cache = stream_reference(parts[name], conv, conv_cache.get(prefix + name), self.n_heads,
                                                name in "qk", state_dtype(p.dtype))
            if self.use_conv:
                conv_cache[prefix + name] = cache
        return out

    def _gates(self, x: Tensor) -> Dict[str, Tensor]:
        logits = self.gates(x).to(state_dtype(x.dtype)).view(x.shape[0], x.shape[1], 3, self.n_heads).permute(2, 0, 3, 1)
        return {
            "theta": self.config.theta_max * torch.sigmoid(logits[0]),
            "eta": torch.sigmoid(logits[1]),
            "alpha": torch.sigmoid(logits[2]),
        }

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """``out_proj(RMSNorm(o) * sigmoid(x W_G))`` with the heads merged (one fused pass on CUDA)."""
        z = output_norm_gate(o.to(self.out_norm.weight.dtype), self.out_norm.weight, self.out_norm.eps,
                             self.out_gate(x), x.dtype, impl=self._io_impl(o))
        return self.out_proj(z)

    def _run(self, q, k, v, gates, weights, momentum):
        return neural_memory(
            q, k, v, gates["theta"], gates["eta"], gates["alpha"], weights, momentum,
            spec=self.spec, chunk_size=self.config.chunk_size,
            max_update_norm=self.config.max_update_norm, impl=self.impl,
            kernel_precision=self.config.kernel_precision, segment_chunks=self.config.segment_chunks,
        )

    # ----------------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, state: Optional[MemoryState] = None, return_state: bool = False
    ) -> Tensor | Tuple[Tensor, MemoryState]:
        """Update the memory with ``x`` and read it at every position.

        Args:
            x: ``[B, T, D]``.
            state: carried state from a previous call (the sequence continues), or None.
            return_state: also return the state after ``x``.
        Returns:
            ``y`` ``[B, T, D]``, and the new :class:`MemoryState` when ``return_state``.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ShapeError(f"NeuralMemory expects [batch, time, {self.d_model}], got {tuple(x.shape)}")
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        else:
            state.check_batch(x.shape[0])
        conv = dict(state.conv)
        qkv = self._project(x, conv, "qkv", "")  # projections may run under autocast (bf16)
        gates = self._gates(x)
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 memory update
            o, new_state = self._update(qkv, gates, state, return_state)
        y = self._output(o, x)
        if not return_state:
            return y
        new_state.conv = conv
        new_state.position = state.position + x.shape[1]
        return y, new_state

    def _update(self, qkv: Dict[str, Tensor], gates: Dict[str, Tensor], state: MemoryState, keep_state: bool):
        """Run the memory on pending + new tokens along the global chunk grid."""
        b = self.config.chunk_size
        r = state.n_pending
        k = torch.cat([state.pending["k"], qkv["k"]], 2) if r else qkv["k"]
        v = torch.cat([state.pending["v"], qkv["v"]], 2) if r else qkv["v"]
        q = torch.cat([qkv["q"].new_zeros(qkv["q"].shape[:2] + (r, self.head_dim)), qkv["q"]], 2) if r else qkv["q"]
        g = {n: torch.cat([state.pending[n], gates[n]], 2) if r else gates[n] for n in _GATES}
        if self.config.gates_per_chunk:
            g = {n: _hold_per_chunk(t, b) for n, t in g.items()}
        total = k.shape[2]
        if not keep_state:
            o, _, _ = self._run(q, k, v, g, state.weights, state.momentum)
            return o[:, :, r:], None
        n_full = (total // b) * b
        head = slice(0, n_full)
        o_full, W, S = self._run(q[:, :, head], k[:, :, head], v[:, :, head], {n: t[:, :, head] for n, t in g.items()}, state.weights, state.momentum)
        outs = [o_full]
        pending = {}
        if n_full < total:
            tail = slice(n_full, total)
            o_tail, _, _ = self._run(q[:, :, tail], k[:, :, tail], v[:, :, tail], {n: t[:, :, tail] for n, t in g.items()}, W, S)
            outs.append(o_tail)
            pending = {"k": k[:, :, tail], "v": v[:, :, tail], **{n: t[:, :, tail] for n, t in g.items()}}
        o = torch.cat(outs, 2)[:, :, r:]
        return o, MemoryState(weights=W, momentum=S, pending=pending)

    def current_weights(self, state: MemoryState) -> List[Tensor]:
        """Memory weights after the last token of ``state`` (replays the pending tokens)."""
        if not state.n_pending:
            return state.weights
        p = state.pending
        _, W, _ = neural_memory(
            p["k"], p["k"], p["v"], p["theta"], p["eta"], p["alpha"], state.weights, state.momentum,
            spec=self.spec, chunk_size=self.config.chunk_size,
            max_update_norm=self.config.max_update_norm, impl=self.impl,
            kernel_precision=self.config.kernel_precision,
        )
        return W

    def retrieve(self, x: Tensor, state: MemoryState, stream: str = "retrieve") -> Tuple[Tensor, MemoryState]:
        """Read the memory with queries from ``x`` without updating it: ``M*_{t-1}(q)``.

        Used by MAC. ``state``'s convolution cache for this query stream is advanced.
        Returns ``(h [B, T, D], state)``.
        """
        conv = dict(state.conv)
        q = self._project(x, conv, "q", stream + ".")["q"]
        with torch.autocast(device_type=x.device.type, enabled=False):
            o = memory_apply(q, self.current_weights(state), self.spec)
        state = MemoryState(state.weights, state.momentum, state.pending, conv, state.position)
        return self._output(o, x), state


def _hold_per_chunk(t: Tensor, chunk_size: int) -> Tensor:
    """Replace each gate by the value at its chunk's first token (causal per-chunk gates)."""
    n = t.shape[-1]
    idx = (torch.arange(n, device=t.device) // chunk_size) * chunk_size
    return t[..., idx]
