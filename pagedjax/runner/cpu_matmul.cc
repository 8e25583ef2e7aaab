// Float32 matrix product for XLA:CPU, as an XLA FFI custom call: c[M, N] = a[M, K] w[K, N]
// (pagedjax.runner.cpu_matmul; the model's projections under attention_impl="cpu").
//
// Why: profiled in the engine, XLA:CPU's products (YNNPACK) ran at 38 GFLOP/s at the
// 8 token rows of a small decode step and 109 at 64 rows (256 x 704 weights), about
// half of what this loop reaches at the same shapes in the same process; the 28
// products of a step were most of its time.
//
// Exactness: every output element is the float32 fused multiply-add chain
// sum_k a[m, k] w[k, n] taken in the order k = 0, 1, ..., K - 1, whatever M, the tile or
// the thread that computes it: a row's result does not depend on the rows batched with
// it (the engine's projections do not change with the batch's composition or bucket;
// its tied LM head is still XLA's product).
//
// Tiling: 16-wide AVX-512 vectors; a tile of up to 6 rows x 64 columns keeps 24
// accumulators in registers while it walks K (w's rows of the tile are 256 contiguous
// bytes each); a panel of 64 columns is one work item, its rows of w re-read from L2 by
// each row tile. Items go to XLA's intra-op thread pool when the product is big enough
// to pay for the handoff.

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 64;  // columns per work item (4 vectors of 16)
constexpr int kRows = 6;        // rows per register tile
constexpr int64_t kAhead = 16;  // rows of w prefetched ahead

#if defined(__AVX512F__)

// c[0:R, 0:16 * V] = a[0:R, :] w[:, 0:16 * V]; lda / ldw / ldc are row strides.
template <int R, int V>
[[gnu::always_inline]] inline void Tile(const float* a, int64_t lda, const float* w,
                                        int64_t ldw, float* c, int64_t ldc, int64_t k_len) {
  __m512 acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_len; ++k) {
    // w's rows are N floats apart (2.8 KB at N = 704): past the hardware's stride
    // prefetch; fetched kAhead rows ahead (a no-op past the end of w's rows).
    for (int j = 0; j < V; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(w + (k + kAhead) * ldw + 16 * j), _MM_HINT_T0);
    __m512 wv[V];
    for (int j = 0; j < V; ++j) wv[j] = _mm512_loadu_ps(w + k * ldw + 16 * j);
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
      for (int j = 0; j < V; ++j) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

template <int V>
void Panel(const float* a, const float* w, float* c, int64_t m, int64_t k, int64_t n) {
  if constexpr (V % 2 == 0) {
    if (m == 7 || m == 8) {  // one pass over w in 8 x 32 tiles instead of 6 + 2 rows
      for (int j = 0; j < V; j += 2) {
        if (m == 8) Tile<8, 2>(a, k, w + 16 * j, n, c + 16 * j, n, k);
        else Tile<7, 2>(a, k, w + 16 * j, n, c + 16 * j, n, k);
      }
      return;
    }
  }
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) Tile<kRows, V>(a + i * k, k, w, n, c + i * n, n, k);
  const float* ar = a + i * k;
  float* cr = c + i * n;
  switch (m - i) {
    case 5: Tile<5, V>(ar, k, w, n, cr, n, k); break;
    case 4: Tile<4, V>(ar, k, w, n, cr, n, k); break;
    case 3: Tile<3, V>(ar, k, w, n, cr, n, k); break;
    case 2: Tile<2, V>(ar, k, w, n, cr, n, k); break;
    case 1: Tile<1, V>(ar, k, w, n, cr, n, k); break;
    default: break;
  }
}

#else  // the same order of operations (std::fma keeps the fused rounding), for builds
        // without AVX-512: correct, but Python routes products to XLA then
        // (PagedjaxCpuMatmulIsVectorized)

template <int V>
void Panel(const float* a, const float* w, float* c, int64_t m, int64_t k, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * n;
    std::fill(ci, ci + 16 * V, 0.0f);
    for (int64_t t = 0; t < k; ++t) {  // rows of w in order: contiguous inner loop
      const float ait = a[i * k + t];
      for (int64_t j = 0; j < 16 * V; ++j) ci[j] = std::fma(ait, w[t * n + j], ci[j]);
    }
  }
}

#endif

// Columns [64 i, 64 i + 64) of c (the last panel may be narrower: N is a multiple of 16).
void RunPanel(const float* a, const float* w, float* c, int64_t m, int64_t k, int64_t n,
              int64_t i) {
  const int64_t n0 = i * kPanel;
  switch (std::min<int64_t>(kPanel, n - n0) / 16) {
    case 4: Panel<4>(a, w + n0, c + n0, m, k, n); break;
    case 3: Panel<3>(a, w + n0, c + n0, m, k, n); break;
    case 2: Panel<2>(a, w + n0, c + n0, m, k, n); break;
    default: Panel<1>(a, w + n0, c + n0, m, k, n); break;
  }
}

// A helper thread only when the product is worth a handoff: ~1M multiply-adds (a few
// microseconds of FMAs) or 256 KiB of weights to stream.
bool WorthHelpers(int64_t m, int64_t k, int64_t n) {
  return m * k * n >= (int64_t{1} << 20) || k * n * 4 >= (int64_t{256} << 10);
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> c, int64_t num_threads) {
  auto ad = a.dimensions();
  auto wd = w.dimensions();
  auto cd = c->dimensions();
  if (ad.size() != 2 || wd.size() != 2 || cd.size() != 2 || wd[0] != ad[1] ||
      cd[0] != ad[0] || cd[1] != wd[1] || wd[1] % 16 != 0)
    return ffi::Error::InvalidArgument("cpu matmul: shapes must be a[M, K] w[K, N] c[M, N] "
                                       "with N a multiple of 16");
  const int64_t m = ad[0], k = ad[1], n = wd[1];
  if (m == 0 || n == 0) return ffi::Error::Success();
  const int64_t items = (n + kPanel - 1) / kPanel;
  const int64_t helpers =
      WorthHelpers(m, k, n) ? std::min<int64_t>({num_threads - 1, pool.num_threads(), items - 1})
                            : 0;
  const float* ap = a.typed_data();
  const float* wp = w.typed_data();
  float* cp = c->typed_data();
  pagedjax::RunItems(pool, items, helpers,
                     [&](int64_t i) { RunPanel(ap, wp, cp, m, k, n, i); });
  return ffi::Error::Success();
}

}  // namespace

// Whether this build has the AVX-512 tiles (the scalar loop is slower than XLA's products).
extern "C" int PagedjaxCpuMatmulIsVectorized() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c [M, N]
                                  .Attr<int64_t>("num_threads"));
