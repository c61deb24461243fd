"""NeuralMemory layer and Titans backbone: state carry, streaming, causality, stability."""

from __future__ import annotations

import pytest
import torch

from titans_memory import (
    MAC, MAG, MAL, LMM, BackboneState, ConfigError, MemoryConfig, NeuralMemory, ShapeError, StateError,
    TitansBackbone, TitansConfig,
)

F64 = torch.float64
VARIANTS = ["lmm", "mac", "mag", "mal"]


def small_config(variant="lmm", **memory):
    mem = dict(chunk_size=4, depth=2, expansion=2)
    mem.update(memory)
    return TitansConfig(
        d_model=24, n_layers=2, n_heads=3, variant=variant, memory=MemoryConfig(**mem),
        segment_size=6, window_size=5, persistent_tokens=2, ffn_mult=2,
    )


@pytest.mark.parametrize("gates_per_chunk", [False, True])
@pytest.mark.parametrize("cuts", [[3, 4, 12, 15], [1, 2, 3, 4, 5], [8, 16], [7]])
def test_memory_state_carry_equals_one_call(gates_per_chunk, cuts):
    mem = NeuralMemory(24, 3, 8, MemoryConfig(chunk_size=4, gates_per_chunk=gates_per_chunk)).double()
    x = torch.randn(2, 21, 24, dtype=F64)
    full = mem(x)
    bounds = [0, *cuts, 21]
    state, outs = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, state = mem(x[:, a:b], state, return_state=True)
        outs.append(y)
    assert state.position == 21
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_backbone_state_carry_and_streaming_constant_memory(variant):
    """Every variant: a sequence in pieces (cut anywhere, also inside MAC segments and attention
    windows) gives the one-call outputs; one token at a time, the carried state never grows."""
    model = TitansBackbone(small_config(variant)).double().eval()
    x = torch.randn(1, 40, 24, dtype=F64)
    with torch.no_grad():
        full = model(x)
        for cuts in ([13], [3, 4, 11, 17, 18]):
            st, outs = None, []
            for a, b in zip([0, *cuts], [*cuts, 40]):
                y, st = model(x[:, a:b], st, return_state=True)
                outs.append(y)
            assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-12, (variant, cuts)
        st, outs, sizes = None, [], []
        for t in range(40):
            y, st = model(x[:, t : t + 1], st, return_state=True)
            outs.append(y)
            sizes.append(_state_numel(st))
        assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-12
        # bounded by one chunk / segment / window (periods 4, 6, 5): the last 12 steps hold no
        # more than the 12 before them
        assert max(sizes[28:]) <= max(sizes[16:28])


def _state_numel(state) -> int:
    total = 0
    for layer in state.layers:
        mem = getattr(layer, "memory", layer)
        total += sum(t.numel() for t in mem.weights + mem.momentum + list(mem.pending.values()))
        if getattr(layer, "context", None) is not None:
            total += layer.context.numel()
    return total


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    """Perturbing inputs after position t leaves outputs up to t unchanged."""
    model = TitansBackbone(small_config(variant)).double().eval()
    x = torch.randn(2, 23, 24, dtype=F64)
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, 6, 11, 17, 21):
            x2 = x.clone()
            x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
            out = model(x2)
            assert (out[:, : t + 1] - base[:, : t + 1]).abs().max().item() < 1e-12, (variant, t)
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max().item() > 1e-6


def test_memory_layer_causality_with_chunks():
    """No look-ahead inside a chunk: token t's output ignores tokens t+1.. of its own chunk."""
    mem = NeuralMemory(24, 3, 8, MemoryConfig(chunk_size=8)).double()
    x = torch.randn(1, 16, 24, dtype=F64)
    base = mem(x)
    x2 = x.clone()
    x2[:, 3:] += 1.0
    assert (mem(x2)[:, :3] - base[:, :3]).abs().max().item() < 1e-12


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_every_parameter_gets_gradient(variant, autocast):
    model = TitansBackbone(small_config(variant))
    x = torch.randn(2, 19, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().pow(2).mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "init_weights" in n)


def test_block_constructors_pick_their_variant():
    cfg = small_config("lmm")
    for ctor, name in [(LMM, "LMMMixer"), (MAC, "MACMixer"), (MAG, "MAGMixer"), (MAL, "MALMixer")]:
        block = ctor(cfg)
        assert type(block.mixer).__name__ == name
        assert block(torch.randn(1, 9, 24)).shape == (1, 9, 24)


@pytest.mark.parametrize("autocast", [False, True])
def test_depth4_long_sequence_is_stable(autocast):
    """16k random tokens, depth-4 memory, default gates: no NaN or Inf, state stays fp32."""
    mem = NeuralMemory(32, 2, 16, MemoryConfig(depth=4, chunk_size=64))
    x = torch.randn(1, 16384, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, state = mem(x, return_state=True)
    assert torch.isfinite(y).all()
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in state.weights + state.momentum)


def test_update_norm_clip_bounds_the_step():
    """With a tiny clip the weights barely move; without it they move more."""
    x = torch.randn(1, 32, 24) * 5
    moved = {}
    for clip in (None, 1e-4):
        mem = NeuralMemory(24, 3, 8, MemoryConfig(chunk_size=4, max_update_norm=clip, alpha_init=1e-3))
        torch.manual_seed(0)
        with torch.no_grad():
            init = [w.clone() for w in mem.initial_state(1).weights]
            _, st = mem(x, return_state=True)
        moved[clip] = max((a - b).abs().max().item() for a, b in zip(st.weights, init))
    assert moved[1e-4] < moved[None] / 10


def test_per_head_parameters_are_independent_storage():
    model = TitansBackbone(small_config("mac"))
    for name, p in model.named_parameters():
        assert 0 not in p.stride(), f"{name} aliases one storage across a dimension"
    clone = TitansBackbone(small_config("mac"))
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 10, 24)
    assert torch.equal(clone(x), model(x))


def test_state_errors():
    model = TitansBackbone(small_config("lmm"))
    _, st = model(torch.randn(2, 5, 24), return_state=True)
    with pytest.raises(StateError):
        model(torch.randn(3, 5, 24), st, return_state=True)
    with pytest.raises(StateError, match="layers"):
        TitansBackbone(small_config("lmm"))(torch.randn(2, 5, 24), BackboneState(st.layers[:1]), return_state=True)
    with pytest.raises(ShapeError):
        model(torch.randn(2, 5, 7))


def test_config_validation():
    with pytest.raises(ConfigError):
        MemoryConfig(depth=5)
    with pytest.raises(ConfigError):
        MemoryConfig(eta_init=1.5)
    with pytest.raises(ConfigError):
        TitansConfig(variant="xyz")
    with pytest.raises(ConfigError):
        TitansConfig(d_model=30, n_heads=4)
    cfg = small_config("mal")
    assert TitansConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError):
        TitansConfig.from_dict({"d_model": 8, "bogus": 1})


@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "4"])
def test_segment_chunks_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="segment_chunks"):
        MemoryConfig(segment_chunks=bad)


def test_segment_chunks_reaches_the_operator_and_leaves_the_result(monkeypatch):
    """``MemoryConfig.segment_chunks`` reaches the checkpointed operator (recorded by a wrapper
    around the real one) and changes only what is kept and recomputed: outputs and gradients
    equal the default's (fp64, 1e-12) with segments of 1 and 3 chunks over 5 chunks."""
    import titans_memory.ops as ops

    seen = []
    real = ops.neural_memory_checkpointed

    def wrapper(*args, **kw):
        seen.append(kw.get("segment_chunks"))
        return real(*args, **kw)

    monkeypatch.setattr(ops, "neural_memory_checkpointed", wrapper)
    results = []
    for K in (None, 1, 3):
        torch.manual_seed(3)
        model = TitansBackbone(small_config("lmm", impl="checkpointed", segment_chunks=K)).double()
        x = torch.randn(2, 19, 24, dtype=F64, requires_grad=True)
        y = model(x)
        results.append((y, *torch.autograd.grad(y.pow(2).sum(), [x, *model.parameters()])))
        assert seen and set(seen) == {K}, seen
        seen.clear()
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a - b).abs().max().item() < 1e-12


def test_memory_impl_from_config_same_function():
    """``MemoryConfig.impl="checkpointed"`` (memory-light) gives the chunked path's outputs and
    gradients (fp64, 1e-12)."""
    results = []
    for impl in ("torch", "checkpointed"):
        torch.manual_seed(3)
        model = TitansBackbone(small_config("lmm", impl=impl)).double()
        assert all(layer.mixer.memory.impl == impl for layer in model.layers)
        x = torch.randn(2, 19, 24, dtype=F64, requires_grad=True)
        y = model(x)
        results.append((y, *torch.autograd.grad(y.pow(2).sum(), [x, *model.parameters()])))
    for a, b in zip(*results):
        assert (a - b).abs().max().item() < 1e-12
    with pytest.raises(ConfigError):
        MemoryConfig(impl="cuda-magic")
