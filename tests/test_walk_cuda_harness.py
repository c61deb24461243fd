"""The CUDA walk probe's harness (``benchmarks/walk_cuda.py``) on the CPU: the fp64 reference walk it
checks the kernel against, and the gate-only coefficients it hands the kernel, against the chunked
form; the tf32 operand emulation it uses to compare truncation with rounding. (The kernel itself
needs a Hopper GPU and nvcc: the probe checks it there.)"""

import torch

from _benchmarks import load_benchmark
from titans_memory.ops import neural_memory_chunked
from titans_memory.ops.chunked import chunk_coefficients

wc = load_benchmark("walk_cuda")


def _inputs(T=192, heads=2):
    args, W, S = wc._inputs(1, heads, T, 64, 2, 4, torch.device("cpu"), seed=11)
    flat = lambda t: t.reshape(heads, *t.shape[2:])  # noqa: E731
    return args, W, S, [flat(t) for t in args], [flat(w) for w in W], [flat(s) for s in S]


def test_reference_walk_matches_the_chunked_form():
    args, W, S, (q, k, v, th, et, al), Wf, Sf = _inputs()
    for clip in (1.0, None):
        state, kept, d2, thc = wc.reference_walk(k, v, th, et, al, Wf, Sf, clip, keep=[0, 2])
        _, Wt, St = neural_memory_chunked(*args, W, S, wc.SPEC, 64, clip)
        for a, b in zip(state, Wt + St):
            assert wc._rel(a, b[0]) < 1e-12
        assert all(torch.equal(a, b) for a, b in zip(kept[0], Wf + Sf))
        _, W2, S2 = neural_memory_chunked(*(t[:, :, :128] for t in args), W, S, wc.SPEC, 64, clip)
        assert all(wc._rel(a, b[0]) < 1e-12 for a, b in zip(kept[2], W2 + S2))
        assert d2.shape == k.shape and thc.shape == th.shape
        assert (thc <= th).all() and ((thc < th).any() if clip else torch.equal(thc, th))


def test_gate_coefficients_are_the_chunk_coefficients_over_theta():
    _, _, _, (_, _, _, th, et, al), _, _ = _inputs()
    cL, mL, bge = wc.gate_coefficients(th, et, al)
    for n in range(3):
        sl = slice(64 * n, 64 * (n + 1))
        beta, g, C, E, D = chunk_coefficients(th[:, sl], et[:, sl], al[:, sl])
        assert torch.allclose(th[:, sl] * cL[:, sl], C[:, -1, :], rtol=1e-12, atol=0)
        assert torch.allclose(mL[:, sl], D[:, -1, :], rtol=1e-12, atol=0)
        assert torch.allclose(bge[:, n], torch.stack([beta[:, -1], g[:, -1], E[:, -1]], -1), rtol=1e-12, atol=0)


def test_tf32_emulation_truncates_and_rounds():
    x = torch.tensor([1.0 + 2.0 ** -11, 1.0 + 2.0 ** -11 + 2.0 ** -20, -(1.0 + 3 * 2.0 ** -11)], dtype=torch.float64)
    assert wc._tf32(x, "trunc").tolist() == [1.0, 1.0, -(1.0 + 2.0 ** -10)]
    assert wc._tf32(x, "rna").tolist() == [1.0 + 2.0 ** -10, 1.0 + 2.0 ** -10, -(1.0 + 2.0 ** -9)]
    assert torch.equal(wc._tf32(x, "fp64"), x)
