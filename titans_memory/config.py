"""Typed configuration of the neural memory and of the Titans backbone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional

from .errors import ConfigError

Variant = Literal["lmm", "mac", "mag", "mal"]
VARIANTS = ("lmm", "mac", "mag", "mal")
ACTIVATIONS = ("silu", "gelu", "relu", "identity")
# matmul operands of the Triton memory kernels (see titans_memory.ops)
KERNEL_PRECISIONS = ("tf32", "bf16", "bf16-forward")


def validate_segment_chunks(segment_chunks: Optional[int]) -> None:
    """``segment_chunks`` (:class:`MemoryConfig`) is ``None`` or an integer >= 1."""
    if segment_chunks is not None and (
        isinstance(segment_chunks, bool) or not isinstance(segment_chunks, int) or segment_chunks < 1
    ):
        raise ConfigError(f"segment_chunks must be None or an integer >= 1, got {segment_chunks!r}")


@dataclass
class MemoryConfig:
    """The neural long-term memory (LMM) of one layer.

    Attributes:
        depth: layers of the per-head memory MLP (1 = a linear matrix memory).
        expansion: hidden width of the MLP as a multiple of ``head_dim`` (depth >= 2).
        activation: activation between MLP layers.
        residual: memory output is ``k + MLP(k)`` instead of ``MLP(k)``.
        norm: apply a parameter-free layer norm to the MLP output (before the residual).
        chunk_size: tokens per chunk in the chunked parallel form (gradients inside a chunk are
            taken at the chunk's starting weights; 1 = the exact recurrence).
        conv_kernel: width of the causal depthwise convolution after the q/k/v projections
            (0 or 1 disables it).
        theta_max: upper bound of the data-dependent inner learning rate theta_t.
        theta_init, eta_init, alpha_init: initial (bias-only) values of the learning rate,
            the momentum and the forgetting gate.
        gates_per_chunk: hold the gates constant inside a chunk, taking the value of the chunk's
            first token (causal), as the paper suggests for speed.
        max_update_norm: clip of each token's inner-gradient Frobenius norm (None disables).
            With the default gates this keeps a depth-4 memory finite and alive over 16k random
            tokens; without it, mini-batch steps of 64 summed gradients can diverge.
        impl: operator implementation (see :func:`titans_memory.ops.neural_memory`):
            ``"auto"``, ``"torch"``, ``"checkpointed"`` (memory-light training on long
            sequences), ``"triton"``, ``"naive"`` or the experimental ``"triton_tiled"``.
            All compute the same function.
        kernel_precision: matmul operands of the Triton kernels (fp32 state and accumulation
            either way): ``"tf32"`` (operands rounded to tf32 in the forward passes, as the
            tensor cores read them, truncated, in the backward's phases), ``"bf16"``, or
            ``"bf16-forward"`` (bf16 in the forward passes, tf32 in the backward's gradient walk;
            the fastest measured on an H200). See :mod:`titans_memory.ops`.
        segment_chunks: memory for speed in training with the Triton kernels and
            ``"checkpointed"``: a training call keeps the state at the start of every
            ``segment_chunks``-th chunk, and its backward recomputes each segment's states but
            the last one's. ``None``: ``ceil(sqrt(n_chunks))``, the least memory. Longer
            segments recompute fewer chunks (none when one segment covers the sequence) and hold
            more states: at W1 shapes about 22 MiB of peak per chunk of segment. Measured on an
            H200 for the W1 layer at 8k (``benchmarks/RESULTS.md``, ninth session): 64 chunks
            6-7 % faster with a 3.8 GiB peak instead of 1.8, one segment (128) 11-13 % faster
            with 6.4 GiB. The result does not depend on it.
    """

    depth: int = 2
    expansion: int = 4
    activation: str = "silu"
    residual: bool = True
    norm: bool = False
    chunk_size: int = 64
    conv_kernel: int = 4
    theta_max: float = 0.1
    theta_init: float = 0.01
    eta_init: float = 0.9
    alpha_init: float = 1e-3
    gates_per_chunk: bool = False
    max_update_norm: Optional[float] = 1.0
    impl: str = "auto"
    kernel_precision: str = "tf32"
    segment_chunks: Optional[int] = None

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 4:
            raise ConfigError(f"memory depth must be in 1..4, got {self.depth}")
        if self.expansion < 1:
            raise ConfigError(f"memory expansion must be >= 1, got {self.expansion}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown memory activation {self.activation!r}; choose from {ACTIVATIONS}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.conv_kernel < 0:
            raise ConfigError(f"conv_kernel must be >= 0, got {self.conv_kernel}")
        if self.theta_max <= 0:
            raise ConfigError(f"theta_max must be > 0, got {self.theta_max}")
        if not 0 < self.theta_init < self.theta_max:
            raise ConfigError(f"theta_init must be in (0, theta_max={self.theta_max}), got {self.theta_init}")
        for name in ("eta_init", "alpha_init"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {value}")
        if self.impl not in ("auto", "torch", "checkpointed", "triton", "naive", "triton_tiled"):
            raise ConfigError(f"unknown memory impl {self.impl!r}")
        if self.kernel_precision not in KERNEL_PRECISIONS:
            raise ConfigError(f"kernel_precision must be one of {KERNEL_PRECISIONS}, got {self.kernel_precision!r}")
        if self.max_update_norm is not None and self.max_update_norm <= 0:
            raise ConfigError(f"max_update_norm must be > 0 or None, got {self.max_update_norm}")
        validate_segment_chunks(self.segment_chunks)


@dataclass
class TitansConfig:
    """A stack of Titans blocks.

    Attributes:
        d_model: model width D.
        n_layers: number of blocks.
        n_heads: memory (and attention) heads.
        head_dim: width of one head; defaults to ``d_model // n_heads``.
        variant: ``"lmm"`` (memory alone), ``"mac"`` (memory as context), ``"mag"`` (memory as
            gate) or ``"mal"`` (memory as layer).
        memory: the neural memory of every block.
        persistent_tokens: learnable, input-independent tokens prepended to the attention context
            (paper Eq. 19). Ignored by ``"lmm"``.
        segment_size: MAC segment length (attention runs within a segment).
        window_size: sliding-window attention width for MAG and MAL.
        ffn_mult: hidden width of the feed-forward sublayer as a multiple of ``d_model``
            (0 disables the feed-forward sublayer).
        dropout: dropout after each sublayer.
    """

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    head_dim: Optional[int] = None
    variant: str = "lmm"
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    persistent_tokens: int = 4
    segment_size: int = 64
    window_size: int = 64
    ffn_mult: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.memory, dict):
            self.memory = MemoryConfig(**self.memory)
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; choose from {VARIANTS}")
        if self.d_model < 1 or self.n_layers < 1 or self.n_heads < 1:
            raise ConfigError("d_model, n_layers and n_heads must all be >= 1")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.persistent_tokens < 0:
            raise ConfigError(f"persistent_tokens must be >= 0, got {self.persistent_tokens}")
        if self.segment_size < 1 or self.window_size < 1:
            raise ConfigError("segment_size and window_size must be >= 1")
        if self.ffn_mult < 0:
            raise ConfigError(f"ffn_mult must be >= 0, got {self.ffn_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``TitansConfig.from_dict`` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TitansConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown TitansConfig fields: {sorted(unknown)}")
        data = dict(data)
        if isinstance(data.get("memory"), dict):
            data["memory"] = MemoryConfig(**data["memory"])
        return cls(**data)
