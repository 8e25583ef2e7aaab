// Paged attention for XLA:CPU, as an XLA FFI custom call (attention_impl="cpu").
//
// Tiles of T queries of one sequence (T = 1: decode rows; T = 16: prefill tiles) attend
// causally over their sequence's pages, read in place from the pool's row view
// [L * Hkv * N, bs * D] (pagedjax.runner.kv_cache.to_rows): one page of one kv head is one
// contiguous row. Why a native kernel: in XLA the same loop is ~900 small kernels per
// layer (gathers, masks, online-softmax updates per chunk of pages), and XLA:CPU's cost
// per kernel, not bytes or FLOPs, was most of a decode step
// (pagedjax/runner/attention.py). Here a (tile, kv head) is one pass over its pages.
//
// Exactness rules, as in the xla path: a query never uses a key past its position (so
// stale or NaN data cannot leak: such keys are never loaded into a softmax or a sum),
// block-table entries are clamped into [0, N), a query with position < 0 (padding)
// returns zeros. Scores and the softmax are float32; the softmax is two-pass (scores,
// then max / exp / sum), the output divided once at the end.
//
// Storage: float32; bfloat16 (or its uint16 bit pattern); 8-bit codes (int8, or fp8 /
// uint8 bit patterns) decoded through a 256-entry table and scaled per token.
//
// Work is split over (tile, kv head) pairs on XLA's intra-op thread pool.
//
// Where a decode's time went (perf annotate, 64 rows of context 250, D = 32): ~30% in
// transposing each K page with scalar moves, ~14% in the row max (a chain of dependent
// scalar instructions), ~25% loading V. With AVX-512 (the library is built with
// -march=native) a page is transposed in registers (16 x 16 blocks); the max runs in 16
// lanes; pages are prefetched a few ahead (a page table scatters them over the pool):
// 1.4-1.6x faster on decodes than the scalar version in the same process (15-19 GB/s of
// K/V on 2 cores), 1.3x on prefill tiles.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum class Storage { kF32, kBF16, kCode8 };

struct Problem {
  const float* q;        // [B, T, H, D]
  const void* k;         // [R, bs * D]
  const void* v;         // [R, bs * D]
  const float* k_scale;  // [R, bs] (kCode8 only)
  const float* v_scale;  // [R, bs] (kCode8 only)
  const float* lut;      // [256] (kCode8 only)
  const int32_t* tables; // [B, P]
  const int32_t* pos;    // [B, T]
  float* out;            // [B, T, H, D]
  Storage storage;
  int64_t b, t, h, d, p, hkv, n, bs, layer;
  float sm_scale;
};

inline float Bf16(uint16_t bits) {
  uint32_t w = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

// One page's K or V (bs x D) as float32, `count` tokens: float32 pools are read in
// place; others are converted into `buf` (8-bit codes scaled per token).
inline const float* Page(const Problem& pr, const void* base, const float* scale,
                         int64_t row, int64_t count, float* buf) {
  const int64_t w = pr.bs * pr.d;
  const int64_t m = count * pr.d;
  switch (pr.storage) {
    case Storage::kF32:
      return static_cast<const float*>(base) + row * w;
    case Storage::kBF16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + row * w;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) buf[i] = Bf16(src[i]);
      return buf;
    }
    case Storage::kCode8: {
      const uint8_t* src = static_cast<const uint8_t*>(base) + row * w;
      const float* sc = scale + row * pr.bs;
      for (int64_t t = 0; t < count; ++t)
        for (int64_t i = 0; i < pr.d; ++i) buf[t * pr.d + i] = pr.lut[src[t * pr.d + i]] * sc[t];
      return buf;
    }
  }
  return buf;
}

// exp(x) for x <= 0 (Cephes' single-precision polynomial, ~1 ulp), written so that a
// loop of it vectorizes. Below -87.3 it returns exp(-87.3) ~ 1e-38 instead of less:
// next to the row's largest term (exp(0) = 1) that is far below float32's resolution.
inline float ExpNonPositive(float x) {
  x = x < -87.3f ? -87.3f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// Bytes per stored element (prefetching works on bytes).
inline int64_t ElementBytes(Storage s) {
  return s == Storage::kF32 ? 4 : s == Storage::kBF16 ? 2 : 1;
}

// Asks for one page's stored bytes (and its 8-bit scales) ahead of use: pages are
// scattered over the pool, so the hardware prefetcher, which follows addresses within a
// page, misses the first lines of every page. Always inlined: GCC deems a call to it free
// of side effects (a prefetch changes no value) and deletes the call.
[[gnu::always_inline]] inline void PrefetchPage(const Problem& pr, const void* base,
                                               const float* scale, int64_t row) {
  const int64_t bytes = pr.bs * pr.d * ElementBytes(pr.storage);
  const char* p = static_cast<const char*>(base) + row * bytes;
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
  if (pr.storage == Storage::kCode8) __builtin_prefetch(scale + row * pr.bs);
}

// Pages asked for ahead of the one being read: a page's work (~100-200 cycles in a decode)
// is shorter than a miss to memory.
constexpr int64_t kAhead = 4;

// The largest of s[0 .. n): 16 independent lanes (a vector max; a single running max
// is a chain of dependent scalar instructions), then the lanes. Exact in any order.
inline float RowMax(const float* s, int64_t n) {
  constexpr int64_t kLanes = 16;
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes)
    for (int64_t u = 0; u < kLanes; ++u) lanes[u] = lanes[u] > s[t + u] ? lanes[u] : s[t + u];
  for (; t < n; ++t) lanes[0] = lanes[0] > s[t] ? lanes[0] : s[t];
  float m = lanes[0];
  for (int64_t u = 1; u < kLanes; ++u) m = m > lanes[u] ? m : lanes[u];
  return m;
}

// kt[i * bs + t] = k[t * d + i] for t < count (one page of K, [bs, D] -> [D, bs]); the
// columns t >= count are zeros (the page's slots past the context: finite, then dropped).
template <int64_t kD, int64_t kBs>
inline void TransposePage(const float* k, float* kt, int64_t d, int64_t bs, int64_t count) {
#if defined(__AVX512F__)
  if constexpr (kBs == 16 && kD > 0 && kD % 16 == 0) {
    // 16 x 16 blocks in registers: unpack 32-bit pairs, 64-bit pairs, then 128-bit lanes
    // twice (the standard AVX-512 transpose); rows past `count` are loaded as zeros.
    for (int64_t c = 0; c < kD; c += 16) {
      __m512 r[16], t[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < count ? _mm512_loadu_ps(k + i * kD + c) : _mm512_setzero_ps();
      for (int64_t i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int64_t i = 0; i < 16; i += 4) {
        for (int64_t h = 0; h < 2; ++h) {
          const __m512d a = _mm512_castps_pd(t[i + h]), b = _mm512_castps_pd(t[i + h + 2]);
          r[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
          r[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
      }
      // r[4a + b] holds rows 4a .. 4a + 3 of columns {b, b + 4, b + 8, b + 12}, one
      // 128-bit lane per column group.
      for (int64_t i = 0; i < 16; i += 8) {
        for (int64_t b = 0; b < 4; ++b) {
          t[i + b] = _mm512_shuffle_f32x4(r[i + b], r[i + b + 4], 0x88);
          t[i + b + 4] = _mm512_shuffle_f32x4(r[i + b], r[i + b + 4], 0xdd);
        }
      }
      for (int64_t b = 0; b < 8; ++b) {
        r[b] = _mm512_shuffle_f32x4(t[b], t[b + 8], 0x88);
        r[b + 8] = _mm512_shuffle_f32x4(t[b], t[b + 8], 0xdd);
      }
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (c + i) * 16, r[i]);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < count; ++t)
    for (int64_t i = 0; i < d; ++i) kt[i * bs + t] = k[t * d + i];
  if (count < bs)
    for (int64_t i = 0; i < d; ++i) std::fill(kt + i * bs + count, kt + (i + 1) * bs, 0.0f);
}

// Tile `r` (T queries of one sequence), kv head `kh`: the G x T query rows that share
// it. kD: head_dim known at compile time (the common sizes), or 0 (read from the problem);
// kBs the same for block_size.
// kR: query rows per register block (1, 2 or 4: no more than a tile has, so MHA decode,
// one query row per kv head, computes no padding rows).
template <int64_t kD, int64_t kBs, int64_t kR>
void Work(const Problem& pr, int64_t r, int64_t kh, std::vector<float>& scratch) {
  const int64_t g = pr.h / pr.hkv, d = kD ? kD : pr.d, bs = kBs ? kBs : pr.bs;
  const int64_t nq = pr.t * g;  // query rows: (token, head) pairs
  const int32_t* pos = pr.pos + r * pr.t;
  auto out_row = [&](int64_t qi) {  // qi = token * g + head
    return pr.out + ((r * pr.t + qi / g) * pr.h + kh * g + qi % g) * d;
  };
  auto q_row = [&](int64_t qi) {
    return pr.q + ((r * pr.t + qi / g) * pr.h + kh * g + qi % g) * d;
  };
  int64_t last = -1;  // the tile's furthest position: keys 0 .. last are read
  for (int64_t i = 0; i < pr.t; ++i) last = std::max<int64_t>(last, pos[i]);
  for (int64_t qi = 0; qi < nq; ++qi) std::fill(out_row(qi), out_row(qi) + d, 0.0f);
  if (last < 0) return;
  const int64_t pages = std::min((last + bs) / bs, pr.p);
  const int64_t ctx = std::min(last + 1, pages * bs);
  scratch.resize(nq * ctx + 2 * bs * d + nq * d + nq + d);
  float* scores = scratch.data();   // [nq, ctx]
  float* buf = scores + nq * ctx;   // [bs, D] a converted page
  float* kt = buf + bs * d;         // [D, bs] a page of K transposed
  float* acc = kt + bs * d;         // [nq, D]
  float* inv = acc + nq * d;        // [nq]
  float* zeros = inv + nq;          // [D] the query of a block's unused row
  std::fill(zeros, zeros + d, 0.0f);
  const int64_t head_row = (pr.layer * pr.hkv + kh) * pr.n;
  const int32_t* table = pr.tables + r * pr.p;
  auto row_of = [&](int64_t j) {
    return head_row + std::clamp<int64_t>(table[j], 0, pr.n - 1);
  };
  // keys a query row sees: 0 .. its position (none for padding, position < 0)
  auto seen = [&](int64_t qi) { return std::min<int64_t>(pos[qi / g] + 1, ctx); };
  // Scores: K^T of a page in [D, bs] order, so each query's scores for the page are
  // vector FMAs across its tokens (no horizontal sums). Keys past a row's position are
  // computed with the page but never used.
  for (int64_t j = 0; j < pages; ++j) {
    const int64_t count = std::min(bs, ctx - j * bs);
    if (j == 0)
      for (int64_t a = 0; a < std::min(kAhead, pages); ++a)
        PrefetchPage(pr, pr.k, pr.k_scale, row_of(a));
    if (const int64_t a = j + kAhead; a < pages)
      PrefetchPage(pr, pr.k, pr.k_scale, row_of(a));
    else if (a - pages < pages)  // the V pass is next
      PrefetchPage(pr, pr.v, pr.v_scale, row_of(a - pages));
    const float* k = Page(pr, pr.k, pr.k_scale, row_of(j), count, buf);
    TransposePage<kD, kBs>(k, kt, d, bs, count);
    if constexpr (kBs > 0) {
      // kR query rows at a time: kR independent accumulator chains, one load of each
      // K^T column for all of them; the page's scores stay in registers.
      for (int64_t q0 = 0; q0 < nq; q0 += kR) {
        const float* qs[kR];
        bool live[kR];
        for (int64_t u = 0; u < kR; ++u) {
          live[u] = q0 + u < nq && seen(q0 + u) > j * bs;
          qs[u] = live[u] ? q_row(q0 + u) : zeros;
        }
        float a[kR][kBs] = {};
        for (int64_t i = 0; i < d; ++i) {
          const float* col = kt + i * bs;
          for (int64_t u = 0; u < kR; ++u) {
            const float qv = qs[u][i];
#pragma omp simd
            for (int64_t t = 0; t < kBs; ++t) a[u][t] += qv * col[t];
          }
        }
        for (int64_t u = 0; u < kR; ++u) {
          if (!live[u]) continue;
          float* s = scores + (q0 + u) * ctx + j * bs;
          for (int64_t t = 0; t < count; ++t) s[t] = a[u][t] * pr.sm_scale;
        }
      }
    } else {
      for (int64_t qi = 0; qi < nq; ++qi) {
        if (seen(qi) <= j * bs) continue;
        const float* qg = q_row(qi);
        float* s = scores + qi * ctx + j * bs;
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) s[t] = 0.0f;
        for (int64_t i = 0; i < d; ++i) {
          const float qv = qg[i];
          const float* col = kt + i * bs;
#pragma omp simd
          for (int64_t t = 0; t < count; ++t) s[t] += qv * col[t];
        }
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) s[t] *= pr.sm_scale;
      }
    }
  }
  for (int64_t qi = 0; qi < nq; ++qi) {
    const int64_t n = seen(qi);
    float* s = scores + qi * ctx;
    const float m = RowMax(s, n);
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) s[t] = ExpNonPositive(s[t] - m);
    float l = 0.0f;
#pragma omp simd reduction(+ : l)
    for (int64_t t = 0; t < n; ++t) l += s[t];
    inv[qi] = n > 0 ? 1.0f / l : 0.0f;
  }
  std::fill(acc, acc + nq * d, 0.0f);
  for (int64_t j = 0; j < pages; ++j) {
    const int64_t count = std::min(bs, ctx - j * bs);
    if (j + kAhead < pages) PrefetchPage(pr, pr.v, pr.v_scale, row_of(j + kAhead));
    const float* v = Page(pr, pr.v, pr.v_scale, row_of(j), count, buf);
    if constexpr (kD > 0) {
      // kR rows at a time, each row's output in registers. A row's weights past its own
      // position are exactly 0 (not its unused scores); those keys are <= the tile's
      // last position, i.e. written this step or before, so finite: 0 * v == 0.
      for (int64_t q0 = 0; q0 < nq; q0 += kR) {
        int64_t cnt[kR], most = 0;
        for (int64_t u = 0; u < kR; ++u) {
          cnt[u] = q0 + u < nq ? std::clamp<int64_t>(seen(q0 + u) - j * bs, 0, count) : 0;
          most = std::max(most, cnt[u]);
        }
        if (most == 0) continue;
        float o[kR][kD] = {};
        for (int64_t t = 0; t < most; ++t) {
          const float* vt = v + t * kD;
          for (int64_t u = 0; u < kR; ++u) {
            const float w = t < cnt[u] ? scores[(q0 + u) * ctx + j * bs + t] : 0.0f;
#pragma omp simd
            for (int64_t i = 0; i < kD; ++i) o[u][i] += w * vt[i];
          }
        }
        for (int64_t u = 0; u < kR && q0 + u < nq; ++u) {
          float* a = acc + (q0 + u) * kD;
#pragma omp simd
          for (int64_t i = 0; i < kD; ++i) a[i] += o[u][i];
        }
      }
    } else {
      for (int64_t qi = 0; qi < nq; ++qi) {
        const int64_t cnt = std::min(count, seen(qi) - j * bs);
        float* o = acc + qi * d;
        const float* s = scores + qi * ctx + j * bs;
        for (int64_t t = 0; t < cnt; ++t) {
          const float w = s[t];
          const float* vt = v + t * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) o[i] += w * vt[i];
        }
      }
    }
  }
  for (int64_t qi = 0; qi < nq; ++qi) {
    float* o = out_row(qi);
    for (int64_t i = 0; i < d; ++i) o[i] = acc[qi * d + i] * inv[qi];
  }
}

using WorkFn = void (*)(const Problem&, int64_t, int64_t, std::vector<float>&);

template <int64_t kR>
WorkFn PickRows(int64_t d, int64_t bs) {
  if (bs == 16) {
    switch (d) {
      case 32: return Work<32, 16, kR>;
      case 64: return Work<64, 16, kR>;
      case 128: return Work<128, 16, kR>;
      default: return Work<0, 16, kR>;
    }
  }
  return Work<0, 0, kR>;
}

WorkFn Pick(int64_t d, int64_t bs, int64_t rows) {
  return rows >= 4 ? PickRows<4>(d, bs) : rows >= 2 ? PickRows<2>(d, bs) : PickRows<1>(d, bs);
}

// Work (query row, head, key position triples; ~5 ns each at D = 32 on the development
// VM) below which a helper thread is not worth its handoff: ~40 us.
constexpr int64_t kWorkPerHelper = 8192;

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                  ffi::AnyBuffer v, ffi::Buffer<ffi::F32> k_scale,
                  ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::F32> lut,
                  ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> pos,
                  ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out,
                  float sm_scale, int64_t num_kv_heads, int64_t num_blocks,
                  int64_t block_size, int64_t num_threads) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 2 || td.size() != 2 || td[0] != qd[0] ||
      pos.element_count() != qd[0] * qd[1] || kd[1] != block_size * qd[3] ||
      kd[0] % (num_kv_heads * num_blocks) != 0 || qd[2] % num_kv_heads != 0)
    return ffi::Error::InvalidArgument("cpu paged attention: inconsistent shapes");
  Problem pr;
  switch (k.element_type()) {
    case ffi::DataType::F32: pr.storage = Storage::kF32; break;
    case ffi::DataType::BF16:
    case ffi::DataType::U16: pr.storage = Storage::kBF16; break;
    case ffi::DataType::S8:
    case ffi::DataType::U8:
    case ffi::DataType::F8E4M3FN: pr.storage = Storage::kCode8; break;
    default: return ffi::Error::InvalidArgument("cpu paged attention: pool dtype");
  }
  if (v.element_type() != k.element_type())
    return ffi::Error::InvalidArgument("cpu paged attention: K and V dtypes differ");
  const int64_t num_layers = kd[0] / (num_kv_heads * num_blocks);
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= num_layers)
    return ffi::Error::InvalidArgument("cpu paged attention: layer out of range");
  if (pr.storage == Storage::kCode8 &&
      (lut.element_count() != 256 || k_scale.element_count() != kd[0] * block_size ||
       v_scale.element_count() != kd[0] * block_size))
    return ffi::Error::InvalidArgument("cpu paged attention: scales / table shapes");
  pr.q = q.typed_data();
  pr.k = k.untyped_data();
  pr.v = v.untyped_data();
  pr.k_scale = k_scale.typed_data();
  pr.v_scale = v_scale.typed_data();
  pr.lut = lut.typed_data();
  pr.tables = tables.typed_data();
  pr.pos = pos.typed_data();
  pr.out = out->typed_data();
  pr.b = qd[0];
  pr.t = qd[1];
  pr.h = qd[2];
  pr.d = qd[3];
  pr.p = td[1];
  pr.hkv = num_kv_heads;
  pr.n = num_blocks;
  pr.bs = block_size;
  pr.layer = l;
  pr.sm_scale = sm_scale;

  const int64_t items = pr.b * pr.hkv;  // (tile, kv head) pairs
  const WorkFn fn = Pick(pr.d, pr.bs, pr.t * (pr.h / pr.hkv));
  // Helpers only for work worth a handoff: a helper that claims an item and is then
  // descheduled (2 cores, with the host thread busy beside XLA's) stalls the caller for
  // a time slice, which cost a batch-1 decode's first layer ~0.2 ms in half the steps.
  int64_t work = 0;  // (query row, head, key position) triples, a proxy for time
  for (int64_t r = 0; r < pr.b; ++r) {
    int64_t last = -1;
    for (int64_t i = 0; i < pr.t; ++i) last = std::max<int64_t>(last, pr.pos[r * pr.t + i]);
    work += (last + 1) * pr.t;
  }
  work *= pr.h;
  const int64_t helpers = std::min<int64_t>(
      {num_threads - 1, pool.num_threads(), items - 1, work / kWorkPerHelper});
  pagedjax::RunItems(pool, items, helpers, [&](int64_t i) {
    thread_local std::vector<float> scratch;  // grown to the largest tile's need, kept
    fn(pr, i / pr.hkv, i % pr.hkv, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PagedjaxCpuPagedAttention, Attend,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // q
        .Arg<ffi::AnyBuffer>()         // k rows
        .Arg<ffi::AnyBuffer>()         // v rows
        .Arg<ffi::Buffer<ffi::F32>>()  // k scales
        .Arg<ffi::Buffer<ffi::F32>>()  // v scales
        .Arg<ffi::Buffer<ffi::F32>>()  // 8-bit code table
        .Arg<ffi::Buffer<ffi::S32>>()  // block tables
        .Arg<ffi::Buffer<ffi::S32>>()  // positions
        .Arg<ffi::Buffer<ffi::S32>>()  // layer
        .Ret<ffi::Buffer<ffi::F32>>()  // out
        .Attr<float>("sm_scale")
        .Attr<int64_t>("num_kv_heads")
        .Attr<int64_t>("num_blocks")
        .Attr<int64_t>("block_size")
        .Attr<int64_t>("num_threads"));
