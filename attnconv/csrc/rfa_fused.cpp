// Fused receptive-field attention (RFAConv, Zhang et al. 2023, arXiv:2304.03198) on CPU.
//
//   z[p, t, c]  = depthwise_k,s(x)[c * k2 + t]            receptive-field features
//   A[p, t, c]  = softmax_t(a[t, c] * avgpool_k,s(x)[p, c])
//   out[p, :]   = (relu(z * scale + shift) * A)[p, :] @ wt^T + bias
//
// Everything is tap-major (feature index t * C + c) and channels-last (position-major), so
// every inner loop runs over contiguous channels and vectorises. Output positions are cut into
// tiles whose k2 * C features stay in L2; per tile the features are built, attended and fed to
// the tile's GEMM (at::mm) without ever being written to memory. Training keeps only x: the
// backward recomputes the features per tile (see rfa_backward for its passes).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// MKL (statically linked into libtorch_cpu on x86) would run each tile's GEMM on all cores
// from inside the parallel region, oversubscribing the cores the tiles already occupy.
// Weak, so a torch built without MKL loads the kernel all the same (mkl_service.h maps
// mkl_set_num_threads_local to this C entry point; the lower-case symbol is Fortran's).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

// One BLAS thread in this thread for the scope (the tiles are the parallelism).
struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// at::parallel_for with the caller's thread-local state (grad mode, dispatch keys excluded
// below autograd, autocast, ...) in every worker: OpenMP's threads start with the defaults, so
// without it an at:: op inside the region sees grad mode on and refuses out= arguments.
template <typename F>
void parallel_for_tls(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    fn(b, e);
  });
}

// This CPU's per-core L2 size from sysfs (1 MiB when unreadable).
int64_t l2_bytes() {
  static const int64_t bytes = [] {
    for (int index = 0; index < 8; ++index) {
      const std::string base = "/sys/devices/system/cpu/cpu0/cache/index" +
                               std::to_string(index) + "/";
      std::ifstream level(base + "level"), size(base + "size");
      int lv = 0;
      std::string text;
      if (!(level >> lv) || lv != 2 || !(size >> text) || text.empty()) continue;
      const char unit = text.back();
      const int64_t scale = unit == 'K' ? 1 << 10 : unit == 'M' ? 1 << 20 : 1;
      try {
        return int64_t(std::stoll(text)) * scale;
      } catch (...) {
        break;
      }
    }
    return int64_t(1) << 20;
  }();
  return bytes;
}

// Output positions per tile: `buffers` tile-sized (positions x features) buffers in half of
// this CPU's L2, and at least 4 tiles per thread when the input is small.
int64_t tile_positions(int64_t features, int64_t element_size, int64_t positions,
                       int64_t buffers) {
  int64_t tile = (l2_bytes() / 2) / std::max<int64_t>(1, buffers * features * element_size);
  const int64_t per_thread = 4 * int64_t(at::get_num_threads());
  tile = std::min(tile, (positions + per_thread - 1) / per_thread);
  return std::max<int64_t>(1, tile);
}

// Backward tiles: each tile's two GEMMs (dwt += go^T attended, dA = go wt) have the tile's
// positions as a dimension, and MKL runs them well below speed on few positions (37: 1.5x the
// time per position of 256), which costs more than the tile's buffers leaving L2.
int64_t backward_tile(int64_t features, int64_t element_size, int64_t positions) {
  const int64_t per_thread = 4 * int64_t(at::get_num_threads());
  return std::max(tile_positions(features, element_size, positions, 3),
                  std::min<int64_t>(256, (positions + per_thread - 1) / per_thread));
}

// A scratch tensor for one call. Large ones are mapped with transparent huge pages requested:
// at::empty's fresh memory faults in 4 KiB at a time, and for the backward's position x
// feature buffers those faults cost as much as a GEMM (58 MB: ~3x the time of 2 MiB pages).
at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t bytes = options.dtype().itemsize();
  for (const int64_t size : sizes) bytes *= size;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t huge = int64_t(2) << 20;
  if (bytes >= 4 * huge) {
    const size_t length = size_t(bytes + huge);
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      const uintptr_t start = (reinterpret_cast<uintptr_t>(base) + huge - 1) & ~uintptr_t(huge - 1);
      madvise(reinterpret_cast<void*>(start), size_t(bytes), MADV_HUGEPAGE);
      return at::from_blob(reinterpret_cast<void*>(start), sizes,
                           [base, length](void*) { munmap(base, length); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

// exp(x) for x <= 0 (softmax after subtracting the max) as a branch-free polynomial that the
// compiler vectorises; relative error below 2e-7 (libm's expf is scalar unless -ffast-math).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x > 0.0f ? 0.0f : x;
  const float t = x * 1.44269504088896341f;
  const float n = std::floor(t);
  const float f = t - n;  // 2^f on [0, 1), degree-6 minimax polynomial
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

struct Geometry {
  int64_t N, H, W, C, Ho, Wo, k, s, pad, k2, K;  // K = k2 * C features per position
  int64_t Hp, Wp;                                 // the zero-padded input's height and width
  int64_t positions() const { return N * Ho * Wo; }
};

Geometry geometry(const at::Tensor& x, int64_t k, int64_t s) {
  Geometry g;
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.k = k; g.s = s; g.pad = k / 2; g.k2 = k * k; g.K = g.k2 * g.C;
  g.Ho = (g.H + 2 * g.pad - k) / s + 1;
  g.Wo = (g.W + 2 * g.pad - k) / s + 1;
  g.Hp = g.H + 2 * g.pad;
  g.Wp = g.W + 2 * g.pad;
  return g;
}

// The input with pad zeros around each image, (N, H + 2 pad, W + 2 pad, C) contiguous: every
// window lies inside it, so the feature loops need no bounds (a zero tap adds 0, as conv2d's
// zero padding and avg_pool2d's count_include_pad do).
at::Tensor padded(const at::Tensor& x, const Geometry& g) {
  return at::constant_pad_nd(x.permute({0, 2, 3, 1}), {0, 0, g.pad, g.pad, g.pad, g.pad})
      .contiguous();
}

// The padded input at the top-left corner of output position p's window.
template <typename T>
inline const T* window_origin(const Geometry& g, const T* xpad, int64_t p) {
  const int64_t n = p / (g.Ho * g.Wo), r = p % (g.Ho * g.Wo);
  const int64_t ho = r / g.Wo, wo = r % g.Wo;
  return xpad + ((n * g.Hp + ho * g.s) * g.Wp + wo * g.s) * g.C;
}

// One 32-byte vector of T (an AVX2 register; the compiler splits it where vectors are shorter).
template <typename T>
struct Vector32 {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using vec_t = typename Vector32<T>::type;
template <typename T>
constexpr int64_t lanes = 32 / sizeof(T);

template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, vec_t<T> v) { std::memcpy(p, &v, sizeof(v)); }

// z[t, c0:c0+B] of one position for every feature t, from its k2 window rows (C each): the
// sums over the window stay in B / 8 vector registers.
template <int64_t B, typename T>
inline void feature_block(const Geometry& g, const T* const* rows, const T* __restrict wdt,
                          int64_t c0, T* __restrict z) {
  const int64_t C = g.C, K = g.K;
  for (int64_t t = 0; t < g.k2; ++t) {
    T acc[B] = {};
    for (int64_t q = 0; q < g.k2; ++q) {
      const T* __restrict xr = rows[q] + c0;
      const T* __restrict wr = wdt + q * K + t * C + c0;
      for (int64_t l = 0; l < B; ++l) acc[l] += wr[l] * xr[l];
    }
    for (int64_t l = 0; l < B; ++l) z[t * C + c0 + l] = acc[l];
  }
}

// z (k2 x C) and, when m != nullptr, the window mean m (C) of one position of any kernel size
// and stride; x0: the padded input at its window's top-left corner.
// wdt: (k2 conv taps [ij], k2 features [t], C).
template <typename T>
inline void features_one(const Geometry& g, const T* __restrict x0, const T* __restrict wdt,
                         T* __restrict z, T* __restrict m) {
  constexpr int64_t V = lanes<T>;
  const int64_t C = g.C, K = g.K;
  const T* rows[64];
  for (int64_t i = 0; i < g.k; ++i)
    for (int64_t j = 0; j < g.k; ++j) rows[i * g.k + j] = x0 + (i * g.Wp + j) * C;
  int64_t c0 = 0;
  for (; c0 + 4 * V <= C; c0 += 4 * V) feature_block<4 * V>(g, rows, wdt, c0, z);
  for (; c0 + V <= C; c0 += V) feature_block<V>(g, rows, wdt, c0, z);
  for (int64_t t = 0; t < g.k2; ++t)  // the channels after the last whole vector
    for (int64_t c = c0; c < C; ++c) {
      T acc = 0;
      for (int64_t q = 0; q < g.k2; ++q) acc += wdt[q * K + t * C + c] * rows[q][c];
      z[t * C + c] = acc;
    }
  if (m) {
    const T inv = T(1) / T(g.k2);
    for (int64_t c = 0; c < C; ++c) m[c] = T(0);
    for (int64_t q = 0; q < g.k2; ++q)
      for (int64_t c = 0; c < C; ++c) m[c] += rows[q][c];
    for (int64_t c = 0; c < C; ++c) m[c] *= inv;
  }
}

// z (R rows of K) and m (R rows of C, when given) of R neighbouring output positions of one
// row, kernel KS and stride S known at compile time. Per vector of channels and feature t the
// R sums stay in registers and each input vector loaded serves every window it lies in: about
// one load per multiply-add fewer than one position at a time.
template <int KS, int S, int R, typename T>
inline void feature_run(const Geometry& g, const T* __restrict x0, const T* __restrict wdt,
                        T* __restrict z, T* __restrict m) {
  using Vec = vec_t<T>;
  constexpr int64_t V = lanes<T>;
  constexpr int COLS = (R - 1) * S + KS;
  const int64_t C = g.C, K = g.K, row = g.Wp * C;
  int64_t c0 = 0;
  for (; c0 + V <= C; c0 += V) {
#pragma GCC unroll 1
    for (int t = 0; t < KS * KS; ++t) {
      Vec acc[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = Vec{};
#pragma GCC unroll 8
      for (int i = 0; i < KS; ++i) {
        const T* xr = x0 + i * row + c0;
        Vec w[KS];
#pragma GCC unroll 8
        for (int j = 0; j < KS; ++j) w[j] = vload(wdt + (i * KS + j) * K + t * C + c0);
#pragma GCC unroll 32
        for (int col = 0; col < COLS; ++col) {
          const Vec xv = vload(xr + col * C);
#pragma GCC unroll 8
          for (int j = 0; j < KS; ++j)
            if (col >= j && (col - j) % S == 0 && (col - j) / S < R) acc[(col - j) / S] += w[j] * xv;
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) vstore(z + r * K + t * C + c0, acc[r]);
    }
    if (m) {
      Vec acc[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = Vec{};
#pragma GCC unroll 8
      for (int i = 0; i < KS; ++i) {
#pragma GCC unroll 32
        for (int col = 0; col < COLS; ++col) {
          const Vec xv = vload(x0 + i * row + col * C + c0);
#pragma GCC unroll 8
          for (int j = 0; j < KS; ++j)
            if (col >= j && (col - j) % S == 0 && (col - j) / S < R) acc[(col - j) / S] += xv;
        }
      }
      const T inv = T(1) / T(KS * KS);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) vstore(m + r * C + c0, acc[r] * inv);
    }
  }
  for (; c0 < C; ++c0)  // the channels after the last whole vector
    for (int r = 0; r < R; ++r) {
      const T* xr = x0 + r * S * C + c0;
      T msum = 0;
      for (int t = 0; t < KS * KS; ++t) {
        T acc = 0;
        for (int i = 0; i < KS; ++i)
          for (int j = 0; j < KS; ++j) acc += wdt[(i * KS + j) * K + t * C + c0] * xr[i * row + j * C];
        z[r * K + t * C + c0] = acc;
      }
      if (m) {
        for (int i = 0; i < KS; ++i)
          for (int j = 0; j < KS; ++j) msum += xr[i * row + j * C];
        m[r * C + c0] = msum / T(KS * KS);
      }
    }
}

template <int KS, int S, typename T>
void feature_runs(const Geometry& g, const T* xpad, const T* wdt, int64_t p0, int64_t len,
                  T* z, T* m) {
  for (int64_t q = 0; q < len;) {
    const int64_t wo = (p0 + q) % g.Wo;
    const int64_t run = std::min(len - q, g.Wo - wo);  // positions left in this output row
    const T* x0 = window_origin(g, xpad, p0 + q);
    T* zq = z + q * g.K;
    T* mq = m ? m + q * g.C : nullptr;
    if (run >= 8) {
      feature_run<KS, S, 8>(g, x0, wdt, zq, mq);
      q += 8;
    } else if (run >= 4) {
      feature_run<KS, S, 4>(g, x0, wdt, zq, mq);
      q += 4;
    } else if (run >= 2) {
      feature_run<KS, S, 2>(g, x0, wdt, zq, mq);
      q += 2;
    } else {
      feature_run<KS, S, 1>(g, x0, wdt, zq, mq);
      q += 1;
    }
  }
}

// z (len rows of K) of output positions p0 .. p0 + len - 1 and, when m != nullptr, their
// window means (len rows of C), from the padded channels-last input.
template <typename T>
void features_tile(const Geometry& g, const T* xpad, const T* wdt, int64_t p0, int64_t len,
                   T* z, T* m) {
  if (g.k == 3 && g.s == 1) return feature_runs<3, 1>(g, xpad, wdt, p0, len, z, m);
  if (g.k == 3 && g.s == 2) return feature_runs<3, 2>(g, xpad, wdt, p0, len, z, m);
  for (int64_t q = 0; q < len; ++q)
    features_one(g, window_origin(g, xpad, p0 + q), wdt, z + q * g.K,
                 m ? m + q * g.C : static_cast<T*>(nullptr));
}

// softmax over t of a[t, c] * m[c], written to prob (k2 x C).
template <typename T>
inline void attention_at(const Geometry& g, const T* __restrict a, const T* __restrict m,
                         T* __restrict prob, T* __restrict tmp) {
  const int64_t C = g.C;
  T* __restrict mx = tmp;
  T* __restrict sum = tmp + C;
  // The logits are stored once and the max taken over the stored values: recomputing
  // a * m - max lets the compiler contract it into an FMA whose unrounded product exceeds the
  // rounded max, a positive exponent that overflows for large inputs.
  for (int64_t t = 0; t < g.k2; ++t)
    for (int64_t c = 0; c < C; ++c) prob[t * C + c] = a[t * C + c] * m[c];
  for (int64_t c = 0; c < C; ++c) mx[c] = prob[c];
  for (int64_t t = 1; t < g.k2; ++t)
    for (int64_t c = 0; c < C; ++c) mx[c] = std::max(mx[c], prob[t * C + c]);
  std::fill(sum, sum + C, T(0));
  for (int64_t t = 0; t < g.k2; ++t) {
    T* __restrict pt = prob + t * C;
    for (int64_t c = 0; c < C; ++c) {
      pt[c] = exp_nonpositive(pt[c] - mx[c]);
      sum[c] += pt[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) sum[c] = T(1) / sum[c];
  for (int64_t t = 0; t < g.k2; ++t)
    for (int64_t c = 0; c < C; ++c) prob[t * C + c] *= sum[c];
}

// Backward of one position from dA = dL/d(attended) (k2 x C, overwritten with du = dL/du,
// u = z * scale + shift the BN output): softmax + product + ReLU. Writes dm (C), the gradient
// of the pooled input, and accumulates da = dL/da and the BN sums of du and du * z.
template <typename T>
inline void attention_backward(const Geometry& g, const T* __restrict z, const T* __restrict pr,
                               const T* __restrict sc, const T* __restrict sh,
                               const T* __restrict a, const T* __restrict m, T* __restrict d,
                               T* __restrict dm, T* __restrict s, T* __restrict da,
                               T* __restrict sdu, T* __restrict sduz) {
  const int64_t C = g.C;
  // softmax: dl_t = p_t (dA_t f_t - sum_u p_u dA_u f_u); product: df = dA p
  for (int64_t c = 0; c < C; ++c) s[c] = T(0);
  for (int64_t t = 0; t < g.k2; ++t) {
    const int64_t o = t * C;
    for (int64_t c = 0; c < C; ++c) {
      const T feat = std::max(z[o + c] * sc[o + c] + sh[o + c], T(0));
      s[c] += pr[o + c] * d[o + c] * feat;
    }
  }
  for (int64_t c = 0; c < C; ++c) dm[c] = T(0);
  for (int64_t t = 0; t < g.k2; ++t) {
    const int64_t o = t * C;
    for (int64_t c = 0; c < C; ++c) {
      const T u = z[o + c] * sc[o + c] + sh[o + c];
      const T feat = std::max(u, T(0));
      const T dl = pr[o + c] * (d[o + c] * feat - s[c]);
      dm[c] += dl * a[o + c];
      da[o + c] += dl * m[c];
      const T du = u > T(0) ? d[o + c] * pr[o + c] : T(0);
      d[o + c] = du;
      sdu[o + c] += du;
      sduz[o + c] += du * z[o + c];
    }
  }
}

int64_t tiles_of(int64_t total, int64_t tile) { return (total + tile - 1) / tile; }

void check_inputs(const at::Tensor& x, const at::Tensor& wdt, const Geometry& g) {
  TORCH_CHECK(x.device().is_cpu(), "rfa_fused: expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "rfa_fused: expected a 4-d input, got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "rfa_fused: expected a channels-last input");
  TORCH_CHECK(g.k % 2 == 1 && g.k2 <= 64, "rfa_fused: expected an odd kernel size up to 7, got ",
              g.k);
  TORCH_CHECK(wdt.is_contiguous() && wdt.numel() == g.k2 * g.K,
              "rfa_fused: expected the depthwise weight as (k2, k2, C), got ", wdt.sizes());
}


// dx[c0:c0+B] of one input position, gathered from the dz rows of the output positions whose
// window holds it (and from dm through the average pool when pooled), in B / 8 registers.
template <int64_t B, typename T>
inline void input_grad_block(const Geometry& g, const T* const* dz_rows, const T* const* w_rows,
                             const T* const* dm_rows, bool pooled, int64_t count, T inv_k2,
                             int64_t c0, T* __restrict out) {
  const int64_t C = g.C;
  T acc[B] = {};
  for (int64_t q = 0; q < count; ++q) {
    if (pooled)
      for (int64_t l = 0; l < B; ++l) acc[l] += dm_rows[q][c0 + l] * inv_k2;
    for (int64_t t = 0; t < g.k2; ++t) {
      const T* __restrict w = w_rows[q] + t * C + c0;
      const T* __restrict d = dz_rows[q] + t * C + c0;
      for (int64_t l = 0; l < B; ++l) acc[l] += w[l] * d[l];
    }
  }
  for (int64_t l = 0; l < B; ++l) out[c0 + l] = acc[l];
}

// dx of R neighbouring inputs of one row at stride 1, all of whose output positions exist:
// input wi + r gets dz[ho, wo, t] through tap (i, j) with ho = hi + pad - i, wo = wi + r + pad
// - j. dz0 / dm0: the first row (i = KS - 1) at wo = wi + pad - (KS - 1). Per vector of
// channels the R sums stay in registers and each dz vector loaded serves every input it
// reaches (as feature_run does for the forward).
template <int KS, int R, typename T>
inline void input_grad_run(const Geometry& g, const T* __restrict dz0, const T* __restrict wdt,
                           const T* __restrict dm0, T inv_k2, T* __restrict dx) {
  using Vec = vec_t<T>;
  constexpr int64_t V = lanes<T>;
  constexpr int COLS = R + KS - 1;
  const int64_t C = g.C, K = g.K;
  for (int64_t c0 = 0; c0 < C; c0 += V) {
    Vec acc[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = Vec{};
    for (int ii = 0; ii < KS; ++ii) {  // output row ho = first row + ii, tap row i = KS-1-ii
      const int i = KS - 1 - ii;
      const T* dzr = dz0 + ii * g.Wo * K + c0;
      if (dm0) {
        const T* dmr = dm0 + ii * g.Wo * C + c0;
#pragma GCC unroll 32
        for (int u = 0; u < COLS; ++u) {
          const Vec dv = vload(dmr + u * C) * inv_k2;
#pragma GCC unroll 8
          for (int j = 0; j < KS; ++j) {
            const int r = u - (KS - 1) + j;
            if (r >= 0 && r < R) acc[r] += dv;
          }
        }
      }
#pragma GCC unroll 1
      for (int64_t t = 0; t < KS * KS; ++t) {
        Vec w[KS];
#pragma GCC unroll 8
        for (int j = 0; j < KS; ++j) w[j] = vload(wdt + (i * KS + j) * K + t * C + c0);
#pragma GCC unroll 32
        for (int u = 0; u < COLS; ++u) {
          const Vec dv = vload(dzr + u * K + t * C);
#pragma GCC unroll 8
          for (int j = 0; j < KS; ++j) {
            const int r = u - (KS - 1) + j;
            if (r >= 0 && r < R) acc[r] += w[j] * dv;
          }
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) vstore(dx + r * C + c0, acc[r]);
  }
}

// acc[tap, t, c] += sum over a tile's positions q of dz[q, t, c] * x[q's window at tap, c]:
// per tap and vector of channels the KK sums over t stay in registers while the positions
// stream by (one load of dz per multiply-add, the input vector shared by every t).
template <int KK, typename T>
void dwconv_weight_grad_k(const Geometry& g, const T* const* origin, const T* dz, int64_t len,
                          T* acc) {
  using Vec = vec_t<T>;
  constexpr int64_t V = lanes<T>;
  const int64_t C = g.C, K = g.K;
  for (int64_t tap = 0; tap < KK; ++tap) {
    const int64_t off = ((tap / g.k) * g.Wp + tap % g.k) * C;
    T* ag = acc + tap * K;
    int64_t c0 = 0;
    for (; c0 + V <= C; c0 += V) {
      Vec sum[KK];
#pragma GCC unroll 16
      for (int t = 0; t < KK; ++t) sum[t] = vload(ag + t * C + c0);
      for (int64_t q = 0; q < len; ++q) {
        const Vec xv = vload(origin[q] + off + c0);
        const T* dq = dz + q * K + c0;
#pragma GCC unroll 16
        for (int t = 0; t < KK; ++t) sum[t] += vload(dq + t * C) * xv;
      }
#pragma GCC unroll 16
      for (int t = 0; t < KK; ++t) vstore(ag + t * C + c0, sum[t]);
    }
    for (; c0 < C; ++c0)
      for (int64_t q = 0; q < len; ++q)
        for (int t = 0; t < KK; ++t) ag[t * C + c0] += dz[q * K + t * C + c0] * origin[q][off + c0];
  }
}

template <typename T>
void dwconv_weight_grad(const Geometry& g, const T* const* origin, const T* dz, int64_t len,
                        T* acc) {
  if (g.k == 3) return dwconv_weight_grad_k<9>(g, origin, dz, len, acc);
  const int64_t C = g.C, K = g.K;
  for (int64_t q = 0; q < len; ++q)
    for (int64_t tap = 0; tap < g.k2; ++tap) {
      const T* xq = origin[q] + ((tap / g.k) * g.Wp + tap % g.k) * C;
      T* ag = acc + tap * K;
      const T* d = dz + q * K;
      for (int64_t t = 0; t < g.k2; ++t)
        for (int64_t c = 0; c < C; ++c) ag[t * C + c] += d[t * C + c] * xq[c];
    }
}

// The part of the backward shared by every fused op, from du = dL/d(BN output) (P x K, in dz,
// overwritten with dz) and its sums over positions (sum du, sum du * z): the BN backward
// (through the batch statistics when batch_stats), the depthwise weight's gradient, and dx
// gathered per input position from dz through the depthwise conv and, when dmp is given,
// from dm (P x C) through the average pool. zall, when given, holds every position's z (the
// first pass kept them, so the features are not computed a third time). Returns dx
// (channels-last), dwdt, dgamma, dbeta.
template <typename scalar_t>
std::vector<at::Tensor> bn_dwconv_backward(const Geometry& g, const at::Tensor& x,
                                           const at::Tensor& xpad, const at::Tensor& wdt, const at::Tensor& scale,
                                           const at::Tensor& mean, const at::Tensor& inv_std,
                                           const at::Tensor& sum_du, const at::Tensor& sum_duz,
                                           at::Tensor& dz, const scalar_t* dmp,
                                           const scalar_t* zall, bool batch_stats,
                                           int64_t tile) {
  const int64_t P = g.positions(), K = g.K, C = g.C;
  const int threads = at::get_num_threads();
  const int64_t ntiles = tiles_of(P, tile);
  auto dwdt_acc = at::zeros({threads, g.k2, K}, x.options());
  auto dx = at::empty({g.N, g.H, g.W, C}, x.options());
  const scalar_t* wp = wdt.data_ptr<scalar_t>();
  const scalar_t* sc = scale.data_ptr<scalar_t>();
  scalar_t* dzp = dz.data_ptr<scalar_t>();
  auto dbeta = sum_du.clone();
  auto dgamma = inv_std.view({K}) * (sum_duz - mean.view({K}) * sum_du);
  // dz = scale * du + alpha + beta_z * z (BN backward through the batch statistics)
  at::Tensor alpha_t = at::zeros({K}, x.options()), beta_t = at::zeros({K}, x.options());
  if (batch_stats) {
    const double count = double(P);
    beta_t = -scale.view({K}) * inv_std.view({K}) * dgamma / count;
    alpha_t = -scale.view({K}) * dbeta / count - beta_t * mean.view({K});
  }
  const scalar_t* al = alpha_t.data_ptr<scalar_t>();
  const scalar_t* bz = beta_t.data_ptr<scalar_t>();
  TORCH_CHECK(!batch_stats || zall, "rfa_fused: the BN backward through batch statistics "
              "needs every position's z");
  const scalar_t* xpp = xpad.data_ptr<scalar_t>();
  parallel_for_tls(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    scalar_t* acc = dwdt_acc[at::get_thread_num()].data_ptr<scalar_t>();
    std::vector<const scalar_t*> origin(tile);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t p0 = b * tile, len = std::min(P, p0 + tile) - p0;
      for (int64_t q = 0; q < len; ++q) {
        const int64_t p = p0 + q;
        scalar_t* d = dzp + p * K;
        if (batch_stats) {
          const scalar_t* zp = zall + p * K;
          for (int64_t f = 0; f < K; ++f) d[f] = d[f] * sc[f] + al[f] + bz[f] * zp[f];
        } else {
          for (int64_t f = 0; f < K; ++f) d[f] *= sc[f];
        }
        origin[q] = window_origin(g, xpp, p);
      }
      dwconv_weight_grad(g, origin.data(), dzp + p0 * K, len, acc);
    }
  });
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const scalar_t inv_k2 = scalar_t(1) / scalar_t(g.k2);
  parallel_for_tls(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    const scalar_t* dz_rows[64];
    const scalar_t* w_rows[64];
    const scalar_t* dm_rows[64];
    constexpr int64_t V = 32 / sizeof(scalar_t);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.H, hi = row % g.H;
      // stride 1, every window of the row's inputs inside the output (ho = hi + pad - i)
      const bool runs = g.s == 1 && g.k == 3 && C % V == 0 && hi >= g.pad && hi + g.pad < g.Ho;
      for (int64_t wi = 0; wi < g.W; ++wi) {
        if (runs && wi >= g.pad && wi + 7 + g.pad < g.Wo) {
          input_grad_run<3, 8>(g, dzp + ((n * g.Ho + hi + g.pad - 2) * g.Wo + wi - g.pad) * K,
                               wp, dmp ? dmp + ((n * g.Ho + hi + g.pad - 2) * g.Wo + wi - g.pad) * C
                                       : static_cast<const scalar_t*>(nullptr),
                               inv_k2, dxp + (row * g.W + wi) * C);
          wi += 7;
          continue;
        }
        // the output positions whose window holds input (hi, wi), and through which tap
        int64_t count = 0;
        for (int64_t i = 0; i < g.k; ++i) {
          const int64_t hs = hi + g.pad - i;
          if (hs < 0 || hs % g.s) continue;
          const int64_t ho = hs / g.s;
          if (ho >= g.Ho) continue;
          for (int64_t j = 0; j < g.k; ++j) {
            const int64_t ws = wi + g.pad - j;
            if (ws < 0 || ws % g.s) continue;
            const int64_t wo = ws / g.s;
            if (wo >= g.Wo) continue;
            const int64_t p = (n * g.Ho + ho) * g.Wo + wo;
            dz_rows[count] = dzp + p * K;
            dm_rows[count] = dmp ? dmp + p * C : nullptr;
            w_rows[count++] = wp + (i * g.k + j) * K;
          }
        }
        scalar_t* out = dxp + (row * g.W + wi) * C;
        int64_t c0 = 0;
        for (; c0 + 4 * V <= C; c0 += 4 * V)
          input_grad_block<4 * V>(g, dz_rows, w_rows, dm_rows, dmp != nullptr, count, inv_k2,
                                  c0, out);
        for (; c0 + V <= C; c0 += V)
          input_grad_block<V>(g, dz_rows, w_rows, dm_rows, dmp != nullptr, count, inv_k2, c0,
                              out);
        for (int64_t c = c0; c < C; ++c) {
          scalar_t acc = 0;
          for (int64_t q = 0; q < count; ++q) {
            if (dmp) acc += dm_rows[q][c] * inv_k2;
            for (int64_t t = 0; t < g.k2; ++t) acc += w_rows[q][t * C + c] * dz_rows[q][t * C + c];
          }
          out[c] = acc;
        }
      }
    }
  });
  return {dx.permute({0, 3, 1, 2}), dwdt_acc.sum(0).view({g.k2, g.k2, C}),
          dgamma.view({g.k2, C}), dbeta.view({g.k2, C})};
}

}  // namespace

// Per-feature batch mean and biased variance (k2, C) of z. Each tile's sums are taken in
// double around the tile's first z (so large inputs neither overflow nor cancel) and the
// tiles are merged with Chan et al.'s pairwise update, as Welford's algorithm would.
std::vector<at::Tensor> rfa_stats_impl(const at::Tensor& x, const at::Tensor& wdt, int64_t k,
                                       int64_t s, int64_t tile) {
  const Geometry g = geometry(x, k, s);
  check_inputs(x, wdt, g);
  const int64_t P = g.positions(), K = g.K;
  const int threads = at::get_num_threads();
  // per thread: count, then mean (K) and M2 (K)
  auto acc = at::zeros({threads, 1 + 2 * K}, x.options().dtype(at::kDouble));
  const at::Tensor xpad = padded(x, g);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rfa_stats", [&] {
    const scalar_t* xp = xpad.data_ptr<scalar_t>();
    const scalar_t* wp = wdt.data_ptr<scalar_t>();
    double* accp = acc.data_ptr<double>();
    parallel_for_tls(0, tiles_of(P, tile), 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> zs(tile * K);
      std::vector<double> shift(K), s1(K), s2(K);
      double* count = accp + at::get_thread_num() * (1 + 2 * K);
      double* mean = count + 1;
      double* m2 = mean + K;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t p0 = b * tile, len = std::min(P, p0 + tile) - p0;
        features_tile(g, xp, wp, p0, len, zs.data(), static_cast<scalar_t*>(nullptr));
        for (int64_t q = 0; q < len; ++q) {
          const scalar_t* z = zs.data() + q * K;
          if (q == 0) {
            for (int64_t f = 0; f < K; ++f) {
              shift[f] = double(z[f]);
              s1[f] = 0.0;
              s2[f] = 0.0;
            }
          }
          for (int64_t f = 0; f < K; ++f) {
            const double d = double(z[f]) - shift[f];
            s1[f] += d;
            s2[f] += d * d;
          }
        }
        const double nb = double(len), na = *count, n = na + nb;
        for (int64_t f = 0; f < K; ++f) {
          const double mb = shift[f] + s1[f] / nb;
          const double m2b = std::max(0.0, s2[f] - s1[f] * s1[f] / nb);
          const double delta = mb - mean[f];
          mean[f] += delta * nb / n;
          m2[f] += m2b + delta * delta * na * nb / n;
        }
        *count = n;
      }
    });
  });
  // merge the threads' partial results the same way
  auto accd = acc.accessor<double, 2>();
  std::vector<double> mean(K, 0.0), m2(K, 0.0);
  double count = 0.0;
  for (int t = 0; t < threads; ++t) {
    const double nb = accd[t][0];
    if (nb == 0.0) continue;
    const double n = count + nb;
    for (int64_t f = 0; f < K; ++f) {
      const double delta = accd[t][1 + f] - mean[f];
      mean[f] += delta * nb / n;
      m2[f] += accd[t][1 + K + f] + delta * delta * count * nb / n;
    }
    count = n;
  }
  auto mean_t = at::empty({K}, x.options().dtype(at::kDouble));
  auto var_t = at::empty({K}, x.options().dtype(at::kDouble));
  double* mp = mean_t.data_ptr<double>();
  double* vp = var_t.data_ptr<double>();
  for (int64_t f = 0; f < K; ++f) {
    mp[f] = mean[f];
    vp[f] = count > 0.0 ? m2[f] / count : 0.0;
  }
  return {mean_t.to(x.scalar_type()).view({g.k2, g.C}),
          var_t.to(x.scalar_type()).view({g.k2, g.C})};
}

// out (N, Ho, Wo, O) contiguous = channels-last (N, O, Ho, Wo).
at::Tensor rfa_forward_impl(const at::Tensor& x, const at::Tensor& wdt, const at::Tensor& scale,
                       const at::Tensor& shift, const at::Tensor& a, const at::Tensor& wt,
                       const std::optional<at::Tensor>& bias, int64_t k, int64_t s,
                       int64_t tile) {
  const Geometry g = geometry(x, k, s);
  check_inputs(x, wdt, g);
  const int64_t P = g.positions(), K = g.K, O = wt.size(0);
  auto out = at::empty({g.N, g.Ho, g.Wo, O}, x.options());
  if (P == 0) return out.permute({0, 3, 1, 2});
  const auto wtT = wt.t();
  const at::Tensor xpad = padded(x, g);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rfa_forward", [&] {
    const scalar_t* xp = xpad.data_ptr<scalar_t>();
    const scalar_t* wp = wdt.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* sh = shift.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    parallel_for_tls(0, tiles_of(P, tile), 1, [&](int64_t begin, int64_t end) {
      SequentialBlas sequential;
      auto feats = at::empty({tile, K}, x.options());
      std::vector<scalar_t> prob(K), m(tile * g.C), tmp(2 * g.C);
      scalar_t* fp = feats.data_ptr<scalar_t>();
      for (int64_t b = begin; b < end; ++b) {
        const int64_t p0 = b * tile, len = std::min(P, p0 + tile) - p0;
        features_tile(g, xp, wp, p0, len, fp, m.data());
        for (int64_t q = 0; q < len; ++q) {
          scalar_t* z = fp + q * K;
          attention_at(g, ap, m.data() + q * g.C, prob.data(), tmp.data());
          for (int64_t f = 0; f < K; ++f)
            z[f] = std::max(z[f] * sc[f] + sh[f], scalar_t(0)) * prob[f];
        }
        auto out_tile = out.view({P, O}).narrow(0, p0, len);
        auto f_tile = feats.narrow(0, 0, len);
        if (bias.has_value())
          at::addmm_out(out_tile, *bias, f_tile, wtT);
        else
          at::mm_out(out_tile, f_tile, wtT);
      }
    });
  });
  return out.permute({0, 3, 1, 2});
}

// Gradients of rfa_forward. BatchNorm: scale = gamma * inv_std, shift = beta - mean * scale;
// with batch_stats the mean/inv_std are z's batch statistics and their derivative is included.
//
// Pass 1 (tiles of output positions): recompute z, A and the attended features; dwt and the
//   feature gradient through the tile's GEMMs; softmax/ReLU backward to du = dL/d(BN output)
//   (written to a k2-sized buffer), the pooled input's gradient dm, and the BN sums.
// Pass 2 (tiles): du -> dz (BN backward, needs z again when batch_stats) and dwdt.
// Pass 3 (input rows): dx gathered from dz through the depthwise conv and from dm through
//   the average pool, so no two threads write the same dx.
std::vector<at::Tensor> rfa_backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& wdt, const at::Tensor& gamma,
                                     const at::Tensor& beta, const at::Tensor& mean,
                                     const at::Tensor& inv_std, const at::Tensor& a,
                                     const at::Tensor& wt, bool has_bias, int64_t k, int64_t s,
                                     bool batch_stats, int64_t tile) {
  const Geometry g = geometry(x, k, s);
  check_inputs(x, wdt, g);
  const int64_t P = g.positions(), K = g.K, C = g.C, O = wt.size(0);
  const int threads = at::get_num_threads();
  // (N, O, Ho, Wo) in any layout -> (P, O) rows
  const auto go = grad_out.permute({0, 2, 3, 1}).contiguous().view({P, O});
  const auto scale = (gamma * inv_std).contiguous();
  const auto shift = (beta - mean * scale).contiguous();
  auto dwt_acc = at::zeros({threads, O, K}, x.options());
  auto small = at::zeros({threads, 4, K}, x.options());  // da, sum du, sum du*z, -
  auto dz = scratch({P, K}, x.options());
  auto dm = scratch({P, C}, x.options());
  // with batch statistics the BN backward needs z again: keep it rather than recompute it
  auto zall = batch_stats ? scratch({P, K}, x.options()) : at::Tensor();
  at::Tensor dx, dwdt, dgamma, dbeta;
  const at::Tensor xpad = padded(x, g);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rfa_backward", [&] {
    const scalar_t* xp = xpad.data_ptr<scalar_t>();
    const scalar_t* wp = wdt.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* sh = shift.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    scalar_t* dmp = dm.data_ptr<scalar_t>();
    const int64_t ntiles = tiles_of(P, tile);
    parallel_for_tls(0, ntiles, 1, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      SequentialBlas sequential;
      auto bufs = at::empty({3, tile, K}, x.options());
      auto attended = bufs[0], zs = bufs[1], probs = bufs[2];
      auto dwt_t = dwt_acc[tid];
      scalar_t* da = small[tid][0].data_ptr<scalar_t>();
      scalar_t* sdu = small[tid][1].data_ptr<scalar_t>();
      scalar_t* sduz = small[tid][2].data_ptr<scalar_t>();
      std::vector<scalar_t> m(C), tmp(2 * C), s(C);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t p0 = b * tile, len = std::min(P, p0 + tile) - p0;
        scalar_t* fa = attended.data_ptr<scalar_t>();
        scalar_t* fz = zs.data_ptr<scalar_t>();
        scalar_t* fp = probs.data_ptr<scalar_t>();
        scalar_t* kept = zall.defined() ? zall.data_ptr<scalar_t>() + p0 * K : fz;
        features_tile(g, xp, wp, p0, len, kept, dmp + p0 * C);  // the dm rows hold m for now
        for (int64_t q = 0; q < len; ++q) {
          scalar_t* z = kept + q * K;
          scalar_t* pr = fp + q * K;
          attention_at(g, ap, dmp + (p0 + q) * C, pr, tmp.data());
          for (int64_t f = 0; f < K; ++f)
            fa[q * K + f] = std::max(z[f] * sc[f] + sh[f], scalar_t(0)) * pr[f];
        }
        auto go_tile = go.narrow(0, p0, len);
        auto a_tile = attended.narrow(0, 0, len);
        dwt_t.addmm_(go_tile.t(), a_tile);
        // dL/d(attended) of the tile, straight into the du rows
        auto dA = dz.narrow(0, p0, len);
        at::mm_out(dA, go_tile, wt);
        for (int64_t q = 0; q < len; ++q) {
          const int64_t p = p0 + q;
          std::copy(dmp + p * C, dmp + (p + 1) * C, m.begin());
          attention_backward(g, kept + q * K, fp + q * K, sc, sh, ap, m.data(), dzp + p * K,
                             dmp + p * C, s.data(), da, sdu, sduz);
        }
      }
    });
    auto sums = small.sum(0);
    auto rest = bn_dwconv_backward<scalar_t>(
        g, x, xpad, wdt, scale, mean, inv_std, sums[1], sums[2], dz, dmp,
        zall.defined() ? zall.data_ptr<scalar_t>() : static_cast<const scalar_t*>(nullptr),
        batch_stats, tile);
    dx = rest[0];
    dwdt = rest[1];
    dgamma = rest[2];
    dbeta = rest[3];
  });
  auto small_sum = small.sum(0);
  auto dbias = has_bias ? go.sum(0) : at::Tensor();
  return {dx, dwdt, dgamma, dbeta,
          small_sum[0].view({g.k2, C}),
          dwt_acc.sum(0),
          dbias};
}

// --- RFCBAMConv / RFCAConv: attention as a product of two small factors ----------------------
//
// Their attention A[p, t, c] multiplies two small tensors (kind 0, RFCBAM: a channel gate
// f1 = ca (N, C) and a spatial gate per tap f2 = sa (P, k2); kind 1, RFCA: row and column
// gates f1 = a_h (N, Ho, k, C) and f2 = a_w (N, Wo, k, C), tap t = i * k + j), and the
// factors are computed from reductions of g = relu(z * scale + shift) over the k2-sized
// features (kind 0: max and mean over channels per (p, t); kind 1: the mean over (wo, j) of
// each (n, ho, i, c) and over (ho, i) of each (n, wo, j, c)). tile_reduce takes those
// reductions in one pass that never stores g; the factors are computed by ordinary ops in
// Python; tile_attend fuses g * A with the tile's GEMM, as rfa_forward does with its softmax.

namespace {

template <typename T>
inline void factors_at(const Geometry& g, int64_t kind, const T* f1, const T* f2, int64_t p,
                       T* __restrict A) {
  const int64_t C = g.C, k = g.k;
  const int64_t n = p / (g.Ho * g.Wo), r = p % (g.Ho * g.Wo), ho = r / g.Wo, wo = r % g.Wo;
  if (kind == 0) {
    const T* __restrict ca = f1 + n * C;
    const T* sa = f2 + p * g.k2;
    for (int64_t t = 0; t < g.k2; ++t)
      for (int64_t c = 0; c < C; ++c) A[t * C + c] = ca[c] * sa[t];
    return;
  }
  for (int64_t i = 0; i < k; ++i) {
    const T* __restrict ah = f1 + ((n * g.Ho + ho) * k + i) * C;
    for (int64_t j = 0; j < k; ++j) {
      const T* __restrict aw = f2 + ((n * g.Wo + wo) * k + j) * C;
      T* __restrict at = A + (i * k + j) * C;
      for (int64_t c = 0; c < C; ++c) at[c] = ah[c] * aw[c];
    }
  }
}

// The attend backward's per-position elementwise part: dL/dA = d * relu(u) into gd and
// du = d * A where u > 0 in place in d, then (when sdu is given) the BN sums. The pointers are
// restrict so that gcc vectorises it (written inline, possible aliasing kept it scalar).
template <typename T>
inline void attend_du(int64_t K, const T* __restrict z, const T* __restrict sc,
                      const T* __restrict sh, const T* __restrict A, T* __restrict d,
                      T* __restrict gd, T* __restrict sdu, T* __restrict sduz) {
  for (int64_t f = 0; f < K; ++f) {
    const T u = z[f] * sc[f] + sh[f];
    const T dv = d[f];
    gd[f] = dv * std::max(u, T(0));
    d[f] = u > T(0) ? dv * A[f] : T(0);
  }
  if (sdu)
    for (int64_t f = 0; f < K; ++f) {
      sdu[f] += d[f];
      sduz[f] += d[f] * z[f];
    }
}

// RFCBAM's factor gradients at one position from dL/dA (gd, k2 x C): dsa[t] = sum_c gd ca,
// dca[c] += sum_t gd sa[t]. The sum over c in vector lanes (a float reduction gcc leaves
// scalar without -ffast-math).
template <typename T>
inline void cbam_factor_grads(int64_t k2, int64_t C, const T* __restrict gd,
                              const T* __restrict ca, const T* __restrict sa,
                              T* __restrict dca, T* __restrict dsa) {
  using Vec = vec_t<T>;
  constexpr int64_t V = lanes<T>;
  for (int64_t t = 0; t < k2; ++t) {
    const T* __restrict gt = gd + t * C;
    const T s = sa[t];
    Vec acc = {};
    int64_t c = 0;
    for (; c + V <= C; c += V) {
      const Vec gv = vload(gt + c);
      acc += gv * vload(ca + c);
      vstore(dca + c, vload(dca + c) + gv * s);
    }
    T sum = 0;
    for (int64_t l = 0; l < V; ++l) sum += acc[l];
    for (; c < C; ++c) {
      sum += gt[c] * ca[c];
      dca[c] += gt[c] * s;
    }
    dsa[t] = sum;
  }
}

// RFCA's factor gradients of one tap row: dah += gt aw, daw += gt ah (restrict: vectorised).
template <typename T>
inline void ca_factor_grads(int64_t C, const T* __restrict gt, const T* __restrict ah,
                            const T* __restrict aw, T* __restrict dah, T* __restrict daw) {
  for (int64_t c = 0; c < C; ++c) {
    dah[c] += gt[c] * aw[c];
    daw[c] += gt[c] * ah[c];
  }
}

// g = relu(z * scale + shift) in place (restrict: vectorised).
template <typename T>
inline void bn_relu_inplace(int64_t K, T* __restrict z, const T* __restrict sc,
                            const T* __restrict sh) {
  for (int64_t f = 0; f < K; ++f) z[f] = std::max(z[f] * sc[f] + sh[f], T(0));
}

// out = relu(z * scale + shift) * A (out may be z itself: no restrict between those two).
template <typename T>
inline void attended_row(int64_t K, const T* z, const T* __restrict sc, const T* __restrict sh,
                         const T* __restrict A, T* out) {
  if (out == z) {
    T* __restrict io = out;
    for (int64_t f = 0; f < K; ++f) io[f] = std::max(io[f] * sc[f] + sh[f], T(0)) * A[f];
    return;
  }
  const T* __restrict in = z;
  T* __restrict o = out;
  for (int64_t f = 0; f < K; ++f) o[f] = std::max(in[f] * sc[f] + sh[f], T(0)) * A[f];
}

// RFCBAM's reductions at one position: the max and mean over channels of g (k2 x C), in
// vector lanes (float max and sum reductions stay scalar in gcc without -ffast-math).
template <typename T>
inline void cbam_reduce(int64_t k2, int64_t C, const T* __restrict g, T* __restrict mx,
                        T* __restrict mean) {
  using Vec = vec_t<T>;
  constexpr int64_t V = lanes<T>;
  for (int64_t t = 0; t < k2; ++t) {
    const T* __restrict gt = g + t * C;
    T best = gt[0], sum = 0;
    int64_t c = 0;
    if (C >= V) {
      Vec bv = vload(gt), sv = {};
      for (; c + V <= C; c += V) {
        const Vec v = vload(gt + c);
        bv = v > bv ? v : bv;
        sv += v;
      }
      for (int64_t l = 0; l < V; ++l) {
        best = std::max(best, bv[l]);
        sum += sv[l];
      }
    }
    for (; c < C; ++c) {
      best = std::max(best, gt[c]);
      sum += gt[c];
    }
    mx[t] = best;
    mean[t] = sum / T(C);
  }
}

// RFCBAM's reduce backward at one position: du of the channel mean (dmean[t] / C where u > 0)
// and of the channel max (dmax[t] to the first maximal channel, as torch.max's indices; where
// the maximum is 0 every g is 0 and ReLU passes nothing, whichever channel it is). The max and
// its first channel are tracked per vector lane, then across lanes.
template <typename T>
inline void cbam_reduce_du(int64_t k2, int64_t C, const T* __restrict z, const T* __restrict sc,
                           const T* __restrict sh, const T* __restrict dmax,
                           const T* __restrict dmean, T* __restrict d) {
  using Vec = vec_t<T>;
  using Index = decltype(Vec{} > Vec{});
  constexpr int64_t V = lanes<T>;
  const Vec zero = {};
  Index first, step;
  for (int64_t l = 0; l < V; ++l) {
    first[l] = l;
    step[l] = V;
  }
  for (int64_t t = 0; t < k2; ++t) {
    const int64_t o = t * C;
    const T dm = dmean[t] / T(C);
    const Vec dmv = zero + dm;
    Vec best = zero - std::numeric_limits<T>::infinity();
    Index at = {}, lane = first;
    int64_t c = 0;
    for (; c + V <= C; c += V, lane += step) {
      const Vec u = vload(z + o + c) * vload(sc + o + c) + vload(sh + o + c);
      const Index positive = u > zero;
      vstore(d + o + c, positive ? dmv : zero);
      const Vec gv = positive ? u : zero;
      const Index better = gv > best;
      best = better ? gv : best;
      at = better ? lane : at;
    }
    T top = -std::numeric_limits<T>::infinity();
    int64_t arg = 0;
    for (int64_t l = 0; l < V && c >= V; ++l)
      if (best[l] > top || (best[l] == top && at[l] < arg)) {
        top = best[l];
        arg = at[l];
      }
    for (; c < C; ++c) {  // the channels after the last whole vector
      const T u = z[o + c] * sc[o + c] + sh[o + c];
      d[o + c] = u > T(0) ? dm : T(0);
      const T gv = std::max(u, T(0));
      if (gv > top) {
        top = gv;
        arg = c;
      }
    }
    if (z[o + arg] * sc[o + arg] + sh[o + arg] > T(0)) d[o + arg] += dmax[t];
  }
}

// RFCA's reduce backward for one tap row: du = dr / (W'k) + dc / (H'k) where u > 0.
template <typename T>
inline void ca_reduce_du(int64_t C, const T* __restrict z, const T* __restrict sc,
                         const T* __restrict sh, const T* __restrict dr, const T* __restrict dc,
                         T row_w, T col_w, T* __restrict d) {
  for (int64_t c = 0; c < C; ++c) {
    const T u = z[c] * sc[c] + sh[c];
    d[c] = u > T(0) ? dr[c] * row_w + dc[c] * col_w : T(0);
  }
}

// du += other (the attend op's share, when given), then the BN sums (sum du, sum du z).
template <typename T>
inline void add_and_sum(int64_t K, const T* __restrict other, const T* __restrict z,
                        T* __restrict d, T* __restrict sdu, T* __restrict sduz) {
  if (other)
    for (int64_t f = 0; f < K; ++f) d[f] += other[f];
  for (int64_t f = 0; f < K; ++f) {
    sdu[f] += d[f];
    sduz[f] += d[f] * z[f];
  }
}

void check_kind(int64_t kind) {
  TORCH_CHECK(kind == 0 || kind == 1, "rfa tile attention: expected kind 0 (RFCBAM) or 1 "
              "(RFCA), got ", kind);
}

}  // namespace

// The reductions of g the factors need: kind 0 max and mean over channels, each (P, k2);
// kind 1 the row means (N, Ho, k, C) and the column means (N, Wo, k, C).
std::vector<at::Tensor> tile_reduce_impl(const at::Tensor& x, const at::Tensor& wdt,
                                    const at::Tensor& scale, const at::Tensor& shift,
                                    int64_t k, int64_t s, int64_t kind, int64_t tile) {
  const Geometry g = geometry(x, k, s);
  check_inputs(x, wdt, g);
  check_kind(kind);
  const int64_t P = g.positions(), K = g.K, C = g.C;
  const int threads = at::get_num_threads();
  at::Tensor r1, r2, acc1, acc2;
  if (kind == 0) {
    r1 = at::empty({P, g.k2}, x.options());
    r2 = at::empty({P, g.k2}, x.options());
  } else {
    acc1 = at::zeros({threads, g.N * g.Ho * k * C}, x.options());
    acc2 = at::zeros({threads, g.N * g.Wo * k * C}, x.options());
  }
  const at::Tensor xpad = padded(x, g);
  if (P > 0) AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tile_reduce", [&] {
    const scalar_t* xp = xpad.data_ptr<scalar_t>();
    const scalar_t* wp = wdt.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* sh = shift.data_ptr<scalar_t>();
    parallel_for_tls(0, tiles_of(P, tile), 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> zs(tile * K);
      scalar_t* rows = kind == 1 ? acc1[at::get_thread_num()].data_ptr<scalar_t>() : nullptr;
      scalar_t* cols = kind == 1 ? acc2[at::get_thread_num()].data_ptr<scalar_t>() : nullptr;
      for (int64_t p = begin * tile; p < std::min(P, end * tile); ++p) {
        if (p % tile == 0)  // tiles start at multiples of tile
          features_tile(g, xp, wp, p, std::min(P, p + tile) - p, zs.data(),
                        static_cast<scalar_t*>(nullptr));
        scalar_t* z = zs.data() + (p % tile) * K;
        bn_relu_inplace(K, z, sc, sh);
        if (kind == 0) {
          cbam_reduce(g.k2, C, z, r1.data_ptr<scalar_t>() + p * g.k2,
                      r2.data_ptr<scalar_t>() + p * g.k2);
          continue;
        }
        const int64_t n = p / (g.Ho * g.Wo), r = p % (g.Ho * g.Wo), ho = r / g.Wo, wo = r % g.Wo;
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = 0; j < k; ++j) {
            const scalar_t* __restrict gt = z + (i * k + j) * C;
            scalar_t* __restrict rr = rows + ((n * g.Ho + ho) * k + i) * C;
            scalar_t* __restrict cc = cols + ((n * g.Wo + wo) * k + j) * C;
            for (int64_t c = 0; c < C; ++c) {
              rr[c] += gt[c];
              cc[c] += gt[c];
            }
          }
      }
    });
  });
  if (kind == 1) {
    r1 = (acc1.sum(0) / double(g.Wo * k)).view({g.N, g.Ho, k, C});
    r2 = (acc2.sum(0) / double(g.Ho * k)).view({g.N, g.Wo, k, C});
  }
  return {r1, r2};
}

// Gradients of tile_reduce from dr1, dr2: dx, dwdt, dgamma, dbeta (BN as in rfa_backward).
// du_attend, when defined, is tile_attend's share of dL/du (P x K, from its deferred
// backward): added to this op's own share, so one BN + depthwise backward serves both ops.
std::vector<at::Tensor> tile_reduce_backward_impl(const at::Tensor& dr1, const at::Tensor& dr2,
                                             const at::Tensor& du_attend,
                                             const at::Tensor& x, const at::Tensor& wdt,
                                             const at::Tensor& gamma, const at::Tensor& beta,
                                             const at::Tensor& mean, const at::Tensor& inv_std,
                                             int64_t k, int64_t s, int64_t kind,
                                             bool batch_stats, int64_t tile) {
  const Geometry g = geometry(x, k, s);
  check_inputs(x, wdt, g);
  check_kind(kind);
  const int64_t P = g.positions(), K = g.K, C = g.C;
  const int threads = at::get_num_threads();
  const auto scale = (gamma * inv_std).contiguous();
  const auto shift = (beta - mean * scale).contiguous();
  const auto d1 = dr1.contiguous(), d2 = dr2.contiguous();
  const auto du_other = du_attend.defined() ? du_attend.contiguous() : at::Tensor();
  auto sums = at::zeros({threads, 2, K}, x.options());  // sum du, sum du * z
  auto dz = scratch({P, K}, x.options());
  auto zall = batch_stats ? scratch({P, K}, x.options()) : at::Tensor();
  std::vector<at::Tensor> rest;
  const at::Tensor xpad = padded(x, g);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tile_reduce_backward", [&] {
    const scalar_t* xp = xpad.data_ptr<scalar_t>();
    const scalar_t* wp = wdt.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* sh = shift.data_ptr<scalar_t>();
    const scalar_t* g1 = d1.data_ptr<scalar_t>();
    const scalar_t* g2 = d2.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    const scalar_t* other = du_other.defined() ? du_other.data_ptr<scalar_t>() : nullptr;
    const scalar_t row_w = scalar_t(1) / scalar_t(g.Wo * k), col_w = scalar_t(1) / scalar_t(g.Ho * k);
    parallel_for_tls(0, tiles_of(P, tile), 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> zs(tile * K);
      scalar_t* sdu = sums[at::get_thread_num()][0].data_ptr<scalar_t>();
      scalar_t* sduz = sdu + K;
      for (int64_t p = begin * tile; p < std::min(P, end * tile); ++p) {
        scalar_t* ztile = zall.defined() ? zall.data_ptr<scalar_t>() + (p - p % tile) * K
                                         : zs.data();
        if (p % tile == 0)  // tiles start at multiples of tile
          features_tile(g, xp, wp, p, std::min(P, p + tile) - p, ztile,
                        static_cast<scalar_t*>(nullptr));
        scalar_t* zp = ztile + (p % tile) * K;
        scalar_t* d = dzp + p * K;
        if (kind == 0) {
          cbam_reduce_du(g.k2, C, zp, sc, sh, g1 + p * g.k2, g2 + p * g.k2, d);
        } else {
          const int64_t n = p / (g.Ho * g.Wo), r = p % (g.Ho * g.Wo), ho = r / g.Wo, wo = r % g.Wo;
          for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < k; ++j) {
              const int64_t o = (i * k + j) * C;
              ca_reduce_du(C, zp + o, sc + o, sh + o, g1 + ((n * g.Ho + ho) * k + i) * C,
                           g2 + ((n * g.Wo + wo) * k + j) * C, row_w, col_w, d + o);
            }
        }
        add_and_sum(K, other ? other + p * K : nullptr, zp, d, sdu, sduz);
      }
    });
    auto total = sums.sum(0);
    rest = bn_dwconv_backward<scalar_t>(
        g, x, xpad, wdt, scale, mean, inv_std, total[0], total[1], dz,
        static_cast<const scalar_t*>(nullptr),
        zall.defined() ? zall.data_ptr<scalar_t>() : static_cast<const scalar_t*>(nullptr),
        batch_stats, tile);
  });
  return rest;
}

// out (N, Ho, Wo, O) = (g * A) @ wt^T + bias, A = factors (f1, f2) of the kind.
at::Tensor tile_attend_impl(const at::Tensor& x, const at::Tensor& wdt, const at::Tensor& scale,
                       const at::Tensor& shift, const at::Tensor& f1, const at::Tensor& f2,
                       const at::Tensor& wt, const std::optional<at::Tensor>& bias, int64_t k,
                       int64_t s, int64_t kind, int64_t tile) {
  const Geometry g = geometry(x, k, s);
  check_inputs(x, wdt, g);
  check_kind(kind);
  const int64_t P = g.positions(), K = g.K, O = wt.size(0);
  auto out = at::empty({g.N, g.Ho, g.Wo, O}, x.options());
  if (P == 0) return out.permute({0, 3, 1, 2});
  const auto wtT = wt.t();
  const auto a1 = f1.contiguous(), a2 = f2.contiguous();
  const at::Tensor xpad = padded(x, g);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tile_attend", [&] {
    const scalar_t* xp = xpad.data_ptr<scalar_t>();
    const scalar_t* wp = wdt.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* sh = shift.data_ptr<scalar_t>();
    const scalar_t* p1 = a1.data_ptr<scalar_t>();
    const scalar_t* p2 = a2.data_ptr<scalar_t>();
    parallel_for_tls(0, tiles_of(P, tile), 1, [&](int64_t begin, int64_t end) {
      SequentialBlas sequential;
      auto feats = at::empty({tile, K}, x.options());
      std::vector<scalar_t> A(K);
      scalar_t* fp = feats.data_ptr<scalar_t>();
      for (int64_t b = begin; b < end; ++b) {
        const int64_t p0 = b * tile, len = std::min(P, p0 + tile) - p0;
        features_tile(g, xp, wp, p0, len, fp, static_cast<scalar_t*>(nullptr));
        for (int64_t q = 0; q < len; ++q) {
          scalar_t* z = fp + q * K;
          factors_at(g, kind, p1, p2, p0 + q, A.data());
          attended_row(K, z, sc, sh, A.data(), z);
        }
        auto out_tile = out.view({P, O}).narrow(0, p0, len);
        auto f_tile = feats.narrow(0, 0, len);
        if (bias.has_value())
          at::addmm_out(out_tile, *bias, f_tile, wtT);
        else
          at::mm_out(out_tile, f_tile, wtT);
      }
    });
  });
  return out.permute({0, 3, 1, 2});
}

// Gradients of tile_attend: dx, dwdt, dgamma, dbeta, df1, df2, dwt, dbias (undefined without
// bias), du. Pass 1 per tile: recompute g * A, dwt += go^T (g A), dA = go wt, then the factors'
// gradients (sums of dA * g times the other factor) and du = dA * A where u > 0; the rest is
// bn_dwconv_backward. With defer_tail that rest is left to tile_reduce's backward (it is linear
// in du, and that op runs the same passes for its own share): dx .. dbeta are undefined and du
// (N, Ho, Wo, K) is returned instead.
std::vector<at::Tensor> tile_attend_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wdt,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
    const at::Tensor& inv_std, const at::Tensor& f1, const at::Tensor& f2, const at::Tensor& wt,
    bool has_bias, int64_t k, int64_t s, int64_t kind, bool batch_stats, bool defer_tail,
    int64_t tile) {
  const Geometry g = geometry(x, k, s);
  check_inputs(x, wdt, g);
  check_kind(kind);
  const int64_t P = g.positions(), K = g.K, C = g.C, O = wt.size(0);
  const int threads = at::get_num_threads();
  const auto go = grad_out.permute({0, 2, 3, 1}).contiguous().view({P, O});
  const auto scale = (gamma * inv_std).contiguous();
  const auto shift = (beta - mean * scale).contiguous();
  const auto a1 = f1.contiguous(), a2 = f2.contiguous();
  auto dwt_acc = at::zeros({threads, O, K}, x.options());
  auto sums = at::zeros({threads, 2, K}, x.options());
  // kind 0: df1 (N, C) summed over positions per thread, df2 (P, k2) written per position;
  // kind 1: both summed per thread
  auto df1_acc = at::zeros({threads, a1.numel()}, x.options());
  auto df2_acc = at::zeros({kind == 0 ? 1 : threads, a2.numel()}, x.options());
  auto dz = scratch({P, K}, x.options());
  auto zall = batch_stats && !defer_tail ? scratch({P, K}, x.options()) : at::Tensor();
  std::vector<at::Tensor> rest(4);
  const at::Tensor xpad = padded(x, g);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tile_attend_backward", [&] {
    const scalar_t* xp = xpad.data_ptr<scalar_t>();
    const scalar_t* wp = wdt.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* sh = shift.data_ptr<scalar_t>();
    const scalar_t* p1 = a1.data_ptr<scalar_t>();
    const scalar_t* p2 = a2.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    parallel_for_tls(0, tiles_of(P, tile), 1, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      SequentialBlas sequential;
      auto bufs = at::empty({2, tile, K}, x.options());
      auto attended = bufs[0], zs = bufs[1];
      auto dwt_t = dwt_acc[tid];
      scalar_t* sdu = sums[tid][0].data_ptr<scalar_t>();
      scalar_t* sduz = sdu + K;
      scalar_t* d1 = df1_acc[tid].data_ptr<scalar_t>();
      scalar_t* d2 = df2_acc[kind == 0 ? 0 : tid].data_ptr<scalar_t>();
      std::vector<scalar_t> A(K), gd(K);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t p0 = b * tile, len = std::min(P, p0 + tile) - p0;
        scalar_t* fa = attended.data_ptr<scalar_t>();
        scalar_t* fz = zall.defined() ? zall.data_ptr<scalar_t>() + p0 * K
                                      : zs.data_ptr<scalar_t>();
        features_tile(g, xp, wp, p0, len, fz, static_cast<scalar_t*>(nullptr));
        for (int64_t q = 0; q < len; ++q) {
          scalar_t* z = fz + q * K;
          factors_at(g, kind, p1, p2, p0 + q, A.data());
          attended_row(K, z, sc, sh, A.data(), fa + q * K);
        }
        auto go_tile = go.narrow(0, p0, len);
        dwt_t.addmm_(go_tile.t(), attended.narrow(0, 0, len));
        auto dA = dz.narrow(0, p0, len);
        at::mm_out(dA, go_tile, wt);
        for (int64_t q = 0; q < len; ++q) {
          const int64_t p = p0 + q;
          const scalar_t* z = fz + q * K;
          scalar_t* d = dzp + p * K;
          factors_at(g, kind, p1, p2, p, A.data());
          // (deferred, the BN sums are the reduce backward's, over the summed du)
          attend_du(K, z, sc, sh, A.data(), d, gd.data(), defer_tail ? nullptr : sdu,
                    defer_tail ? nullptr : sduz);
          const int64_t n = p / (g.Ho * g.Wo), r = p % (g.Ho * g.Wo);
          const int64_t ho = r / g.Wo, wo = r % g.Wo;
          if (kind == 0) {
            cbam_factor_grads(g.k2, C, gd.data(), p1 + n * C, p2 + p * g.k2, d1 + n * C,
                              d2 + p * g.k2);
          } else {
            for (int64_t i = 0; i < k; ++i)
              for (int64_t j = 0; j < k; ++j) {
                const int64_t hoff = ((n * g.Ho + ho) * k + i) * C;
                const int64_t woff = ((n * g.Wo + wo) * k + j) * C;
                ca_factor_grads(C, gd.data() + (i * k + j) * C, p1 + hoff, p2 + woff,
                                d1 + hoff, d2 + woff);
              }
          }
        }
      }
    });
    if (defer_tail) return;
    auto total = sums.sum(0);
    rest = bn_dwconv_backward<scalar_t>(
        g, x, xpad, wdt, scale, mean, inv_std, total[0], total[1], dz,
        static_cast<const scalar_t*>(nullptr),
        zall.defined() ? zall.data_ptr<scalar_t>() : static_cast<const scalar_t*>(nullptr),
        batch_stats, tile);
  });
  rest.push_back(df1_acc.sum(0).view(a1.sizes()));
  rest.push_back((kind == 0 ? df2_acc[0] : df2_acc.sum(0)).view(a2.sizes()));
  rest.push_back(dwt_acc.sum(0));
  rest.push_back(has_bias ? go.sum(0) : at::Tensor());
  rest.push_back(defer_tail ? dz.view({g.N, g.Ho, g.Wo, K}) : at::Tensor());
  return rest;
}

// --- the operators: schemas in TORCH_LIBRARY, CPU kernels in TORCH_LIBRARY_IMPL -------------
//
// Every operator takes the layer's tensors as the modules hold them: the depthwise conv's
// weight (C * k2, 1, k, k), the BatchNorm's affine (gamma, beta) and statistics (mean, var),
// (C * k2) each in the conv's channel order c * k2 + t, RFAConv's logit scales (C, k2), the
// final conv's weight (O, C, k, k); the statistics are the batch's when batch_stats (their
// derivative is then part of the backward). Gradients come back in the same shapes. Only here
// are the small tensors turned into the kernels' tap-major order (a few KB; the k2-sized
// features never exist outside a tile). Fake (meta) kernels and the autograd formulas are
// registered from Python (attnconv/ops).

namespace {

at::Tensor channels_last(const at::Tensor& x) {
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

// The small operands in the kernels' order, from the layer's.
struct Operands {
  int64_t C, k, k2;
  at::Tensor wdt;  // (k2 conv taps, k2 features, C)
  at::Tensor gamma, beta, mean, inv_std;  // (k2, C)

  Operands(const at::Tensor& x, const at::Tensor& weight_dw, const at::Tensor& gamma_,
           const at::Tensor& beta_, const at::Tensor& mean_, const at::Tensor& var, double eps)
      : C(x.size(1)), k(weight_dw.size(-1)), k2(k * k) {
    TORCH_CHECK(weight_dw.dim() == 4 && weight_dw.size(0) == C * k2 && weight_dw.size(1) == 1 &&
                    weight_dw.size(2) == k && k % 2 == 1,
                "attnconv: expected the depthwise weight (C * k2, 1, k, k) with odd k for C = ",
                C, ", got ", weight_dw.sizes());
    wdt = weight_dw.reshape({C, k2, k2}).permute({2, 1, 0}).contiguous();
    if (gamma_.defined()) {
      gamma = tap_major(gamma_);
      beta = tap_major(beta_);
      mean = tap_major(mean_);
      inv_std = tap_major(at::rsqrt(var + eps));
    }
  }

  at::Tensor tap_major(const at::Tensor& t) const {
    TORCH_CHECK(t.numel() == C * k2, "attnconv: expected a per-feature tensor of C * k2 = ",
                C * k2, " values, got ", t.sizes());
    return t.reshape({C, k2}).t().contiguous();
  }
  // (k2, C) -> (C * k2)
  // (results contiguous whatever reshape makes of them: the fake kernels promise so)
  at::Tensor channel_major(const at::Tensor& t) const {
    return t.t().reshape({C * k2}).contiguous();
  }
  at::Tensor weight_dw(const at::Tensor& dwdt) const {
    return dwdt.permute({2, 1, 0}).reshape({C * k2, 1, k, k}).contiguous();
  }
  // the final conv (O, C, k, k) -> (O, k2 * C) and back
  at::Tensor pointwise(const at::Tensor& weight) const {
    TORCH_CHECK(weight.dim() == 4 && weight.size(1) == C && weight.size(2) == k &&
                    weight.size(3) == k,
                "attnconv: expected the conv weight (O, ", C, ", ", k, ", ", k, "), got ",
                weight.sizes());
    return weight.reshape({weight.size(0), C, k2}).transpose(1, 2).reshape({-1, k2 * C});
  }
  at::Tensor conv_weight(const at::Tensor& wt) const {
    return wt.view({wt.size(0), k2, C}).transpose(1, 2).reshape({wt.size(0), C, k, k})
        .contiguous();
  }
};

std::pair<at::Tensor, at::Tensor> scale_shift(const Operands& t) {
  auto scale = (t.gamma * t.inv_std).contiguous();
  return {scale, (t.beta - t.mean * scale).contiguous()};
}

int64_t positions_of(const at::Tensor& x, int64_t k, int64_t s) {
  const Geometry g = geometry(x, k, s);
  return g.positions();
}

// An absent gradient as an empty tensor (a Tensor[] holds no None).
at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

std::tuple<at::Tensor, at::Tensor> rfa_feature_stats(const at::Tensor& x,
                                                     const at::Tensor& weight_dw,
                                                     int64_t stride) {
  const Operands t(x, weight_dw, {}, {}, {}, {}, 0.0);
  const at::Tensor xc = channels_last(x);
  const int64_t tile = tile_positions(t.k2 * t.C, x.element_size(), std::max<int64_t>(
      1, x.numel() / std::max<int64_t>(1, x.size(1))), 1);
  auto stats = rfa_stats_impl(xc, t.wdt, t.k, stride, tile);
  return {t.channel_major(stats[0]), t.channel_major(stats[1])};
}

at::Tensor rfa_fused(const at::Tensor& x, const at::Tensor& weight_dw, const at::Tensor& gamma,
                     const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                     const at::Tensor& logit_scale, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t stride, bool batch_stats,
                     double eps) {
  const Operands t(x, weight_dw, gamma, beta, mean, var, eps);
  auto [scale, shift] = scale_shift(t);
  const at::Tensor wt = t.pointwise(weight);
  const int64_t tile = tile_positions(wt.size(1), x.element_size(),
                                      positions_of(x, t.k, stride), 1);
  return rfa_forward_impl(channels_last(x), t.wdt, scale, shift, t.tap_major(logit_scale), wt,
                          bias, t.k, stride, tile);
}

std::vector<at::Tensor> rfa_fused_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& weight_dw, const at::Tensor& gamma,
                                           const at::Tensor& beta, const at::Tensor& mean,
                                           const at::Tensor& var, const at::Tensor& logit_scale,
                                           const at::Tensor& weight, bool has_bias,
                                           int64_t stride, bool batch_stats, double eps) {
  const Operands t(x, weight_dw, gamma, beta, mean, var, eps);
  const at::Tensor wt = t.pointwise(weight);
  const int64_t tile = backward_tile(
      wt.size(1), x.element_size(), grad_out.size(0) * grad_out.size(2) * grad_out.size(3));
  auto g = rfa_backward_impl(grad_out, channels_last(x), t.wdt, t.gamma, t.beta, t.mean,
                             t.inv_std, t.tap_major(logit_scale), wt, has_bias, t.k, stride,
                             batch_stats, tile);
  // dx, dwdt, dgamma, dbeta, da, dwt, dbias
  return {g[0], t.weight_dw(g[1]), t.channel_major(g[2]), t.channel_major(g[3]),
          g[4].t().contiguous(), t.conv_weight(g[5]), or_empty(g[6], x)};
}

// The reductions, and a handle: a zero-size-in-memory (N, Ho, Wo, K) tensor that
// rfa_tile_attend takes so that autograd hands its deferred share of dL/du (the handle's
// gradient) to this op's backward, which runs the BN + depthwise backward once for both.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rfa_tile_reduce(
    const at::Tensor& x, const at::Tensor& weight_dw, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var, int64_t stride,
    int64_t kind, bool batch_stats, double eps) {
  const Operands t(x, weight_dw, gamma, beta, mean, var, eps);
  auto [scale, shift] = scale_shift(t);
  const at::Tensor xc = channels_last(x);
  const Geometry g = geometry(xc, t.k, stride);
  const int64_t tile = tile_positions(t.k2 * t.C, x.element_size(), g.positions(), 1);
  auto r = tile_reduce_impl(xc, t.wdt, scale, shift, t.k, stride, kind, tile);
  auto handle = at::zeros({1, 1, 1, 1}, x.options()).expand({g.N, g.Ho, g.Wo, g.K});
  if (kind == 0)
    return {r[0].view({g.N, g.Ho, g.Wo, g.k2}), r[1].view({g.N, g.Ho, g.Wo, g.k2}), handle};
  return {r[0], r[1], handle};
}

std::vector<at::Tensor> rfa_tile_reduce_backward(
    const at::Tensor& dr1, const at::Tensor& dr2, const std::optional<at::Tensor>& du_attend,
    const at::Tensor& x, const at::Tensor& weight_dw, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var, int64_t stride,
    int64_t kind, bool batch_stats, double eps) {
  const Operands t(x, weight_dw, gamma, beta, mean, var, eps);
  const int64_t tile = tile_positions(t.k2 * t.C, x.element_size(),
                                      positions_of(x, t.k, stride), 2);
  const at::Tensor du = du_attend.has_value() ? *du_attend : at::Tensor();
  TORCH_CHECK(!du.defined() || du.numel() == positions_of(x, t.k, stride) * t.k2 * t.C,
              "attnconv: expected tile_attend's dL/du of (N, Ho, Wo, C * k2) values, got ",
              du.sizes());
  auto g = tile_reduce_backward_impl(dr1.contiguous(), dr2.contiguous(), du, channels_last(x),
                                     t.wdt, t.gamma, t.beta, t.mean, t.inv_std, t.k, stride,
                                     kind, batch_stats, tile);
  // dx, dwdt, dgamma, dbeta
  return {g[0], t.weight_dw(g[1]), t.channel_major(g[2]), t.channel_major(g[3])};
}

// handle: rfa_tile_reduce's third output (or None); it does not enter the result, only
// routes this op's share of dL/du to that op's backward.
at::Tensor rfa_tile_attend(const at::Tensor& x, const at::Tensor& weight_dw,
                           const at::Tensor& gamma, const at::Tensor& beta,
                           const at::Tensor& mean, const at::Tensor& var, const at::Tensor& f1,
                           const at::Tensor& f2, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& handle, int64_t stride, int64_t kind,
                           bool batch_stats, double eps) {
  const Operands t(x, weight_dw, gamma, beta, mean, var, eps);
  auto [scale, shift] = scale_shift(t);
  const at::Tensor wt = t.pointwise(weight);
  const int64_t tile = tile_positions(wt.size(1), x.element_size(),
                                      positions_of(x, t.k, stride), 1);
  return tile_attend_impl(channels_last(x), t.wdt, scale, shift, f1.contiguous(),
                          f2.contiguous(), wt, bias, t.k, stride, kind, tile);
}

std::vector<at::Tensor> rfa_tile_attend_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight_dw,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& f1, const at::Tensor& f2, const at::Tensor& weight,
    bool has_bias, int64_t stride, int64_t kind, bool batch_stats, bool defer_tail,
    double eps) {
  const Operands t(x, weight_dw, gamma, beta, mean, var, eps);
  const at::Tensor wt = t.pointwise(weight);
  const int64_t tile = backward_tile(
      wt.size(1), x.element_size(), grad_out.size(0) * grad_out.size(2) * grad_out.size(3));
  auto g = tile_attend_backward_impl(
      grad_out, channels_last(x), t.wdt, t.gamma, t.beta, t.mean, t.inv_std, f1.contiguous(),
      f2.contiguous(), wt, has_bias, t.k, stride, kind, batch_stats, defer_tail, tile);
  // dx, dwdt, dgamma, dbeta (empty when deferred), df1, df2, dwt, dbias, du (empty unless)
  if (defer_tail)
    return {or_empty({}, x), or_empty({}, x), or_empty({}, x), or_empty({}, x), g[4], g[5],
            t.conv_weight(g[6]), or_empty(g[7], x), g[8]};
  return {g[0], t.weight_dw(g[1]), t.channel_major(g[2]), t.channel_major(g[3]), g[4], g[5],
          t.conv_weight(g[6]), or_empty(g[7], x), or_empty({}, x)};
}

}  // namespace

TORCH_LIBRARY(attnconv, m) {
  m.def("rfa_feature_stats(Tensor x, Tensor weight_dw, int stride) -> (Tensor, Tensor)");
  m.def("rfa_fused(Tensor x, Tensor weight_dw, Tensor gamma, Tensor beta, Tensor mean, "
        "Tensor var, Tensor logit_scale, Tensor weight, Tensor? bias, int stride, "
        "bool batch_stats, float eps) -> Tensor");
  m.def("rfa_fused_backward(Tensor grad_out, Tensor x, Tensor weight_dw, Tensor gamma, "
        "Tensor beta, Tensor mean, Tensor var, Tensor logit_scale, Tensor weight, "
        "bool has_bias, int stride, bool batch_stats, float eps) -> Tensor[]");
  m.def("rfa_tile_reduce(Tensor x, Tensor weight_dw, Tensor gamma, Tensor beta, Tensor mean, "
        "Tensor var, int stride, int kind, bool batch_stats, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("rfa_tile_reduce_backward(Tensor dr1, Tensor dr2, Tensor? du_attend, Tensor x, "
        "Tensor weight_dw, Tensor gamma, Tensor beta, Tensor mean, Tensor var, int stride, "
        "int kind, bool batch_stats, float eps) -> Tensor[]");
  m.def("rfa_tile_attend(Tensor x, Tensor weight_dw, Tensor gamma, Tensor beta, Tensor mean, "
        "Tensor var, Tensor f1, Tensor f2, Tensor weight, Tensor? bias, Tensor? handle, "
        "int stride, int kind, bool batch_stats, float eps) -> Tensor");
  m.def("rfa_tile_attend_backward(Tensor grad_out, Tensor x, Tensor weight_dw, Tensor gamma, "
        "Tensor beta, Tensor mean, Tensor var, Tensor f1, Tensor f2, Tensor weight, "
        "bool has_bias, int stride, int kind, bool batch_stats, bool defer_tail, float eps) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(attnconv, CPU, m) {
  m.impl("rfa_feature_stats", &rfa_feature_stats);
  m.impl("rfa_fused", &rfa_fused);
  m.impl("rfa_fused_backward", &rfa_fused_backward);
  m.impl("rfa_tile_reduce", &rfa_tile_reduce);
  m.impl("rfa_tile_reduce_backward", &rfa_tile_reduce_backward);
  m.impl("rfa_tile_attend", &rfa_tile_attend);
  m.impl("rfa_tile_attend_backward", &rfa_tile_attend_backward);
}
