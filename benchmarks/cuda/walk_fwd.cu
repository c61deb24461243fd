// A probe, not library code: the forward state walk of the depth-2 memory (W1 shapes: head dim
// 64, 256 hidden units, chunk 64, SiLU, residual) written in CUDA C++ with the states resident in
// shared memory, to measure what a hand-written kernel reaches per chunk against the Triton walk
// (`_fwd_persistent_kernel`, about 30 us per chunk at 8k on the H200).
//
// Design: one thread-block cluster of 4 CTAs per (batch, head); CTA j owns hidden units
// [64 j, 64 j + 64): its W1 / S1 columns and W2 / S2 rows, fp32, in shared memory for the whole
// sequence. Per chunk (64 tokens): Z = K W1_j, H = silu(Z), P_j = H W2_j; the cluster sums the four
// P_j through distributed shared memory (y = sum_j P_j + k, delta2 = 2 (y - v)); delta1_j =
// (delta2 W2_j^T) silu'(Z); the clip sums |delta1_j|^2 and |h1_j|^2 over the cluster; then the
// chunk-end update of the tile, W = b W + g S - X^T (c o Delta), S = e S - X^T (m o Delta). The
// gate-only coefficients (c / theta', m / theta', b, g, e: `chunked.chunk_coefficients`) come
// precomputed for all chunks. Like the Triton walk it stores each chunk's start state, delta2 and
// the clipped theta (what the retrieval needs). Matmuls: WMMA tf32 m16n16k8, fp32 accumulation.
// The next chunk's k, v are prefetched with cp.async. Build: nvcc -gencode=arch=compute_90a,code=sm_90a -cubin.
#include <cooperative_groups.h>
#include <mma.h>

#include <type_traits>

namespace cg = cooperative_groups;
using namespace nvcuda;

constexpr int C = 64;    // chunk
constexpr int D = 64;    // head dim
constexpr int BF = 64;   // hidden units per CTA
constexpr int NTILE = 4; // CTAs per head (the cluster)
constexpr int F = BF * NTILE;
constexpr int LD = 68;   // padded row of every 64 x 64 shared-memory tile
constexpr int TILE = 64 * LD;
#ifndef WALK_WARPS
#define WALK_WARPS 8  // 8 or 16
#endif
constexpr int NTHREADS = 32 * WALK_WARPS;
constexpr int TPW = 16 / WALK_WARPS;    // 16 x 16 output tiles of a 64 x 64 matmul per warp
constexpr int TPR = NTHREADS / 64;      // threads per row in the elementwise phases
constexpr int NV = 64 / TPR / 4;        // float4 per thread there
constexpr int NCOPY = 1024 / NTHREADS;  // float4 per thread of a 64 x 64 tile copy
constexpr int NSTAMP = 12;  // timed stretches of a chunk (prof)

enum { B_W1, B_S1, B_W2, B_S2, B_K0, B_K1, B_V0, B_V1, B_Z, B_H, B_P, B_D2, NBUF };
constexpr int NSMALL = 7 * 64;  // hh, dd1 (read by the peers), hht, kk, dd2, cf, mf
// dynamic shared memory: (NBUF * TILE + NSMALL) * 4 = 210688 bytes

// C[64 x 64] = A B over k = 64; A(m, k) at A[m * lda + k] (AROW) or A[m + k * lda]; B(k, n) at
// B[k * ldb + n] (BROW) or B[k + n * ldb]. Warp w computes the tiles (w / 2, 2 (w % 2) + {0, 1}).
template <bool AROW, bool BROW>
__device__ __forceinline__ void mm64(const float* A, const float* B, float* Cout) {
    using AL = typename std::conditional<AROW, wmma::row_major, wmma::col_major>::type;
    using BL = typename std::conditional<BROW, wmma::row_major, wmma::col_major>::type;
    const int warp = threadIdx.x >> 5, tr = warp / (4 / TPW), tc = (warp % (4 / TPW)) * TPW;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc0, acc1;
    wmma::fill_fragment(acc0, 0.0f);
    wmma::fill_fragment(acc1, 0.0f);
#pragma unroll
    for (int k0 = 0; k0 < 64; k0 += 8) {
        wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, AL> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, BL> b0, b1;
        wmma::load_matrix_sync(a, AROW ? A + tr * 16 * LD + k0 : A + tr * 16 + k0 * LD, LD);
        const float* bp = BROW ? B + k0 * LD + tc * 16 : B + k0 + tc * 16 * LD;
        wmma::load_matrix_sync(b0, bp, LD);
        if (TPW == 2) wmma::load_matrix_sync(b1, BROW ? bp + 16 : bp + 16 * LD, LD);
#pragma unroll
        for (int i = 0; i < a.num_elements; i++) a.x[i] = wmma::__float_to_tf32(a.x[i]);
#pragma unroll
        for (int i = 0; i < b0.num_elements; i++) {
            b0.x[i] = wmma::__float_to_tf32(b0.x[i]);
            if (TPW == 2) b1.x[i] = wmma::__float_to_tf32(b1.x[i]);
        }
        wmma::mma_sync(acc0, a, b0, acc0);
        if (TPW == 2) wmma::mma_sync(acc1, a, b1, acc1);
    }
    wmma::store_matrix_sync(Cout + tr * 16 * LD + tc * 16, acc0, LD, wmma::mem_row_major);
    if (TPW == 2) wmma::store_matrix_sync(Cout + tr * 16 * LD + tc * 16 + 16, acc1, LD, wmma::mem_row_major);
}

// The chunk-end update of one layer's tile, in place: W = b W + g S - X^T Bc, S = e S - X^T Bm,
// with X [tokens x 64] row-major (so X^T is read column-major) and Bc, Bm [tokens x 64].
__device__ __forceinline__ void update(float* W, float* S, const float* X, const float* Bc, const float* Bm,
                                       float b, float g, float e) {
    const int warp = threadIdx.x >> 5, tr = warp / (4 / TPW), tc = (warp % (4 / TPW)) * TPW;
#pragma unroll
    for (int t = 0; t < TPW; t++) {
        const int col = (tc + t) * 16;
        wmma::fragment<wmma::accumulator, 16, 16, 8, float> uc, um, w, s;
        wmma::fill_fragment(uc, 0.0f);
        wmma::fill_fragment(um, 0.0f);
#pragma unroll
        for (int k0 = 0; k0 < 64; k0 += 8) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> bc, bm;
            wmma::load_matrix_sync(a, X + tr * 16 + k0 * LD, LD);
            wmma::load_matrix_sync(bc, Bc + k0 * LD + col, LD);
            wmma::load_matrix_sync(bm, Bm + k0 * LD + col, LD);
#pragma unroll
            for (int i = 0; i < a.num_elements; i++) a.x[i] = wmma::__float_to_tf32(a.x[i]);
#pragma unroll
            for (int i = 0; i < bc.num_elements; i++) {
                bc.x[i] = wmma::__float_to_tf32(bc.x[i]);
                bm.x[i] = wmma::__float_to_tf32(bm.x[i]);
            }
            wmma::mma_sync(uc, a, bc, uc);
            wmma::mma_sync(um, a, bm, um);
        }
        float* wp = W + tr * 16 * LD + col;
        float* sp = S + tr * 16 * LD + col;
        wmma::load_matrix_sync(w, wp, LD, wmma::mem_row_major);
        wmma::load_matrix_sync(s, sp, LD, wmma::mem_row_major);
#pragma unroll
        for (int i = 0; i < w.num_elements; i++) {
            const float wn = b * w.x[i] + g * s.x[i] - uc.x[i];
            s.x[i] = e * s.x[i] - um.x[i];
            w.x[i] = wn;
        }
        wmma::store_matrix_sync(wp, w, LD, wmma::mem_row_major);
        wmma::store_matrix_sync(sp, s, LD, wmma::mem_row_major);
    }
}

// 64 x 64 tiles between global rows of `gld` floats and a padded shared tile: 4 float4 per thread
__device__ __forceinline__ void g2s(float* s, const float* g, int gld) {
#pragma unroll
    for (int i = 0; i < NCOPY; i++) {
        const int idx = threadIdx.x + i * NTHREADS, r = idx >> 4, c4 = (idx & 15) * 4;
        *reinterpret_cast<float4*>(s + r * LD + c4) = *reinterpret_cast<const float4*>(g + (size_t)r * gld + c4);
    }
}

__device__ __forceinline__ void s2g(float* g, int gld, const float* s) {
#pragma unroll
    for (int i = 0; i < NCOPY; i++) {
        const int idx = threadIdx.x + i * NTHREADS, r = idx >> 4, c4 = (idx & 15) * 4;
        *reinterpret_cast<float4*>(g + (size_t)r * gld + c4) = *reinterpret_cast<const float4*>(s + r * LD + c4);
    }
}

__device__ __forceinline__ void g2s_async(float* s, const float* g) {
#pragma unroll
    for (int i = 0; i < NCOPY; i++) {
        const int idx = threadIdx.x + i * NTHREADS, r = idx >> 4, c4 = (idx & 15) * 4;
        const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(s + r * LD + c4));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(g + r * D + c4));
    }
}

__device__ __forceinline__ float quad_sum(float x) {  // over the TPR threads of a row
#pragma unroll
    for (int m = 1; m < TPR; m *= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void st4(float* p, float4 x) { *reinterpret_cast<float4*>(p) = x; }
__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
__device__ __forceinline__ float4 scale4(float4 a, float s) { return make_float4(s * a.x, s * a.y, s * a.z, s * a.w); }
__device__ __forceinline__ float silu(float z) { return z / (1.f + __expf(-z)); }
__device__ __forceinline__ float dsilu(float z) {
    const float sg = 1.f / (1.f + __expf(-z));
    return sg * (1.f + z * (1.f - sg));
}

template <bool CLIP>
__device__ __forceinline__ void walk_body(const float* __restrict__ k, const float* __restrict__ v,
                                          const float* __restrict__ theta, const float* __restrict__ cL,
                                          const float* __restrict__ mL, const float* __restrict__ bge,
                                          float* W1g, float* S1g, float* W2g, float* S2g,
                                          float* sW1, float* sS1, float* sW2, float* sS2,
                                          float* d2g, float* thg, int T, int BH, float clip, int save,
                                          long long* prof) {
    extern __shared__ __align__(128) float smem[];
    cg::cluster_group cluster = cg::this_cluster();
    const int j = (int)cluster.block_rank();
    const int bh = blockIdx.y;
    const int tid = threadIdx.x;
    const int NC = T / C;
    float* W1 = smem + B_W1 * TILE;
    float* S1 = smem + B_S1 * TILE;
    float* W2 = smem + B_W2 * TILE;
    float* S2 = smem + B_S2 * TILE;
    float* Z = smem + B_Z * TILE;
    float* H = smem + B_H * TILE;
    float* P = smem + B_P * TILE;
    float* D2 = smem + B_D2 * TILE;
    float* hh = smem + NBUF * TILE;  // |h1_j|^2 per token (read by the peers)
    float* dd1 = hh + 64;            // |delta1_j|^2 per token (read by the peers)
    float* hht = hh + 128;
    float* kk = hh + 192;
    float* dd2 = hh + 256;
    float* cf = hh + 320;
    float* mf = hh + 384;

    const size_t o1 = (size_t)bh * D * F + j * BF;       // W1 / S1 tile: rows d, columns j BF + f (row F)
    const size_t o2 = (size_t)bh * F * D + (size_t)j * BF * D;  // W2 / S2 tile: rows j BF + f (row D)
    g2s(W1, W1g + o1, F);
    g2s(S1, S1g + o1, F);
    g2s(W2, W2g + o2, D);
    g2s(S2, S2g + o2, D);
    const size_t kv0 = (size_t)bh * T * D;
    g2s_async(smem + B_K0 * TILE, k + kv0);
    g2s_async(smem + B_V0 * TILE, v + kv0);
    asm volatile("cp.async.commit_group;\n" ::);

    const int r = tid / TPR, cb = (tid % TPR) * 4 * NV;  // the elementwise phases: row r, 4 NV columns
    // prof (timing only): thread 0's SM cycles between the barriers, summed over the chunks
    const bool timer = prof != nullptr && tid == 0;
    long long acc[NSTAMP] = {};
    long long tprev = 0;
    unsigned long long g0 = 0, g1 = 0;
    if (timer) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));
        tprev = clock64();
    }
#define STAMP(i)                          \
    if (timer) {                          \
        const long long tn = clock64();   \
        acc[i] += tn - tprev;             \
        tprev = tn;                       \
    }
    for (int n = 0; n < NC; n++) {
        float* K = smem + (B_K0 + (n & 1)) * TILE;
        float* V = smem + (B_V0 + (n & 1)) * TILE;
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        __syncthreads();
        STAMP(0)
        if (n + 1 < NC) {
            g2s_async(smem + (B_K0 + ((n + 1) & 1)) * TILE, k + kv0 + (size_t)(n + 1) * C * D);
            g2s_async(smem + (B_V0 + ((n + 1) & 1)) * TILE, v + kv0 + (size_t)(n + 1) * C * D);
            asm volatile("cp.async.commit_group;\n" ::);
        }
        if (save) {  // 0: timing only, the chunk-start states are not stored
            const size_t st = (size_t)n * BH;
            s2g(sW1 + st * D * F + o1, F, W1);
            s2g(sS1 + st * D * F + o1, F, S1);
            s2g(sW2 + st * F * D + o2, D, W2);
            s2g(sS2 + st * F * D + o2, D, S2);
        }
        const size_t tok = (size_t)bh * T + (size_t)n * C;
        float th = 0.f, cl = 0.f, ml = 0.f;
        if (tid < 64) {
            th = theta[tok + tid];
            cl = cL[tok + tid];
            ml = mL[tok + tid];
        }
        const float* gate = bge + ((size_t)bh * NC + n) * 3;
        const float bl = gate[0], gl = gate[1], el = gate[2];

        mm64<true, true>(K, W1, Z);  // z1 = k W1_j
        __syncthreads();
        STAMP(1)
        {  // every phase below loads its operands first (generic pointers: no reordering across stores)
            float4 zv[NV];
#pragma unroll
            for (int c = 0; c < NV; c++) zv[c] = ld4(Z + r * LD + cb + 4 * c);
            float acc = 0.f;
#pragma unroll
            for (int c = 0; c < NV; c++) {
                const float4 h = make_float4(silu(zv[c].x), silu(zv[c].y), silu(zv[c].z), silu(zv[c].w));
                st4(H + r * LD + cb + 4 * c, h);
                acc += dot4(h, h);
            }
            acc = quad_sum(acc);
            if (tid % TPR == 0) hh[r] = acc;
        }
        __syncthreads();
        STAMP(2)
        mm64<true, true>(H, W2, P);  // the tile's part of h1 W2
        STAMP(3)
        cluster.sync();              // every P_j and hh_j visible in the cluster
        STAMP(4)
        {
            float4 pv[NTILE][NV], kx[NV], vx[NV];
#pragma unroll
            for (int q = 0; q < NTILE; q++) {
                const float* Pq = cluster.map_shared_rank(P, q);
#pragma unroll
                for (int c = 0; c < NV; c++) pv[q][c] = ld4(Pq + r * LD + cb + 4 * c);
            }
#pragma unroll
            for (int c = 0; c < NV; c++) {
                kx[c] = ld4(K + r * LD + cb + 4 * c);
                vx[c] = ld4(V + r * LD + cb + 4 * c);
            }
            float a2 = 0.f, ak = 0.f;
#pragma unroll
            for (int c = 0; c < NV; c++) {
                float4 d;
                d.x = 2.f * (pv[0][c].x + pv[1][c].x + pv[2][c].x + pv[3][c].x + kx[c].x - vx[c].x);
                d.y = 2.f * (pv[0][c].y + pv[1][c].y + pv[2][c].y + pv[3][c].y + kx[c].y - vx[c].y);
                d.z = 2.f * (pv[0][c].z + pv[1][c].z + pv[2][c].z + pv[3][c].z + kx[c].z - vx[c].z);
                d.w = 2.f * (pv[0][c].w + pv[1][c].w + pv[2][c].w + pv[3][c].w + kx[c].w - vx[c].w);
                st4(D2 + r * LD + cb + 4 * c, d);
                if ((r >> 4) == j)  // each CTA stores a quarter of delta2's rows
                    st4(d2g + (tok + r) * D + cb + 4 * c, d);
                a2 += dot4(d, d);
                ak += dot4(kx[c], kx[c]);
            }
            if (CLIP) {
                a2 = quad_sum(a2);
                ak = quad_sum(ak);
                if (tid % TPR == 0) {
                    dd2[r] = a2;
                    kk[r] = ak;
                }
                if (tid < 64) {
                    float s = 0.f;
#pragma unroll
                    for (int q = 0; q < NTILE; q++) s += cluster.map_shared_rank(hh, q)[tid];
                    hht[tid] = s;
                }
            }
        }
        __syncthreads();
        STAMP(5)
        mm64<true, false>(D2, W2, V);  // delta2 W2_j^T, into V (no longer needed)
        __syncthreads();
        STAMP(6)
        {
            float4 zv[NV], tv[NV];
#pragma unroll
            for (int c = 0; c < NV; c++) {
                zv[c] = ld4(Z + r * LD + cb + 4 * c);
                tv[c] = ld4(V + r * LD + cb + 4 * c);
            }
            float acc = 0.f;
#pragma unroll
            for (int c = 0; c < NV; c++) {
                const float4 d1 = make_float4(tv[c].x * dsilu(zv[c].x), tv[c].y * dsilu(zv[c].y),
                                              tv[c].z * dsilu(zv[c].z), tv[c].w * dsilu(zv[c].w));
                st4(Z + r * LD + cb + 4 * c, d1);
                acc += dot4(d1, d1);
            }
            if (CLIP) {
                acc = quad_sum(acc);
                if (tid % TPR == 0) dd1[r] = acc;
            }
        }
        STAMP(7)
        cluster.sync();  // dd1_j visible; every peer has read this CTA's P
        STAMP(8)
        if (tid < 64) {
            float thc = th;
            if (CLIP) {
                float s = 0.f;
#pragma unroll
                for (int q = 0; q < NTILE; q++) s += cluster.map_shared_rank(dd1, q)[tid];
                const float nrm = sqrtf(kk[tid] * s + hht[tid] * dd2[tid] + 1e-30f);
                thc = th * fminf(clip / nrm, 1.f);
            }
            cf[tid] = thc * cl;
            mf[tid] = thc * ml;
            if (j == 0) thg[tok + tid] = thc;
        }
        __syncthreads();
        STAMP(9)
        {
            const float c = cf[r], m = mf[r];
            float4 dv2[NV], dv1[NV];
#pragma unroll
            for (int q = 0; q < NV; q++) {
                dv2[q] = ld4(D2 + r * LD + cb + 4 * q);
                dv1[q] = ld4(Z + r * LD + cb + 4 * q);
            }
#pragma unroll
            for (int q = 0; q < NV; q++) {
                const int e = r * LD + cb + 4 * q;
                st4(P + e, scale4(dv2[q], c));
                st4(V + e, scale4(dv2[q], m));
                st4(Z + e, scale4(dv1[q], c));
                st4(D2 + e, scale4(dv1[q], m));
            }
        }
        __syncthreads();
        STAMP(10)
        update(W1, S1, K, Z, D2, bl, gl, el);
        update(W2, S2, H, P, V, bl, gl, el);
        __syncthreads();
        STAMP(11)
    }
    if (timer) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));
        long long* out = prof + ((size_t)bh * NTILE + j) * (NSTAMP + 1);
#pragma unroll
        for (int i = 0; i < NSTAMP; i++) out[i] = acc[i];
        out[NSTAMP] = (long long)(g1 - g0);
    }
    s2g(W1g + o1, F, W1);
    s2g(S1g + o1, F, S1);
    s2g(W2g + o2, D, W2);
    s2g(S2g + o2, D, S2);
    cluster.sync();  // no CTA exits while a peer may still read its shared memory
}

#define WALK_ARGS                                                                                       \
    const float *__restrict__ k, const float *__restrict__ v, const float *__restrict__ theta,          \
        const float *__restrict__ cL, const float *__restrict__ mL, const float *__restrict__ bge,     \
        float *W1g, float *S1g, float *W2g, float *S2g, float *sW1, float *sS1, float *sW2, float *sS2, \
        float *d2g, float *thg, int T, int BH, float clip, int save, long long *prof
#define WALK_CALL k, v, theta, cL, mL, bge, W1g, S1g, W2g, S2g, sW1, sS1, sW2, sS2, d2g, thg, T, BH, clip, save, prof

extern "C" __global__ void __cluster_dims__(NTILE, 1, 1) __launch_bounds__(NTHREADS, 1)
    walk_fwd_clip(WALK_ARGS) { walk_body<true>(WALK_CALL); }

extern "C" __global__ void __cluster_dims__(NTILE, 1, 1) __launch_bounds__(NTHREADS, 1)
    walk_fwd_noclip(WALK_ARGS) { walk_body<false>(WALK_CALL); }
