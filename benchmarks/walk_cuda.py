"""Probe: the forward state walk in CUDA C++ (``benchmarks/cuda/walk_fwd.cu``) against the Triton walk.

Not library code. It answers the first item of docs/kernels.md "Next": what a hand-written kernel
with the states resident in shared memory and one thread-block cluster per head reaches per chunk,
against the Triton walk kernel (``_fwd_persistent_kernel`` of the split forward). At W1 shapes
(batch 4, 8 heads x 64, depth 2, expansion 4, chunk 64, SiLU, residual) it

1. builds the kernel with ``nvcc`` (sm_90a) and loads it through the CUDA driver (ctypes);
2. checks it against the chunked PyTorch form in fp64: the final state, the stored chunk-start
   states of four chunks, ``delta2`` and the clipped ``theta`` of every token (relative Frobenius
   error), next to the Triton operator's final-state error on the same inputs;
3. times it (CUDA events, one launch per sequence) with 32, 16 and 8 heads, with the stores of
   the chunk-start states left out, and a 16-warp build; times the Triton walk kernel on the same
   inputs (CUDA profiler, as ``kernels_persistent.py --diag-walk-parts``);
4. splits one CTA's time per chunk into the stretches between its barriers (thread 0's
   ``clock64``), and times 20-32 heads to find how many clusters are resident at once.

Needs a Hopper GPU and nvcc. ``python benchmarks/walk_cuda.py [--T 8192] [--clip 1.0]``.
``--emulate-cpu --T 1024 8192`` (no GPU): the chunked walk with its matmul operands truncated or
rounded to tf32, against fp64, which is how the Triton kernels' truncation was confirmed.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import B, CHUNK, HEAD_DIM, HEADS, _inputs, _rel, device_name, gpu_kernels  # noqa: E402
from titans_memory.ops.chunked import chunk_coefficients  # noqa: E402
from titans_memory.ops.mlp import MemoryMLPSpec, clip_scale  # noqa: E402

SPEC = MemoryMLPSpec("silu", residual=True)
SOURCE = Path(__file__).resolve().parent / "cuda" / "walk_fwd.cu"
NTILE, LD = 4, 68
SMEM_BYTES = (12 * 64 * LD + 7 * 64) * 4
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
STRETCHES = ["wait for k, v (the previous chunk's barrier)", "prefetch, stored states, gates, Z = k W1_j",
             "silu, |h1_j|^2", "P_j = h1_j W2_j", "cluster barrier 1", "delta2 (P summed over the cluster), norms",
             "delta2 W2_j^T", "delta1_j, |delta1_j|^2", "cluster barrier 2", "clip, coefficients",
             "scaled operands", "update W1, S1, W2, S2 (4 matmuls)"]


class CudaWalk:
    """The probe kernel, built with nvcc and launched on PyTorch's current stream."""

    def __init__(self, warps: int = 8, source: Path = SOURCE):
        self.warps = warps
        out = Path(tempfile.mkdtemp()) / "walk_fwd.cubin"
        cmd = ["nvcc", "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-O3", "-Xptxas", "-v",
               f"-DWALK_WARPS={warps}", "-o", str(out), str(source)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{res.stderr}")
        self.ptxas = [ln for ln in res.stderr.splitlines() if "registers" in ln or "spill" in ln]
        torch.zeros(1, device="cuda")  # the primary context is current from here on
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        self.image = ctypes.create_string_buffer(out.read_bytes())
        self.module = ctypes.c_void_p()
        self._ok(self.lib.cuModuleLoadData(ctypes.byref(self.module), self.image), "cuModuleLoadData")
        self.fns = {}
        for clip in (True, False):
            fn = ctypes.c_void_p()
            name = b"walk_fwd_clip" if clip else b"walk_fwd_noclip"
            self._ok(self.lib.cuModuleGetFunction(ctypes.byref(fn), self.module, name), "cuModuleGetFunction")
            self._ok(self.lib.cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, SMEM_BYTES),
                     "cuFuncSetAttribute")
            self.fns[clip] = fn

    @staticmethod
    def _ok(res: int, what: str) -> None:
        if res != 0:
            raise RuntimeError(f"{what} returned CUresult {res}")

    def __call__(self, bufs: dict, T: int, BH: int, clip, save: bool = True, prof=None) -> None:
        ptrs = [bufs[n].data_ptr() for n in ("k", "v", "theta", "cL", "mL", "bge", "W1", "S1", "W2", "S2",
                                              "sW1", "sS1", "sW2", "sS2", "d2", "th")]
        vals = [ctypes.c_void_p(p) for p in ptrs] + [ctypes.c_int(T), ctypes.c_int(BH),
                                                     ctypes.c_float(clip or 0.0), ctypes.c_int(int(save)),
                                                     ctypes.c_void_p(0 if prof is None else prof.data_ptr())]
        params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(x) for x in vals])
        stream = torch.cuda.current_stream().cuda_stream
        self._ok(self.lib.cuLaunchKernel(self.fns[clip is not None], NTILE, BH, 1, 32 * self.warps, 1, 1, SMEM_BYTES,
                                         stream, params, None), "cuLaunchKernel")


def gate_coefficients(theta, eta, alpha):
    """The gate-only chunk coefficients the kernel reads: ``C[last, :] / theta``, ``D[last, :]``
    per token ``[BH, T]``, and ``(beta, g, E)`` at the chunk's last token ``[BH, NC, 3]``."""
    BH, T = eta.shape
    nc = T // CHUNK
    e, a = eta.view(BH, nc, CHUNK), alpha.view(BH, nc, CHUNK)
    beta, g, Cm, E, Dm = chunk_coefficients(torch.ones_like(e), e, a)
    return (Cm[..., -1, :].reshape(BH, T), Dm[..., -1, :].reshape(BH, T),
            torch.stack([beta[..., -1], g[..., -1], E[..., -1]], -1).contiguous())


def reference_walk(k, v, theta, eta, alpha, W, S, clip, keep, mm=torch.matmul):
    """The chunked form's state walk (depth 2, SiLU, residual) in the inputs' dtype, every matmul
    through ``mm``: the final state, the chunk-start states of the chunks in ``keep``, ``delta2``
    and the clipped ``theta`` of every token."""
    W, S = list(W), list(S)
    kept, d2s, ths = {}, [], []
    for n in range(k.shape[1] // CHUNK):
        sl = slice(n * CHUNK, (n + 1) * CHUNK)
        if n in keep:
            kept[n] = [t.clone() for t in W + S]
        kn = k[:, sl]
        z = mm(kn, W[0])
        h = torch.nn.functional.silu(z)
        d2 = 2 * (mm(h, W[1]) + kn - v[:, sl])
        sg = torch.sigmoid(z)
        d1 = mm(d2, W[1].transpose(-1, -2)) * sg * (1 + z * (1 - sg))
        hs, deltas = [kn, h], [d1, d2]
        t = theta[:, sl] * clip_scale(hs, deltas, clip) if clip is not None else theta[:, sl]
        beta, g, Cm, E, Dm = chunk_coefficients(t, eta[:, sl], alpha[:, sl])
        c_last, m_last = Cm[:, -1, :, None], (t * Dm[:, -1, :])[..., None]
        b, gg, e = beta[:, -1, None, None], g[:, -1, None, None], E[:, -1, None, None]
        Wn = [b * w + gg * s - mm(x.transpose(-1, -2), c_last * dl) for w, s, x, dl in zip(W, S, hs, deltas)]
        S = [e * s - mm(x.transpose(-1, -2), m_last * dl) for s, x, dl in zip(S, hs, deltas)]
        W = Wn
        d2s.append(d2)
        ths.append(t)
    return W + S, kept, torch.cat(d2s, 1), torch.cat(ths, 1)


def _tf32(x, mode: str):
    """fp32 ``x`` as the tensor cores would multiply it: ``"trunc"`` (the low 13 mantissa bits
    dropped), ``"rna"`` (rounded to nearest, ties away) or ``"fp64"`` (unchanged); returned in fp64."""
    if mode == "fp64":
        return x
    i = x.float().view(torch.int32)
    if mode == "rna":
        i = i + 0x1000
    return (i & -8192).view(torch.float32).double()


def emulate_tf32(T: int, heads: int = 4, clip: float = 1.0) -> None:
    """CPU emulation of the walk's tf32 operands, truncated against rounded: :func:`reference_walk`
    in fp64 with every matmul operand first truncated or rounded to tf32 (W1 shapes, ``heads``
    heads), the final state's relative error against the exact fp64 walk."""
    args, W, S = _inputs(1, heads, T, HEAD_DIM, 2, 4, torch.device("cpu"), seed=3)
    k, v = (t.reshape(heads, T, HEAD_DIM) for t in args[1:3])
    th, et, al = (t.reshape(heads, T) for t in args[3:6])
    W0 = [w.reshape(heads, *w.shape[2:]) for w in W]
    S0 = [s.reshape(heads, *s.shape[2:]) for s in S]
    walk = lambda mode: reference_walk(  # noqa: E731
        k, v, th, et, al, W0, S0, clip, (), mm=lambda a, b: _tf32(a, mode) @ _tf32(b, mode))[0]
    ref = walk("fp64")
    for mode in ("trunc", "rna"):
        errs = [_rel(a, b) for a, b in zip(walk(mode), ref)]
        print(f"| {mode} | {T} | " + " | ".join(f"{e:.2e}" for e in errs) + " |", flush=True)


def main(T: int, clip, walk: CudaWalk, other: CudaWalk) -> None:
    dev = torch.device("cuda")
    args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, dev, seed=3)
    BH, nc = B * HEADS, T // CHUNK
    k, v = (t.reshape(BH, T, HEAD_DIM) for t in args[1:3])
    theta, eta, alpha = (t.reshape(BH, T) for t in args[3:6])
    W = [w.reshape(BH, *w.shape[2:]) for w in W]
    S = [s.reshape(BH, *s.shape[2:]) for s in S]
    print(f"# the forward state walk in CUDA (benchmarks/cuda/walk_fwd.cu), T = {T}, W1 shapes, clip {clip}, "
          f"{device_name()}")
    for w in (walk, other):
        for ln in w.ptxas:
            print(f"ptxas, {w.warps} warps:", ln.strip())
    cL, mL, bge = gate_coefficients(theta, eta, alpha)
    f = lambda t: t.float().contiguous()  # noqa: E731
    F = W[0].shape[-1]
    bufs = dict(k=f(k), v=f(v), theta=f(theta), cL=f(cL), mL=f(mL), bge=f(bge),
                W1=f(W[0]), W2=f(W[1]), S1=f(S[0]), S2=f(S[1]),
                d2=torch.empty(BH, T, HEAD_DIM, device=dev), th=torch.empty(BH, T, device=dev))
    for name, shape in [("sW1", (HEAD_DIM, F)), ("sS1", (HEAD_DIM, F)), ("sW2", (F, HEAD_DIM)), ("sS2", (F, HEAD_DIM))]:
        bufs[name] = torch.empty(nc, BH, *shape, device=dev)
    init = {n: bufs[n].clone() for n in ("W1", "W2", "S1", "S2")}

    # 1. correctness against the chunked form in fp64
    keep = sorted({0, 1, nc // 2, nc - 1})
    walk(bufs, T, BH, clip)
    torch.cuda.synchronize()
    ref_state, ref_kept, ref_d2, ref_th = reference_walk(k, v, theta, eta, alpha, W, S, clip, keep)
    names = ["W1", "W2", "S1", "S2"]
    errs = {f"final {n}": _rel(bufs[n], r) for n, r in zip(names, ref_state)}
    for n in keep:
        for name, r in zip(names, ref_kept[n]):
            errs[f"chunk {n} start {name}"] = _rel(bufs["s" + name][n], r)
    errs["delta2"] = _rel(bufs["d2"], ref_d2)
    errs["theta'"] = _rel(bufs["th"], ref_th)
    import titans_memory.ops.triton_tiled as tt

    x = [t.float() for t in args] + [w.float().view(B, HEADS, *w.shape[1:]) for w in W + S]
    with torch.no_grad():
        _, Wt, St = tt.neural_memory_tiled_triton(*x[:6], x[6:8], x[8:], SPEC, CHUNK, clip)
    print("\n| quantity | CUDA walk rel. error vs fp64 | Triton operator rel. error vs fp64 |\n|---|---|---|")
    tri = {f"final {n}": _rel(t.reshape(BH, *t.shape[2:]), r) for n, t, r in zip(names, Wt + St, ref_state)}
    for key, e in errs.items():
        print(f"| {key} | {e:.2e} | {tri[key]:.2e} |" if key in tri else f"| {key} | {e:.2e} | |")

    # 2. timing: one launch walks the whole sequence
    def timed(heads, save, reps=10, kernel=walk):
        tot = 0.0
        for i in range(reps + 3):
            for n in init:
                bufs[n].copy_(init[n])
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            kernel(bufs, T, heads, clip, save)
            e.record()
            torch.cuda.synchronize()
            if i >= 3:
                tot += s.elapsed_time(e)
        return tot / reps * 1e3 / nc  # us per chunk

    print("\n| walk | heads (clusters of 4 CTAs) | chunk-start states stored | us per chunk |\n|---|---|---|---|")
    for heads, save in [(BH, True), (BH, False), (BH // 2, True), (BH // 4, True), (BH, True)]:
        print(f"| CUDA, {walk.warps} warps | {heads} | {save} | {timed(heads, save):.2f} |", flush=True)
    for w in (other,):  # the other build: its check (final W1) and its timings
        for n in init:
            bufs[n].copy_(init[n])
        w(bufs, T, BH, clip)
        torch.cuda.synchronize()
        print(f"| CUDA, {w.warps} warps (final W1 rel. error {_rel(bufs['W1'], ref_state[0]):.2e}) | {BH // 2} | True "
              f"| {timed(BH // 2, True, kernel=w):.2f} |", flush=True)
    run = lambda: tt.neural_memory_tiled_triton(*x[:6], x[6:8], x[8:], SPEC, CHUNK, clip, check=False)  # noqa: E731
    with torch.no_grad():
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        ks = gpu_kernels(run)
    tw = sum(us for n, _, us in ks if "_fwd_persistent" in n) / nc
    print(f"| Triton (_fwd_persistent_kernel, split forward) | {BH} | True | {tw:.2f} |")

    # 3. where one CTA's time goes (thread 0's SM cycles between barriers, clock64)
    print("\n| stretch of a chunk | " + " | ".join(f"us, {h} heads" for h in (BH // 2, BH)) + " |\n|---|---|---|")
    cols = []
    for heads in (BH // 2, BH):
        prof = torch.zeros(heads * NTILE, len(STRETCHES) + 1, dtype=torch.int64, device=dev)
        walk(bufs, T, heads, clip, True, prof)
        torch.cuda.synchronize()
        p = prof.double()
        ghz = p[:, :-1].sum(1) / p[:, -1]  # cycles per ns
        cols.append((p[:, :-1] / ghz[:, None]).mean(0) / nc / 1e3)
        print(f"# {heads} heads: SM clock {ghz.mean().item():.3f} GHz, walk {p[:, -1].mean().item() / nc / 1e3:.2f} us per chunk")
    for i, name in enumerate(STRETCHES):
        print(f"| {name} | " + " | ".join(f"{c[i].item():.2f}" for c in cols) + " |")
    print("\n| heads | us per chunk |\n|---|---|")
    for heads in (20, 24, 26, 28, 30, 31, 32):
        print(f"| {heads} | {timed(heads, True, reps=3):.2f} |", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[8192])
    ap.add_argument("--clip", type=float, nargs="+", default=[1.0, -1.0], help="-1: no clip")
    ap.add_argument("--emulate-cpu", action="store_true",
                    help="only the CPU emulation of truncated against rounded tf32 operands, at each --T")
    a = ap.parse_args()
    if a.emulate_cpu:
        print("| tf32 operands | T | final W1 | final W2 | final S1 | final S2 |\n|---|---|---|---|---|---|")
        for T in a.T:
            emulate_tf32(T)
        sys.exit(0)
    built = CudaWalk(8), CudaWalk(16)
    for T in a.T:
        for c in a.clip:
            main(T, None if c < 0 else c, *built)
