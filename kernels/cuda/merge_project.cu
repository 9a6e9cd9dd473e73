// The mHC merge fused with the next sublayer's norm + projection partials, one kernel (sm_90).
//
//   out[t, i, c]        = h_post[t, i] * y[t, c] + sum_j h_res[t, i, j] * x[t, j, c]   (16-bit)
//   proj_part[s, t, m]  = sum_{i, c in slice s} out[t, i, c] * phi[i*C + c, m]         (float32)
//   ss_part[s, t]       = sum_{i, c in slice s} out[t, i, c]^2                        (float32)
//
// with out rounded to 16 bits before the projection and the sum of squares (what a separate
// projection of the stored stream reads). Shapes: x, out [T, n, C]; y [T, C]; h_post [T, n];
// h_res [T, n, n]; phi [n*C, M] (M = n*n + 2n), all contiguous; slices of CS channels.
//
// Layout: a persistent grid; each CTA walks a contiguous range of (slice, 16-token tile) work
// items, slice-major, so it keeps one slice of phi in shared memory (transposed, [M][n*CS]) for
// many tiles. Per tile: x, y, h_post, h_res land in shared memory by cp.async (STAGES deep);
// each thread computes the merged values of the positions of its mma.m16n8k16 A fragments (all n
// streams of a channel pair, so the merge runs in place in shared memory), feeds them to the
// tensor cores against phi, and the tile is then stored with 16-byte vector stores. The warps'
// partial products are summed through shared memory. No torch headers: loaded through ctypes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace {

char g_error[512];
constexpr int TOK = 16;  // tokens per tile (the mma's M)

template <typename T> struct Half2;
template <> struct Half2<__nv_bfloat16> {
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(uint16_t v) {
    return __bfloat162float(*reinterpret_cast<__nv_bfloat16*>(&v));
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Half2<__half> {
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
  }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(uint16_t v) {
    return __half2float(*reinterpret_cast<__half*>(&v));
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// 16 bytes global -> shared; src_bytes < 16 zero-fills the rest (0: all zeros, src not read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

template <int N, int CS, int W, int STAGES>
struct Plan {
  static constexpr int M = N * N + 2 * N;
  static constexpr int NT = M / 8;            // mma n-tiles
  static constexpr int XS = N * CS + 8;       // x row stride in shared memory (halves), per token
  static constexpr int YS = CS + 8;           // y row stride (halves)
  static constexpr int PS = N * CS + 8;       // phi^T row stride (halves), per output column
  static constexpr int CBW = CS / 16 / W;     // 16-channel blocks per warp
  static constexpr int THREADS = 32 * W;
  static constexpr int X_BYTES = TOK * XS * 2;
  static constexpr int Y_BYTES = TOK * YS * 2;
  static constexpr int HP_BYTES = TOK * N * 4;
  static constexpr int HR_BYTES = TOK * N * N * 4;
  static constexpr int STAGE_BYTES = X_BYTES + Y_BYTES + HP_BYTES + HR_BYTES;
  static constexpr int PHI_BYTES = M * PS * 2;
  static constexpr int RED_BYTES = W * TOK * M * 4 + W * TOK * 4;
  static constexpr int SMEM = PHI_BYTES + STAGES * STAGE_BYTES + RED_BYTES;
  static_assert(M % 8 == 0, "M must be a multiple of 8");
  static_assert(CBW >= 1 && CBW * W * 16 == CS, "CS must split into W warps of 16-channel blocks");
  static_assert(X_BYTES % 16 == 0 && Y_BYTES % 16 == 0 && PHI_BYTES % 16 == 0, "alignment");
};

template <typename T, int N, int CS, int W, int STAGES, int MINB>
__global__ void __launch_bounds__(32 * W, MINB)
merge_project_kernel(const T* __restrict__ x, const T* __restrict__ y,
                     const float* __restrict__ h_post, const float* __restrict__ h_res,
                     const T* __restrict__ phi, T* __restrict__ out, float* __restrict__ proj_part,
                     float* __restrict__ ss_part, long long T_tokens, int C, int slices,
                     long long tiles) {
  using P = Plan<N, CS, W, STAGES>;
  constexpr int M = P::M;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* phi_s = reinterpret_cast<uint16_t*>(smem);
  unsigned char* stage_base = smem + P::PHI_BYTES;
  float* red = reinterpret_cast<float*>(stage_base + STAGES * P::STAGE_BYTES);
  float* red_ss = red + W * TOK * M;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const long long items = static_cast<long long>(slices) * tiles;
  const long long first = items * blockIdx.x / gridDim.x;
  const long long last = items * (blockIdx.x + 1) / gridDim.x;

  auto stage_x = [&](int st) { return reinterpret_cast<uint16_t*>(stage_base + st * P::STAGE_BYTES); };
  auto stage_y = [&](int st) { return reinterpret_cast<uint16_t*>(stage_base + st * P::STAGE_BYTES + P::X_BYTES); };
  auto stage_hp = [&](int st) {
    return reinterpret_cast<float*>(stage_base + st * P::STAGE_BYTES + P::X_BYTES + P::Y_BYTES);
  };
  auto stage_hr = [&](int st) {
    return reinterpret_cast<float*>(stage_base + st * P::STAGE_BYTES + P::X_BYTES + P::Y_BYTES +
                                    P::HP_BYTES);
  };

  // Issue the loads of work item `item` into stage `st` (no-op past the range; a group is
  // committed either way so the wait counts stay uniform).
  auto load_item = [&](long long item, int st) {
    if (item < last) {
      const int s = static_cast<int>(item / tiles);
      const long long t0 = (item % tiles) * TOK;
      const int c0 = s * CS;
      uint16_t* xs = stage_x(st);
      uint16_t* ys = stage_y(st);
      constexpr int XQ = N * CS / 8;  // 16-byte chunks per token row of x
      for (int v = tid; v < TOK * XQ; v += P::THREADS) {
        const int t = v / XQ, rem = v % XQ, i = rem / (CS / 8), q = rem % (CS / 8);
        const bool ok = (t0 + t < T_tokens) && (c0 + 8 * q < C);
        const T* src = ok ? x + ((t0 + t) * N + i) * static_cast<long long>(C) + c0 + 8 * q : x;
        cp_async16(xs + t * P::XS + i * CS + 8 * q, src, ok ? 16 : 0);
      }
      constexpr int YQ = CS / 8;
      for (int v = tid; v < TOK * YQ; v += P::THREADS) {
        const int t = v / YQ, q = v % YQ;
        const bool ok = (t0 + t < T_tokens) && (c0 + 8 * q < C);
        const T* src = ok ? y + (t0 + t) * static_cast<long long>(C) + c0 + 8 * q : y;
        cp_async16(ys + t * P::YS + 8 * q, src, ok ? 16 : 0);
      }
      // h_post / h_res of the tile's tokens: contiguous float runs, partial chunks at the end.
      const long long hp_valid = (T_tokens - t0) * N;   // floats left in h_post from t0
      for (int q = tid; q < TOK * N / 4; q += P::THREADS) {
        const long long left = hp_valid - 4 * q;
        const int bytes = left >= 4 ? 16 : (left > 0 ? static_cast<int>(left) * 4 : 0);
        cp_async16(stage_hp(st) + 4 * q, bytes ? h_post + t0 * N + 4 * q : h_post, bytes);
      }
      const long long hr_valid = (T_tokens - t0) * N * N;
      for (int q = tid; q < TOK * N * N / 4; q += P::THREADS) {
        const long long left = hr_valid - 4 * q;
        const int bytes = left >= 4 ? 16 : (left > 0 ? static_cast<int>(left) * 4 : 0);
        cp_async16(stage_hr(st) + 4 * q, bytes ? h_res + t0 * N * N + 4 * q : h_res, bytes);
      }
    }
    cp_async_commit();
  };

  for (int k = 0; k < STAGES - 1; ++k) load_item(first + k, k);

  int phi_slice = -1;
  int st = 0;
  for (long long item = first; item < last; ++item) {
    const int s = static_cast<int>(item / tiles);
    const long long t0 = (item % tiles) * TOK;
    const int c0 = s * CS;
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    // The stage of the previous item is free (its stores read it before this barrier): refill it
    // now, so the loads run under this item's compute and stores.
    load_item(item + STAGES - 1, (st + STAGES - 1) % STAGES);
    if (s != phi_slice) {  // this slice's phi, transposed: phi_s[m][i*CS + c]
      for (int v = tid; v < M * N * CS; v += P::THREADS) {
        const int m = v % M, k = v / M, i = k / CS, c = k % CS;
        uint16_t val = 0;
        if (c0 + c < C)
          val = reinterpret_cast<const uint16_t*>(phi)[(static_cast<long long>(i) * C + c0 + c) * M + m];
        phi_s[m * P::PS + k] = val;
      }
      phi_slice = s;
      __syncthreads();
    }
    uint16_t* xs = stage_x(st);
    const uint16_t* ys = stage_y(st);
    const float* hps = stage_hp(st);
    const float* hrs = stage_hr(st);

    float hp[2][N], hr[2][N][N];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int t = g + 8 * rr;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        hp[rr][i] = hps[t * N + i];
#pragma unroll
        for (int j = 0; j < N; ++j) hr[rr][i][j] = hrs[(t * N + i) * N + j];
      }
    }
    float acc[P::NT][4];
#pragma unroll
    for (int nt = 0; nt < P::NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    float ss[2] = {0.f, 0.f};

#pragma unroll
    for (int cb = 0; cb < P::CBW; ++cb) {
      const int cbase = (warp * P::CBW + cb) * 16;
      uint32_t a[N][4];
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int c = cbase + 2 * t4 + 8 * h2;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int t = g + 8 * rr;
          float2 xv[N];
#pragma unroll
          for (int j = 0; j < N; ++j)
            xv[j] = Half2<T>::unpack(*reinterpret_cast<const uint32_t*>(xs + t * P::XS + j * CS + c));
          const float2 yv = Half2<T>::unpack(*reinterpret_cast<const uint32_t*>(ys + t * P::YS + c));
#pragma unroll
          for (int i = 0; i < N; ++i) {
            float o0 = hp[rr][i] * yv.x, o1 = hp[rr][i] * yv.y;
#pragma unroll
            for (int j = 0; j < N; ++j) {
              o0 += hr[rr][i][j] * xv[j].x;
              o1 += hr[rr][i][j] * xv[j].y;
            }
            const uint32_t packed = Half2<T>::pack(o0, o1);
            *reinterpret_cast<uint32_t*>(xs + t * P::XS + i * CS + c) = packed;
            a[i][rr + 2 * h2] = packed;
            const float2 r = Half2<T>::unpack(packed);
            ss[rr] += r.x * r.x + r.y * r.y;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int kb = i * CS + cbase + 2 * t4;
#pragma unroll
        for (int nt = 0; nt < P::NT; ++nt) {
          const uint16_t* row = phi_s + (nt * 8 + g) * P::PS + kb;
          Half2<T>::mma(acc[nt], a[i], *reinterpret_cast<const uint32_t*>(row),
                        *reinterpret_cast<const uint32_t*>(row + 8));
        }
      }
    }
    // The warp's partial products and sums of squares -> shared memory.
    float* red_w = red + warp * TOK * M;
#pragma unroll
    for (int nt = 0; nt < P::NT; ++nt) {
      const int m = nt * 8 + 2 * t4;
      red_w[g * M + m] = acc[nt][0];
      red_w[g * M + m + 1] = acc[nt][1];
      red_w[(g + 8) * M + m] = acc[nt][2];
      red_w[(g + 8) * M + m + 1] = acc[nt][3];
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      ss[rr] += __shfl_xor_sync(0xffffffffu, ss[rr], 1);
      ss[rr] += __shfl_xor_sync(0xffffffffu, ss[rr], 2);
    }
    if (t4 == 0) {
      red_ss[warp * TOK + g] = ss[0];
      red_ss[warp * TOK + g + 8] = ss[1];
    }
    __syncthreads();
    // The merged tile -> global (16-byte stores), the partials summed over the warps.
    constexpr int XQ = N * CS / 8;
    for (int v = tid; v < TOK * XQ; v += P::THREADS) {
      const int t = v / XQ, rem = v % XQ, i = rem / (CS / 8), q = rem % (CS / 8);
      if (t0 + t < T_tokens && c0 + 8 * q < C)
        *reinterpret_cast<uint4*>(out + ((t0 + t) * N + i) * static_cast<long long>(C) + c0 + 8 * q) =
            *reinterpret_cast<const uint4*>(xs + t * P::XS + i * CS + 8 * q);
    }
    for (int v = tid; v < TOK * M; v += P::THREADS) {
      const int t = v / M;
      if (t0 + t < T_tokens) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < W; ++w) sum += red[w * TOK * M + v];
        proj_part[(s * T_tokens + t0) * M + v] = sum;
      }
    }
    if (tid < TOK && t0 + tid < T_tokens) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) sum += red_ss[w * TOK + tid];
      ss_part[s * T_tokens + t0 + tid] = sum;
    }
    st = (st + 1) % STAGES;
  }
  cp_async_wait<0>();
}

using KernelFn = void (*)(const void*, const void*, const float*, const float*, const void*,
                          void*, float*, float*, long long, int, int, long long);

struct Launch {
  const void* fn;
  int smem, threads, cs, per_sm;
};

template <typename T, int N, int CS, int W, int STAGES, int MINB>
Launch launch_of() {
  using P = Plan<N, CS, W, STAGES>;
  return {reinterpret_cast<const void*>(&merge_project_kernel<T, N, CS, W, STAGES, MINB>),
          P::SMEM, P::THREADS, CS, MINB};
}

// variant 0: 256-channel slices, 8 warps, 3 stages, one CTA per SM; 1 (n = 4 only): 128-channel
// slices, 4 warps, 3 stages, two CTAs per SM.
template <typename T>
bool pick(int n, int variant, Launch* out) {
  if (n == 4 && variant == 1) { *out = launch_of<T, 4, 128, 4, 3, 2>(); return true; }
  switch (n) {
    case 2: *out = launch_of<T, 2, 256, 8, 4, 1>(); return true;
    case 4: *out = launch_of<T, 4, 256, 8, 3, 1>(); return true;
    default: return false;
  }
}

// The per-device launch facts, looked up once per (device, kernel) instead of at every launch:
// the SM count and the dynamic shared memory opt-in (cudaFuncSetAttribute applies per device).
constexpr int kMaxDevices = 64, kMaxKernels = 8;
struct Prepared {
  const void* fn[kMaxKernels] = {};
  int sms = 0;
};
Prepared g_prepared[kMaxDevices];
std::mutex g_prepared_lock;

cudaError_t prepare(const Launch& l, int* sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) {  // not cached: look everything up
    cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
    return cudaFuncSetAttribute(l.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, l.smem);
  }
  std::lock_guard<std::mutex> guard(g_prepared_lock);
  Prepared& p = g_prepared[device];
  if (p.sms == 0) {
    err = cudaDeviceGetAttribute(&p.sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) { p.sms = 0; return err; }
  }
  *sms = p.sms;
  int slot = 0;
  for (; slot < kMaxKernels && p.fn[slot] != nullptr; ++slot)
    if (p.fn[slot] == l.fn) return cudaSuccess;
  err = cudaFuncSetAttribute(l.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, l.smem);
  if (err == cudaSuccess && slot < kMaxKernels) p.fn[slot] = l.fn;
  return err;
}

int env_variant() {
  const char* v = getenv("MHC_CUDA_MERGE_PROJECT_VARIANT");
  return v ? atoi(v) : 0;
}

}  // namespace

extern "C" {

const char* mhc_merge_project_last_error() { return g_error; }

// Channels per slice for n streams (0: n not supported): the caller sizes proj_part / ss_part
// as [ceil(C / slice), T, M] / [ceil(C / slice), T].
int mhc_merge_project_slice(int n) {
  Launch l;
  return pick<__nv_bfloat16>(n, env_variant(), &l) ? l.cs : 0;
}

// dtype: 0 bf16, 1 fp16. max_ctas <= 0: one CTA per SM. Returns 0 on success.
int mhc_merge_project(const void* x, const void* y, const float* h_post, const float* h_res,
                      const void* phi, void* out, float* proj_part, float* ss_part, long long T,
                      int n, int C, int dtype, int max_ctas, void* stream) {
  g_error[0] = 0;
  Launch l;
  const int variant = env_variant();
  const bool ok = dtype == 0 ? pick<__nv_bfloat16>(n, variant, &l) : pick<__half>(n, variant, &l);
  if (!ok) {
    snprintf(g_error, sizeof(g_error), "n=%d not supported (2 or 4)", n);
    return -1;
  }
  if (C % 8 != 0 || C <= 0 || T <= 0) {
    snprintf(g_error, sizeof(g_error), "C=%d must be a positive multiple of 8, T=%lld > 0", C, T);
    return -1;
  }
  int sms = 0;
  cudaError_t err = prepare(l, &sms);
  if (err != cudaSuccess) {
    snprintf(g_error, sizeof(g_error), "shared memory %d bytes: %s", l.smem, cudaGetErrorString(err));
    return -1;
  }
  const int slices = (C + l.cs - 1) / l.cs;
  const long long tiles = (T + TOK - 1) / TOK;
  long long grid = static_cast<long long>(sms) * l.per_sm;
  if (max_ctas > 0 && max_ctas < grid) grid = max_ctas;
  if (grid > slices * tiles) grid = slices * tiles;
  void* args[] = {const_cast<void**>(&x), const_cast<void**>(&y), &h_post, &h_res,
                  const_cast<void**>(&phi), &out, &proj_part, &ss_part, &T, &C,
                  const_cast<int*>(&slices), const_cast<long long*>(&tiles)};
  err = cudaLaunchKernel(l.fn, dim3(static_cast<unsigned>(grid)), dim3(l.threads), args, l.smem,
                         static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    snprintf(g_error, sizeof(g_error), "launch: %s", cudaGetErrorString(err));
    return -1;
  }
  return 0;
}

}  // extern "C"
