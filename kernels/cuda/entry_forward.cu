// mHC entry forward in one pass over x (Hopper, sm_90): norm + projection + mappings + pre-apply.
//
// For x [T, n, C] (bf16 or fp16), phi [n*C, M] (in x's dtype), M = n*n + 2n, alpha [3], bias [M]
// (float32), per token: proj = x_row @ phi (float32 accumulate), rinv = 1 / sqrt(sum(x^2)/(n*C) +
// eps), then the mappings exactly as the Triton `_mappings_epilogue` (mhc: sigmoid, 2*sigmoid,
// log-domain Sinkhorn of the clamped logits; hc: alpha * tanh + bias), and agg[t, c] =
// sum_i H_pre[t, i] x[t, i, c] in x's dtype.
//
// Layout of the work: a thread-block cluster of CL CTAs owns a stream of token tiles (TT = 8
// tokens, the N of mma.m16n8k16); CTA rank r owns the channel slice [r*Cs, (r+1)*Cs) of every
// stream. Each CTA
//   * keeps its slice of phi in shared memory for the whole (persistent) kernel, pre-arranged as
//     mma A fragments of phi^T (rows = mapping index, cols = k);
//   * streams its slice of each token tile (8 tokens x n streams x Cs channels) from HBM into a
//     ring of S shared-memory stages with 1-D bulk copies (cp.async.bulk, completion on an
//     mbarrier), reads it once for the projection partials (ldmatrix + mma.sync, sum of squares from
//     the same fragments) and once more, from shared memory, for its slice of agg;
//   * pushes its partials [TT, M + 1] into the tile owner's shared memory (DSMEM; owner = tile
//     index mod CL) with st.async, each store completing bytes of the owner's mbarrier (no
//     cluster-scope fence or release: those wait for the CTA's outstanding global stores);
//   * runs a mapping warp: for each tile it owns it sums the CL partials, computes rinv and the
//     mappings of the tile's tokens (one token per lane), writes proj / rinv / h_pre / h_post /
//     h_res, and broadcasts H_pre into every CTA's shared memory (st.async again).
// The stream warps run the projection of tile j and then the pre-apply of tile j - D, so the
// mapping latency (the 2 * iters dependent Sinkhorn half-steps) overlaps D tiles of streaming.
// x is read from HBM exactly once; phi once per CTA.
//
// No torch headers: the launcher is a C function called through ctypes (kernels/cuda/entry.py).

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdio.h>

namespace mhc_entry {

constexpr int W = 8;           // stream warps
constexpr int THREADS = (W + 1) * 32;
constexpr int STREAM_THREADS = W * 32;
constexpr float LOGIT_LIMIT = 1.0e4f;  // reference.SINKHORN_LOGIT_LIMIT

// ------------------------------------------------------------------------------------------
// PTX helpers
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_id() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t num_clusters() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ uint32_t map_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
// A store into another CTA's shared memory that completes `4 bytes` of the transaction count
// of that CTA's mbarrier: the receiver's wait on the barrier then sees the data, no fence needed.
__device__ __forceinline__ void st_async_f32(uint32_t addr, float v, uint32_t remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(addr),
               "r"(__float_as_uint(v)), "r"(remote_bar)
               : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void mbar_wait_cluster(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void stream_barrier() {
  asm volatile("bar.sync 1, %0;" ::"n"(STREAM_THREADS) : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r0), "=r"(r1)
               : "r"(addr));
}

template <typename E>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
  __device__ static __forceinline__ float2 to_f2(uint32_t v) {
    __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&v);
    return __bfloat1622float2(h);
  }
  __device__ static __forceinline__ uint32_t from_f2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __forceinline__ void mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
template <>
struct Elem<__half> {
  __device__ static __forceinline__ float2 to_f2(uint32_t v) {
    __half2 h = *reinterpret_cast<__half2*>(&v);
    return __half22float2(h);
  }
  __device__ static __forceinline__ uint32_t from_f2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __forceinline__ void mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

// ------------------------------------------------------------------------------------------
// Geometry shared by host and device
// ------------------------------------------------------------------------------------------
struct Geometry {
  int n, C, M, MW;      // streams, channels, mapping width, partial row width (M + 1)
  int TT;               // tokens per tile: 8 or 16 (one or two mma N groups)
  int CL, S, D, PH, PR; // cluster size, x stages, pre-apply distance, H_pre / receive slots
  int Cs, CsP, QPS, NQ; // channels per CTA (mult. of 8), padded to 16, k16 chunks per stream, total
  int MTF, HALF;        // full 16-row m-tiles of phi^T, and a trailing 8-row half tile (0/1)
  int RS;               // x stage row stride (elements)
  int chunk_bytes;      // phi fragment bytes per k16 chunk
  // byte offsets into dynamic shared memory
  int off_bar, off_hpre, off_recv, off_red, off_ssred, off_mapbuf, off_phi, off_x, stage_bytes;
  int smem;
};

__host__ __device__ inline int round_up(int a, int b) { return (a + b - 1) / b * b; }

inline Geometry make_geometry(int n, int C, int CL, int S, int D, int TT) {
  Geometry g;
  g.TT = TT;
  g.n = n;
  g.C = C;
  g.M = n * n + 2 * n;
  g.MW = g.M + 1;
  g.CL = CL;
  g.S = S;
  g.D = D;
  g.PH = D + 1;
  // The owner of tile j (j mod CL) gets tile j + CL*PR in the same receive slot; a CTA pushes
  // tile j only after its pre-apply of tile j - 1 - D, which waited for that owner's H_pre of
  // tile j - CL*PR (sent after reading the slot) when CL*PR >= D + 1.
  g.PR = (D + 1 + CL - 1) / CL;
  g.Cs = round_up((C + CL - 1) / CL, 8);
  g.CsP = round_up(g.Cs, 16);
  g.QPS = g.CsP / 16;
  g.NQ = n * g.QPS;
  int mp = round_up(g.M, 8);
  g.MTF = mp / 16;
  g.HALF = (mp % 16) ? 1 : 0;
  g.RS = n * g.CsP + 8;  // +16 bytes: the 8 ldmatrix rows hit 8 different 16-byte bank groups
  g.chunk_bytes = g.MTF * 512 + g.HALF * 256;
  int off = 0;
  g.off_bar = off;
  off += 512;
  g.off_hpre = off;
  off += round_up((g.PH + 1) * TT * 8 * 4, 128);  // + the mapping warp's own copy
  g.off_recv = off;
  off += round_up(g.PR * CL * TT * g.MW * 4, 128);
  int mrows = (g.MTF + g.HALF) * 16;
  g.off_red = off;
  off += round_up(W * mrows * TT * 4, 128);
  g.off_ssred = off;
  off += round_up(W * TT * 4, 128);
  g.off_mapbuf = off;
  off += round_up(TT * g.MW * 4, 128);
  g.off_phi = off;
  off += round_up(g.NQ * g.chunk_bytes, 128);
  g.off_x = off;
  g.stage_bytes = round_up(TT * g.RS * 2, 128);
  off += S * g.stage_bytes;
  g.smem = off;
  return g;
}

struct Params {
  const void* x;      // [T, n, C]
  const void* phi;    // [n*C, M], x's dtype
  const float* alpha; // [3]
  const float* bias;  // [M]
  float* proj;        // [T, M]
  float* rinv;        // [T]
  float* h_pre;       // [T, n]
  float* h_post;      // [T, n]
  float* h_res;       // [T, n, n]
  void* agg;          // [T, C]
  long long T;
  float eps;
  int iters;
  int variant_mhc;
  int debug;  // timing probes only: 1 skips the projection loop, 2 the pre-apply loop
};

__device__ __forceinline__ float fast_tanh(float v) {  // kernels/triton/mappings.py _tanh
  float e = __expf(-2.0f * fabsf(v));
  float t = (1.0f - e) / (1.0f + e);
  return v >= 0.0f ? t : -t;
}
__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }
__device__ __forceinline__ float clamp_logit(float z) {  // keeps NaN
  return z > LOGIT_LIMIT ? LOGIT_LIMIT : (z < -LOGIT_LIMIT ? -LOGIT_LIMIT : z);
}

// ------------------------------------------------------------------------------------------
// The kernel
// ------------------------------------------------------------------------------------------
template <typename E, int N, int TT>
__global__ void __launch_bounds__(THREADS, 1) entry_fwd_kernel(const Params p, const Geometry g) {
  constexpr int M = N * N + 2 * N;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const uint32_t rank = cluster_rank();
  const uint32_t cid = cluster_id();
  const uint32_t ncl = num_clusters();
  const int CL = g.CL, S = g.S, D = g.D, PH = g.PH;
  const int C = g.C;
  const long long T = p.T;
  const long long num_tiles = (T + TT - 1) / TT;
  const int ntile = (cid < num_tiles) ? (int)((num_tiles - 1 - cid) / ncl + 1) : 0;
  const int c0 = (int)rank * g.Cs;
  const int valid_c = max(0, min(g.Cs, C - c0));

  const uint32_t sbase = smem_u32(smem);
  const uint32_t bar_full = sbase + g.off_bar;            // S (<= 16)
  const uint32_t bar_part = sbase + g.off_bar + 8 * 16;   // PR (<= 16)
  const uint32_t bar_hpre = sbase + g.off_bar + 8 * 32;   // PH (<= 16)
  float* hpre_s = reinterpret_cast<float*>(smem + g.off_hpre);  // [PH + 1][TT][8]
  float* recv = reinterpret_cast<float*>(smem + g.off_recv);    // [PR][CL][TT][MW]
  float* red = reinterpret_cast<float*>(smem + g.off_red);      // [W][mrows][TT]
  float* ssred = reinterpret_cast<float*>(smem + g.off_ssred);  // [W][TT]
  float* mapbuf = reinterpret_cast<float*>(smem + g.off_mapbuf);
  unsigned char* phif = smem + g.off_phi;
  unsigned char* xs = smem + g.off_x;
  const int mrows = (g.MTF + g.HALF) * 16;

  // ---- prologue: barriers, zeroed x stages, phi fragments --------------------------------
  if (tid == 0) {
    for (int s = 0; s < S; ++s) mbar_init(bar_full + 8 * s, 1);
    for (int s = 0; s < g.PR; ++s) mbar_init(bar_part + 8 * s, 1);
    for (int s = 0; s < PH; ++s) mbar_init(bar_hpre + 8 * s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  {
    uint4* xz = reinterpret_cast<uint4*>(xs);
    const int nz = S * g.stage_bytes / 16;
    for (int i = tid; i < nz; i += THREADS) xz[i] = make_uint4(0, 0, 0, 0);
  }
  {
    // phi^T as mma A fragments, per k16 chunk q and m-tile mt: lane l = 4 * gg + c holds a0 (row
    // gg, k 2c..2c+1), a1 (row gg+8), a2 (row gg, k 2c+8..), a3 (row gg+8, k 2c+8..); rows = m.
    // Half tiles (8 real rows) keep a0 / a2 only. Zero first (padding rows and channels past
    // this CTA's slice stay 0), then scatter each element of the slice (contiguous in global
    // memory per stream: rows i*C + c0 .. i*C + c0 + valid_c of phi) into its fragment slot.
    uint32_t* pz = reinterpret_cast<uint32_t*>(phif);
    const int nzw = g.NQ * g.chunk_bytes / 4;
    for (int i = tid; i < nzw; i += THREADS) pz[i] = 0u;
    __syncthreads();
    const uint16_t* phi16 = reinterpret_cast<const uint16_t*>(p.phi);
    const int seg = valid_c * M;  // elements per stream segment
    constexpr int VW = (M % 8 == 0) ? 8 : 1;
    const int nvec = N * (seg / VW);
    uint16_t* pf16 = reinterpret_cast<uint16_t*>(phif);
#pragma unroll 4
    for (int e = tid; e < nvec; e += THREADS) {
      const int si = e / (seg / VW);
      const int f = (e - si * (seg / VW)) * VW;
      const uint16_t* src = phi16 + ((long long)si * C + c0) * M + f;
      uint16_t vals[VW];
      if (VW == 8) {
        const uint4 v4 = *reinterpret_cast<const uint4*>(src);
        const uint16_t* pv = reinterpret_cast<const uint16_t*>(&v4);
#pragma unroll
        for (int h = 0; h < VW; ++h) vals[h] = pv[h];
      } else {
        vals[0] = src[0];
      }
#pragma unroll
      for (int h = 0; h < VW; ++h) {
        const int kl = (f + h) / M, m = (f + h) - kl * M;  // channel in slice, mapping index
        const int q = si * g.QPS + kl / 16, kk = kl % 16;
        const int mt = m / 16, r16 = m % 16;
        const int ln = (r16 % 8) * 4 + (kk % 8) / 2;
        int byte;
        if (mt < g.MTF) {
          byte = q * g.chunk_bytes + mt * 512 + ln * 16 + ((r16 >= 8) + 2 * (kk >= 8)) * 4;
        } else {  // half tile: r16 < 8
          byte = q * g.chunk_bytes + g.MTF * 512 + ln * 8 + (kk >= 8) * 4;
        }
        pf16[(byte >> 1) + (kk & 1)] = vals[h];
      }
    }
  }
  fence_proxy_async();
  __syncthreads();
  cluster_sync_all();

  const E* xg = reinterpret_cast<const E*>(p.x);
  auto issue_load = [&](int jj) {  // one warp: lane 0 arms the barrier, the lanes issue the copies
    const int s = jj % S;
    const long long tile = (long long)cid + (long long)jj * ncl;
    const long long tok0 = tile * TT;
    const int tv = (int)min((long long)TT, T - tok0);
    const uint32_t bytes = (uint32_t)(tv * N * valid_c * 2);
    const uint32_t bar = bar_full + 8 * s;
    if (lane == 0) {
      if (bytes == 0)
        mbar_arrive(bar);
      else
        mbar_arrive_expect_tx(bar, bytes);
    }
    __syncwarp();
    if (bytes == 0) return;
    const uint32_t dst0 = sbase + g.off_x + s * g.stage_bytes;
    for (int e = lane; e < tv * N; e += 32) {
      const int t = e / N, i = e - t * N;
      bulk_g2s(dst0 + (uint32_t)((t * g.RS + i * g.CsP) * 2),
               xg + ((tok0 + t) * N + i) * (long long)C + c0, (uint32_t)(valid_c * 2), bar);
    }
  };

  if (warp < W) {
    // ================================ stream warps ========================================
    if (warp == 0)
      for (int jj = 0; jj < min(S, ntile); ++jj) issue_load(jj);
    const int gq = lane >> 2, cq = lane & 3;
    for (int jj = 0; jj < ntile + D; ++jj) {
      if (jj < ntile) {
        const int s = jj % S;
        mbar_wait(bar_full + 8 * s, (uint32_t)((jj / S) & 1));
        const uint32_t xstage = sbase + g.off_x + s * g.stage_bytes;
        constexpr int NG = TT / 8;  // token groups of 8 (mma N)
        constexpr int MTA = (M + 15) / 16;
        float acc[NG][MTA][4];
#pragma unroll
        for (int u = 0; u < NG; ++u)
#pragma unroll
          for (int a = 0; a < MTA; ++a) acc[u][a][0] = acc[u][a][1] = acc[u][a][2] = acc[u][a][3] = 0.f;
        float ss[NG];
#pragma unroll
        for (int u = 0; u < NG; ++u) ss[u] = 0.f;
        // ldmatrix row address of this lane: token (lane & 7) (+ 8 for lanes 16..31 when TT = 16),
        // k offset ((lane >> 3) & 1) * 8
        const int lrow_tok = (lane & 7) + (NG == 2 ? ((lane >> 4) & 1) * 8 : 0);
        const uint32_t lrow = xstage + (uint32_t)((lrow_tok * g.RS + ((lane >> 3) & 1) * 8) * 2);
#pragma unroll 2
        for (int q = warp; q < ((p.debug & 1) ? 0 : g.NQ); q += W) {
          const int si = q / g.QPS;
          const int cc = (q - si * g.QPS) * 16;
          uint32_t b[NG][2];
          if (NG == 2) {
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                         : "=r"(b[0][0]), "=r"(b[0][1]), "=r"(b[NG - 1][0]), "=r"(b[NG - 1][1])
                         : "r"(lrow + (uint32_t)((si * g.CsP + cc) * 2)));
          } else {
            ldmatrix_x2(lrow + (uint32_t)((si * g.CsP + cc) * 2), b[0][0], b[0][1]);
          }
#pragma unroll
          for (int u = 0; u < NG; ++u) {
            const float2 f0 = Elem<E>::to_f2(b[u][0]), f1 = Elem<E>::to_f2(b[u][1]);
            ss[u] += f0.x * f0.x + f0.y * f0.y + f1.x * f1.x + f1.y * f1.y;
          }
          const unsigned char* fr = phif + q * g.chunk_bytes;
#pragma unroll
          for (int mt = 0; mt < M / 16; ++mt) {
            const uint4 a = reinterpret_cast<const uint4*>(fr + mt * 512)[lane];
#pragma unroll
            for (int u = 0; u < NG; ++u) Elem<E>::mma(acc[u][mt], a.x, a.y, a.z, a.w, b[u][0], b[u][1]);
          }
          if ((M % 16) != 0) {
            constexpr int mt = M / 16;
            if (((M + 7) / 8 * 8) % 16 != 0) {  // half tile: 8 real rows
              const uint2 a = reinterpret_cast<const uint2*>(fr + mt * 512)[lane];
#pragma unroll
              for (int u = 0; u < NG; ++u) Elem<E>::mma(acc[u][mt], a.x, 0u, a.y, 0u, b[u][0], b[u][1]);
            } else {
              const uint4 a = reinterpret_cast<const uint4*>(fr + mt * 512)[lane];
#pragma unroll
              for (int u = 0; u < NG; ++u) Elem<E>::mma(acc[u][mt], a.x, a.y, a.z, a.w, b[u][0], b[u][1]);
            }
          }
        }
        // per-warp partials -> shared memory
        float* rw = red + warp * mrows * TT;
#pragma unroll
        for (int u = 0; u < NG; ++u) {
#pragma unroll
          for (int mt = 0; mt < MTA; ++mt) {
            *reinterpret_cast<float2*>(rw + (mt * 16 + gq) * TT + u * 8 + 2 * cq) = make_float2(acc[u][mt][0], acc[u][mt][1]);
            *reinterpret_cast<float2*>(rw + (mt * 16 + gq + 8) * TT + u * 8 + 2 * cq) = make_float2(acc[u][mt][2], acc[u][mt][3]);
          }
          float sv = ss[u];
          sv += __shfl_xor_sync(0xffffffffu, sv, 1);
          sv += __shfl_xor_sync(0xffffffffu, sv, 2);
          if (cq == 0) ssred[warp * TT + u * 8 + gq] = sv;
        }
        stream_barrier();
        // CTA partials -> the owner's receive buffer (DSMEM), then one arrive on its barrier
        const uint32_t owner = (uint32_t)(jj % CL);
        const int rslot = (jj / CL) % g.PR;
        const uint32_t rbase = map_to_rank(sbase + g.off_recv, owner) +
                               (uint32_t)((rslot * CL + (int)rank) * (TT * g.MW * 4));
        const uint32_t rbar = map_to_rank(bar_part + 8 * rslot, owner);
        for (int e = tid; e < TT * g.MW; e += STREAM_THREADS) {
          const int t = e / g.MW, j = e - t * g.MW;
          float v = 0.f;
          if (j < M) {
#pragma unroll
            for (int w = 0; w < W; ++w) v += red[(w * mrows + j) * TT + t];
          } else {
#pragma unroll
            for (int w = 0; w < W; ++w) v += ssred[w * TT + t];
          }
          st_async_f32(rbase + (uint32_t)(e * 4), v, rbar);
        }
        stream_barrier();  // red / ssred are rewritten by the next tile
      }
      if (jj >= D) {
        // pre-apply of tile a = jj - D from its shared-memory stage
        const int a = jj - D;
        const int s = a % S;
        const int hs = a % PH;
        if (tid == 0) mbar_arrive_expect_tx(bar_hpre + 8 * hs, (uint32_t)(TT * N * 4));
        mbar_wait_cluster(bar_hpre + 8 * hs, (uint32_t)((a / PH) & 1));
        const long long tile = (long long)cid + (long long)a * ncl;
        const long long tok0 = tile * TT;
        const int tv = (int)min((long long)TT, T - tok0);
        const int nv = valid_c / 8;
        const float* hp = hpre_s + hs * TT * 8;
        const unsigned char* xst = xs + s * g.stage_bytes;
        E* aggp = reinterpret_cast<E*>(p.agg);
        for (int e = tid; e < ((p.debug & 2) ? 0 : tv * nv); e += STREAM_THREADS) {
          const int t = e / nv, v = e - t * nv;
          float o[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) o[k] = 0.f;
#pragma unroll
          for (int i = 0; i < N; ++i) {
            const float h = hp[t * 8 + i];
            const uint4 xv = *reinterpret_cast<const uint4*>(xst + (t * g.RS + i * g.CsP + v * 8) * 2);
            const uint32_t w4[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const float2 f = Elem<E>::to_f2(w4[k]);
              o[2 * k] += h * f.x;
              o[2 * k + 1] += h * f.y;
            }
          }
          uint4 ov;
          ov.x = Elem<E>::from_f2(o[0], o[1]);
          ov.y = Elem<E>::from_f2(o[2], o[3]);
          ov.z = Elem<E>::from_f2(o[4], o[5]);
          ov.w = Elem<E>::from_f2(o[6], o[7]);
          *reinterpret_cast<uint4*>(aggp + (tok0 + t) * C + c0 + v * 8) = ov;
        }
        stream_barrier();
        if (warp == 0 && a + S < ntile) {
          fence_proxy_async();
          issue_load(a + S);
        }
      }
    }
  } else {
    // ================================ mapping warp ========================================
    const float a_pre = p.alpha[0], a_post = p.alpha[1], a_res = p.alpha[2];
    const float inv_k = 1.0f / (float)(N * C);
    for (int jj = (int)rank; jj < ntile; jj += CL) {
      const int k = jj / CL;
      const int rslot = k % g.PR;
      if (lane == 0) mbar_arrive_expect_tx(bar_part + 8 * rslot, (uint32_t)(CL * TT * g.MW * 4));
      mbar_wait_cluster(bar_part + 8 * rslot, (uint32_t)((k / g.PR) & 1));
      const float* rv = recv + rslot * CL * TT * g.MW;
      for (int e = lane; e < TT * g.MW; e += 32) {
        float v = 0.f;
        for (int src = 0; src < CL; ++src) v += rv[src * TT * g.MW + e];
        mapbuf[e] = v;
      }
      __syncwarp();
      const long long tile = (long long)cid + (long long)jj * ncl;
      const long long tok0 = tile * TT;
      const int hs = jj % PH;
      if (lane < TT) {
        const int t = lane;
        const long long tok = tok0 + t;
        const bool valid = tok < T;
        const float* pr = mapbuf + t * g.MW;
        const float rinv = 1.0f / sqrtf(pr[M] * inv_k + p.eps);
        float hpre[N], hpost[N], v[N][N];
#pragma unroll
        for (int i = 0; i < N; ++i) {
          float dp = pr[i] * rinv, dq = pr[N + i] * rinv;
          if (p.variant_mhc) {
            hpre[i] = sigmoid(a_pre * dp + p.bias[i]);
            hpost[i] = 2.0f * sigmoid(a_post * dq + p.bias[N + i]);
          } else {
            hpre[i] = a_pre * fast_tanh(dp) + p.bias[i];
            hpost[i] = a_post * fast_tanh(dq) + p.bias[N + i];
          }
#pragma unroll
          for (int j = 0; j < N; ++j) {
            const float dr = pr[2 * N + i * N + j] * rinv;
            v[i][j] = p.variant_mhc ? a_res * dr + p.bias[2 * N + i * N + j]
                                    : a_res * fast_tanh(dr) + p.bias[2 * N + i * N + j];
          }
        }
        if (p.variant_mhc) {
#pragma unroll
          for (int i = 0; i < N; ++i)
#pragma unroll
            for (int j = 0; j < N; ++j) v[i][j] = clamp_logit(v[i][j]);
          for (int it = 0; it < p.iters; ++it) {
#pragma unroll
            for (int i = 0; i < N; ++i) {  // rows
              float m = v[i][0];
#pragma unroll
              for (int j = 1; j < N; ++j) m = fmaxf(m, v[i][j]);
              m = (m > -INFINITY) ? m : 0.0f;
              float s = 0.f;
#pragma unroll
              for (int j = 0; j < N; ++j) s += __expf(v[i][j] - m);
              const float lse = m + __logf(s);
#pragma unroll
              for (int j = 0; j < N; ++j) v[i][j] -= lse;
            }
#pragma unroll
            for (int j = 0; j < N; ++j) {  // columns
              float m = v[0][j];
#pragma unroll
              for (int i = 1; i < N; ++i) m = fmaxf(m, v[i][j]);
              m = (m > -INFINITY) ? m : 0.0f;
              float s = 0.f;
#pragma unroll
              for (int i = 0; i < N; ++i) s += __expf(v[i][j] - m);
              const float lse = m + __logf(s);
#pragma unroll
              for (int i = 0; i < N; ++i) v[i][j] -= lse;
            }
          }
#pragma unroll
          for (int i = 0; i < N; ++i)
#pragma unroll
            for (int j = 0; j < N; ++j) v[i][j] = __expf(v[i][j]);
        }
        if (valid) {
          for (int j = 0; j < M; ++j) p.proj[tok * M + j] = pr[j];
          p.rinv[tok] = rinv;
#pragma unroll
          for (int i = 0; i < N; ++i) {
            p.h_pre[tok * N + i] = hpre[i];
            p.h_post[tok * N + i] = hpost[i];
#pragma unroll
            for (int j = 0; j < N; ++j) p.h_res[(tok * N + i) * N + j] = v[i][j];
          }
        }
#pragma unroll
        for (int i = 0; i < N; ++i) hpre_s[(PH * TT + t) * 8 + i] = hpre[i];
      }
      __syncwarp();
      // H_pre of the tile into every CTA's slot hs: lane r sends CTA r's copy (st.async, each
      // store completing 4 bytes of that CTA's barrier, armed by its stream thread 0)
      if (lane < CL) {
        const uint32_t ra = map_to_rank(sbase + g.off_hpre + (uint32_t)(hs * TT * 8 * 4),
                                        (uint32_t)lane);
        const uint32_t rb = map_to_rank(bar_hpre + 8 * hs, (uint32_t)lane);
        for (int t = 0; t < TT; ++t)
#pragma unroll
          for (int i = 0; i < N; ++i)
            st_async_f32(ra + (uint32_t)((t * 8 + i) * 4), hpre_s[(PH * TT + t) * 8 + i], rb);
      }
      __syncwarp();
    }
  }
  __syncwarp();
  cluster_sync_all();
}

// ------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------
typedef void (*KernelFn)(const Params, const Geometry);

template <typename E, int TT>
KernelFn pick_tt(int n) {
  switch (n) {
    case 1: return entry_fwd_kernel<E, 1, TT>;
    case 2: return entry_fwd_kernel<E, 2, TT>;
    case 3: return entry_fwd_kernel<E, 3, TT>;
    case 4: return entry_fwd_kernel<E, 4, TT>;
    case 5: return entry_fwd_kernel<E, 5, TT>;
    case 6: return entry_fwd_kernel<E, 6, TT>;
    case 7: return entry_fwd_kernel<E, 7, TT>;
    case 8: return entry_fwd_kernel<E, 8, TT>;
    default: return nullptr;
  }
}
template <typename E>
KernelFn pick(int n, int tt) {
  return tt == 16 ? pick_tt<E, 16>(n) : pick_tt<E, 8>(n);
}

struct PlanOut {
  int CL, S, D, clusters, smem, TT;
};
static PlanOut g_last_plan = {0, 0, 0, 0, 0, 0};
static char g_error[512] = "";

static int set_error(const char* what, cudaError_t e) {
  snprintf(g_error, sizeof(g_error), "%s: %s", what, cudaGetErrorString(e));
  return (int)e ? (int)e : -1;
}

// The plan with the most bytes of x in flight: over cluster sizes 1..16, the most stages (<= 12)
// that fit, D = S - 2 (the pre-apply runs D tiles behind the projection; one stage loading).
static bool choose_plan(int n, int C, int smem_max, int force_cl, int force_s, int force_d,
                        int tt, Geometry* out) {
  bool found = false;
  long long best = -1;
  for (int cl = 1; cl <= 16; cl *= 2) {
    if (force_cl > 0 && cl != force_cl) continue;
    for (int s = 12; s >= 2; --s) {
      if (force_s > 0 && s != force_s) continue;
      int d = force_d >= 0 ? force_d : (s >= 3 ? s - 2 : 1);
      if (d > s - 1) d = s - 1;
      if (d > 15) d = 15;
      Geometry g = make_geometry(n, C, cl, s, d, tt);
      if (g.smem > smem_max || g.PR > 16) continue;
      long long score = (long long)s * g.stage_bytes;
      if (s < 3) score /= 4;
      if (score > best) {
        best = score;
        *out = g;
        found = true;
      }
      break;
    }
  }
  return found;
}

}  // namespace mhc_entry

using namespace mhc_entry;

extern "C" {

const char* mhc_entry_last_error() { return g_error; }

void mhc_entry_last_plan(int* out) {
  out[0] = g_last_plan.CL;
  out[1] = g_last_plan.S;
  out[2] = g_last_plan.D;
  out[3] = g_last_plan.clusters;
  out[4] = g_last_plan.smem;
  out[5] = g_last_plan.TT;
}

// dtype: 0 bf16, 1 fp16. force_*: <= 0 (D: < 0) for the default plan; tokens_per_tile 8 or 16.
// Returns 0 on success.
int mhc_entry_forward(const void* x, const void* phi, const float* alpha, const float* bias,
                      float* proj, float* rinv, float* h_pre, float* h_post, float* h_res,
                      void* agg, long long T, int n, int C, float eps, int iters, int variant_mhc,
                      int dtype, int force_cl, int force_s, int force_d, int tokens_per_tile,
                      int max_clusters, int debug, void* stream) {
  g_error[0] = 0;
  const int tt = tokens_per_tile == 16 ? 16 : 8;
  KernelFn fn = dtype == 0 ? pick<__nv_bfloat16>(n, tt) : pick<__half>(n, tt);
  if (!fn) {
    snprintf(g_error, sizeof(g_error), "n=%d not supported (1..8)", n);
    return -1;
  }
  if (C % 8 != 0) {
    snprintf(g_error, sizeof(g_error), "C=%d is not a multiple of 8", C);
    return -1;
  }
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return set_error("cudaGetDevice", e);
  int smem_max = 0;
  e = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return set_error("cudaDeviceGetAttribute", e);
  Geometry g;
  if (!choose_plan(n, C, smem_max, force_cl, force_s, force_d, tt, &g)) {
    snprintf(g_error, sizeof(g_error), "no plan fits %d bytes of shared memory (n=%d, C=%d)",
             smem_max, n, C);
    return -1;
  }
  e = cudaFuncSetAttribute((const void*)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, g.smem);
  if (e != cudaSuccess) return set_error("cudaFuncSetAttribute(smem)", e);
  if (g.CL > 8) {
    e = cudaFuncSetAttribute((const void*)fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return set_error("cudaFuncSetAttribute(non-portable cluster)", e);
  }
  long long num_tiles = (T + tt - 1) / tt;
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = g.CL;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.blockDim = dim3(THREADS, 1, 1);
  cfg.dynamicSmemBytes = g.smem;
  cfg.stream = (cudaStream_t)stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cfg.gridDim = dim3(g.CL, 1, 1);
  int active = 0;
  e = cudaOccupancyMaxActiveClusters(&active, (const void*)fn, &cfg);
  if (e != cudaSuccess) return set_error("cudaOccupancyMaxActiveClusters", e);
  if (active <= 0) {
    snprintf(g_error, sizeof(g_error), "no cluster of %d CTAs with %d bytes fits", g.CL, g.smem);
    return -1;
  }
  long long clusters = active;
  if (max_clusters > 0 && clusters > max_clusters) clusters = max_clusters;
  if (clusters > num_tiles) clusters = num_tiles;
  cfg.gridDim = dim3((unsigned)(clusters * g.CL), 1, 1);
  Params prm;
  prm.x = x;
  prm.phi = phi;
  prm.alpha = alpha;
  prm.bias = bias;
  prm.proj = proj;
  prm.rinv = rinv;
  prm.h_pre = h_pre;
  prm.h_post = h_post;
  prm.h_res = h_res;
  prm.agg = agg;
  prm.T = T;
  prm.eps = eps;
  prm.iters = iters;
  prm.variant_mhc = variant_mhc;
  prm.debug = debug;
  g_last_plan = {g.CL, g.S, g.D, (int)clusters, g.smem, tt};
  if (T == 0) return 0;
  e = cudaLaunchKernelEx(&cfg, fn, prm, g);
  if (e != cudaSuccess) return set_error("cudaLaunchKernelEx", e);
  e = cudaGetLastError();
  if (e != cudaSuccess) return set_error("launch", e);
  return 0;
}

}  // extern "C"
