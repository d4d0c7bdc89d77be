// Float and int8 matrices for the decode step, grouped: row m of x times matrix idx[m] of a stack w
// [E, O, I] — bf16 or fp32 (`float_pairs`), or int8 codes with one scale per output row (`int8_pairs`,
// the scale applied after the sum as the reference `matvec` does) — in fp32, each chosen matrix read
// once for all the rows that chose it. A plain linear is a stack of one (`decode_linear`).
//
// A batch of decode rows chooses few experts per row but, together, many rows per expert (32 rows ×
// 8 of 64: ~4 rows an expert). The rows are grouped by expert (a counting sort), and the work splits
// into (expert, block of output rows) tasks across torch's intra-op threads; within a task a few
// weight rows are loaded once per few activation rows and stay in L1 for the next few. bf16
// weights on a CPU with AVX512-BF16 multiply by `vdpbf16ps` (exact bf16 products, fp32 sums) with the
// activations rounded to bf16 (as the model's own bf16 matmuls take them); int8 codes on a CPU with
// AVX-512 are widened to fp32 in registers and multiplied by the activations in fp32; other cases use
// a plain loop over 16 partial sums that the compiler vectorises. On a CPU with AMX, where the rows
// are several an expert, bf16 weights and int8 codes (with bf16 activations; widened to bf16 block by
// block, exact) go through tile multiplies instead (`grouped_amx`, below): the same exact products and
// fp32 sums, 16 or 32 rows a pass over the weights, so these kernels also serve prefill chunks and the
// step's linears at larger batches; `int4_bf16_pairs` multiplies by int4 codes dequantised to bf16.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd_cpu.h"

#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 16;  // output rows per task
constexpr int kRows = 4;        // activation rows per pass over the weights
constexpr int kOuts = 4;        // output rows per pass over the activations
constexpr int kAhead = 64;      // weight rows prefetched (into L2) ahead of the ones being read

using openk2_simd::widen;
inline float widen(int8_t v) { return static_cast<float>(v); }

// dot products of `no` consecutive weight rows (w, stride I) with `n` activation rows (no · n ≤ 16), 16
// partial sums each: out[o * n + k]
template <typename TW, typename TX>
inline void dots(const TW* w, int no, const TX* const* xs, int n, int64_t I, float* out) {
  for (int o = 0; o < no; ++o) {
    float acc[kRows][16] = {};
    const TW* wr = w + o * I;
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
      float wf[16];
      for (int j = 0; j < 16; ++j) wf[j] = widen(wr[i + j]);
      for (int k = 0; k < n; ++k)
        for (int j = 0; j < 16; ++j) acc[k][j] += wf[j] * widen(xs[k][i + j]);
    }
    for (int k = 0; k < n; ++k) {
      float total = 0.f;
      for (int j = 0; j < 16; ++j) total += acc[k][j];
      for (int64_t t = i; t < I; ++t) total += widen(wr[t]) * widen(xs[k][t]);
      out[o * n + k] = total;
    }
  }
}

#if defined(__AVX512F__)
// The vector paths keep NO × NR ≤ 16 accumulators in registers (of 32), enough independent chains to
// hide the multiply-add's latency; each weight load serves NR rows and each activation load NO outputs
// (at one activation row, 16 outputs a pass measured slower: 16 streams of weights at once).

using openk2_simd::sum16;

// the weights' rows: NO of them, kAhead rows ahead prefetched into L2 once per cache line
template <typename TW, int NO, int NR, typename Step>
inline void dots_vec(const TW* w, int64_t I, int64_t width, float* out, Step step) {
  static_assert(NO * NR <= 16, "one sum16 for all accumulators");
  __m512 acc[16];  // acc[o * NR + k]; the unused ones stay zero
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + width <= I; i += width) {
    if ((i * static_cast<int64_t>(sizeof(TW))) % 64 == 0)
      for (int o = 0; o < NO; ++o) _mm_prefetch(reinterpret_cast<const char*>(w + (o + kAhead) * I + i), _MM_HINT_T1);
    step(i, acc);
  }
  _mm512_storeu_ps(out, sum16(acc));
}

template <int NO, int NR>
inline void dots_int8(const int8_t* w, const float* const* xs, int64_t I, float* out) {
  dots_vec<int8_t, NO, NR>(w, I, 16, out, [&](int64_t i, __m512* acc) {
    __m512 xv[NR];
    for (int k = 0; k < NR; ++k) xv[k] = _mm512_loadu_ps(xs[k] + i);
    for (int o = 0; o < NO; ++o) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + o * I + i));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
      for (int k = 0; k < NR; ++k) acc[o * NR + k] = _mm512_fmadd_ps(wv, xv[k], acc[o * NR + k]);
    }
  });
  const int64_t done = I - I % 16;
  for (int o = 0; o < NO; ++o)
    for (int k = 0; k < NR; ++k)
      for (int64_t t = done; t < I; ++t) out[o * NR + k] += widen(w[o * I + t]) * xs[k][t];
}
#endif

#if defined(__AVX512BF16__)
template <int NO, int NR>
inline void dots_bf16(const c10::BFloat16* w, const c10::BFloat16* const* xs, int64_t I, float* out) {
  dots_vec<c10::BFloat16, NO, NR>(w, I, 32, out, [&](int64_t i, __m512* acc) {
    __m512bh xv[NR];
    for (int k = 0; k < NR; ++k) xv[k] = (__m512bh)_mm512_loadu_si512(xs[k] + i);
    for (int o = 0; o < NO; ++o) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + o * I + i);
      for (int k = 0; k < NR; ++k) acc[o * NR + k] = _mm512_dpbf16_ps(acc[o * NR + k], xv[k], wv);
    }
  });
  const int64_t done = I - I % 32;
  for (int o = 0; o < NO; ++o)
    for (int k = 0; k < NR; ++k)
      for (int64_t t = done; t < I; ++t) out[o * NR + k] += widen(w[o * I + t]) * widen(xs[k][t]);
}
#endif

// f(NO, NR) with the counts as compile-time constants (std::integral_constant), so that the
// accumulators stay in registers
template <typename F>
inline void with_counts(int no, int n, F f) {
  auto rows = [&](auto NO) {
    switch (n) {
      case 4: return f(NO, std::integral_constant<int, 4>{});
      case 3: return f(NO, std::integral_constant<int, 3>{});
      case 2: return f(NO, std::integral_constant<int, 2>{});
      default: return f(NO, std::integral_constant<int, 1>{});
    }
  };
  switch (no) {
    case 4: return rows(std::integral_constant<int, 4>{});
    case 3: return rows(std::integral_constant<int, 3>{});
    case 2: return rows(std::integral_constant<int, 2>{});
    default: return rows(std::integral_constant<int, 1>{});
  }
}

#if defined(__AVX512BF16__)
inline void dots(const c10::BFloat16* w, int no, const c10::BFloat16* const* xs, int n, int64_t I, float* out) {
  with_counts(no, n, [&](auto NO, auto NR) { dots_bf16<NO, NR>(w, xs, I, out); });
}
#endif

#if defined(__AVX512F__)
inline void dots(const int8_t* w, int no, const float* const* xs, int n, int64_t I, float* out) {
  with_counts(no, n, [&](auto NO, auto NR) { dots_int8<NO, NR>(w, xs, I, out); });
}
#endif

// a batch's rows grouped by the matrix idx[m] of the stack they chose (a counting sort, once per call):
// order[starts[e] .. starts[e + 1]) are the rows that chose e
struct ByExpert {
  std::vector<int64_t> starts, order;
  ByExpert(const int64_t* idx, int64_t M, int64_t E) : starts(E + 1, 0), order(M) {
    for (int64_t m = 0; m < M; ++m) ++starts[idx[m] + 1];
    for (int64_t e = 0; e < E; ++e) starts[e + 1] += starts[e];
    std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
    for (int64_t m = 0; m < M; ++m) order[fill[idx[m]]++] = m;
  }
  int64_t experts() const { return static_cast<int64_t>(starts.size()) - 1; }
  int64_t used() const {  // experts some row chose
    int64_t n = 0;
    for (int64_t e = 0; e < experts(); ++e) n += starts[e + 1] > starts[e];
    return n;
  }
};

// y[m] = (x[m] · w[idx[m]]ᵀ) (times scale[idx[m]] if scale): TS is the scale's type (float or bf16)
template <typename TW, typename TX, typename TS = float>
void grouped(const TX* x, const TW* w, const TS* scale, const ByExpert& by, float* y, int64_t O, int64_t I) {
  const std::vector<int64_t>& starts = by.starts;
  const std::vector<int64_t>& order = by.order;
  const int64_t E = by.experts(), blocks = (O + kBlock - 1) / kBlock;
  std::vector<int64_t> tasks;  // expert * blocks + block, for the experts some row chose
  for (int64_t e = 0; e < E; ++e)
    if (starts[e + 1] > starts[e])
      for (int64_t b = 0; b < blocks; ++b) tasks.push_back(e * blocks + b);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = tasks[t] / blocks, o0 = (tasks[t] % blocks) * kBlock, o1 = std::min(O, o0 + kBlock);
      for (int64_t r = starts[e]; r < starts[e + 1]; r += kRows) {
        const int n = static_cast<int>(std::min<int64_t>(kRows, starts[e + 1] - r));
        const TX* xs[kRows];
        for (int k = 0; k < n; ++k) xs[k] = x + order[r + k] * I;
        for (int64_t o = o0; o < o1;) {
          const int no = static_cast<int>(std::min<int64_t>(kOuts, o1 - o));
          float out[kOuts * kRows];
          dots(w + (e * O + o) * I, no, xs, n, I, out);
          for (int j = 0; j < no; ++j) {
            const float s = scale ? static_cast<float>(scale[e * O + o + j]) : 1.f;
            for (int k = 0; k < n; ++k) y[order[r + k] * O + o + j] = out[j * n + k] * s;
          }
          o += no;
        }
      }
    }
  });
}


#if defined(OPENK2_AMX)
// bf16 on a CPU with AMX. One tile multiply (`tdpbf16ps`) takes 16 weight rows × 32 inputs (an A tile,
// read in place from the stack with the row stride) times the same 32 inputs of up to 16 activation
// rows (a B tile: the rows' inputs in pairs, [I/2][16 rows][2], built per group of rows by the thread
// that uses it), summed in fp32 into 16 × 16 outputs (a C tile). Its cost does not grow with the rows,
// so one pass over an expert's weights serves 16 rows (or 32: two B tiles per A tile) where the vector
// path serves 4.
constexpr int kTile = 16;   // activation rows per B tile, weight rows per A tile
constexpr int kTileK = 32;  // inputs per tile multiply (64 bytes of bf16)

using openk2_simd::amx_configure;  // tiles here: 0-3 C, 4-5 B, 6-7 A; with one B tile, 5 is a third A and 6 a fourth
using openk2_simd::amx_wanted;

// r[i][j] -> r[j][i] for 16 × 16 32-bit words: pairs of rows interleaved, then pairs of pairs, then
// 128-bit lanes exchanged twice
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int a = 0; a < 8; ++a) {
    t[2 * a] = _mm512_unpacklo_epi32(r[2 * a], r[2 * a + 1]);
    t[2 * a + 1] = _mm512_unpackhi_epi32(r[2 * a], r[2 * a + 1]);
  }
  __m512i s[16];  // s[4b + q], lane L: column 4L + q of rows 4b .. 4b + 3
  for (int b = 0; b < 4; ++b) {
    s[4 * b] = _mm512_unpacklo_epi64(t[4 * b], t[4 * b + 2]);
    s[4 * b + 1] = _mm512_unpackhi_epi64(t[4 * b], t[4 * b + 2]);
    s[4 * b + 2] = _mm512_unpacklo_epi64(t[4 * b + 1], t[4 * b + 3]);
    s[4 * b + 3] = _mm512_unpackhi_epi64(t[4 * b + 1], t[4 * b + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i v_lo = _mm512_shuffle_i32x4(s[q], s[4 + q], 0x88), v_hi = _mm512_shuffle_i32x4(s[q], s[4 + q], 0xdd);
    const __m512i w_lo = _mm512_shuffle_i32x4(s[8 + q], s[12 + q], 0x88);
    const __m512i w_hi = _mm512_shuffle_i32x4(s[8 + q], s[12 + q], 0xdd);
    r[q] = _mm512_shuffle_i32x4(v_lo, w_lo, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(v_hi, w_hi, 0x88);
    r[8 + q] = _mm512_shuffle_i32x4(v_lo, w_lo, 0xdd);
    r[12 + q] = _mm512_shuffle_i32x4(v_hi, w_hi, 0xdd);
  }
}

// B tiles of the rows x[rows[0 .. n)] (n ≤ 16): b[p * 16 + r] holds inputs 2p, 2p + 1 of row r, zero
// past n; 16 pairs of the 16 rows at a time, transposed in registers
inline void amx_pairs(const c10::BFloat16* x, const int64_t* rows, int n, int64_t I, uint32_t* b) {
  const uint32_t* src[kTile];
  for (int r = 0; r < n; ++r) src[r] = reinterpret_cast<const uint32_t*>(x + rows[r] * I);
  __m512i v[kTile];
  for (int64_t p = 0; p < I / 2; p += kTile) {
    for (int r = 0; r < kTile; ++r) v[r] = r < n ? _mm512_loadu_si512(src[r] + p) : _mm512_setzero_si512();
    transpose16(v);
    for (int c = 0; c < kTile; ++c) _mm512_storeu_si512(b + (p + c) * kTile, v[c]);
  }
}

// the outputs of a C tile c_tile [16 weight rows][16 rows] for its rows k < n: y_rows[k][0 .. 16), times
// the weight rows' scales if any (int8 codes: the scale after the sum)
template <typename TS>
inline void amx_scatter(const float* c_tile, float* const* y_rows, int n, const TS* scale) {
  __m512i v[kTile];
  for (int i = 0; i < kTile; ++i) v[i] = _mm512_load_si512(c_tile + i * kTile);
  transpose16(v);
  if (scale) {
    alignas(64) float s[kTile];
    for (int i = 0; i < kTile; ++i) s[i] = static_cast<float>(scale[i]);
    const __m512 sv = _mm512_load_ps(s);
    for (int k = 0; k < n; ++k) _mm512_storeu_ps(y_rows[k], _mm512_mul_ps(_mm512_castsi512_ps(v[k]), sv));
  } else {
    for (int k = 0; k < n; ++k) _mm512_storeu_si512(y_rows[k], v[k]);
  }
}

// int4 codes in the decode layout (a row: groups of I/G inputs, byte j of a group holding input j in its
// low nibble and input j + I/2G in its high one) as bf16 weights (code − 8) · scale, in fp32 rounded once
// (as `unpack_halves`); I/G a multiple of 32
template <typename TS>
inline void int4_to_bf16(const uint8_t* codes, const TS* scale, int64_t I, int64_t G, c10::BFloat16* out) {
  const int64_t half = I / G / 2;
  const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  for (int64_t g = 0; g < G; ++g, codes += half, out += 2 * half) {
    const __m512 s = _mm512_set1_ps(static_cast<float>(scale[g]));
    for (int64_t j = 0; j < half; j += 16) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j)));
      const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, low), eight)), s);
      const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight)), s);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(lo));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + half + j), (__m256i)_mm512_cvtneps_pbh(hi));
    }
  }
}

// int8 codes as bf16 (exact: every int8 is a bf16), `count` a multiple of 32
inline void codes_to_bf16(const int8_t* codes, int64_t count, c10::BFloat16* out) {
  for (int64_t i = 0; i < count; i += 32) {
    const auto* at = reinterpret_cast<const __m128i*>(codes + i);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(at)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(at + 1)));
    _mm512_storeu_si512(out + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
}

// C tiles g * NC + c (g < NG groups of rows, c < NC blocks of 16 weight rows from w) over all I, into
// c_out [NG * NC][16 weight rows][16 rows]
template <int NG, int NC>
inline void amx_block(const c10::BFloat16* w, const uint32_t* b0, const uint32_t* b1, int64_t I, float* c_out,
                      const char* ahead, int64_t ahead_lines) {
  static_assert(NG * NC <= 4 && (NG == 1 || NC <= 2), "four C tiles; with two B tiles, two A tiles");
  _tile_zero(0);
  if (NG * NC > 1) _tile_zero(1);
  if (NG * NC > 2) _tile_zero(2);
  if (NG * NC > 3) _tile_zero(3);
  const int64_t stride = I * static_cast<int64_t>(sizeof(c10::BFloat16));
  // the next task's weights, `ahead_lines` cache lines from `ahead`, asked into L2 a share per step: tile
  // loads of 16 rows at a stride keep few reads in flight, and alone they read at about half the bandwidth
  const int64_t share = (ahead_lines + I / kTileK - 1) / (I / kTileK);
  for (int64_t k = 0; k < I; k += kTileK) {
    for (int64_t l = (k / kTileK) * share, end = std::min(ahead_lines, l + share); l < end; ++l)
      _mm_prefetch(ahead + l * 64, _MM_HINT_T1);
    _tile_loadd(4, b0 + (k / 2) * kTile, 64);
    if (NG == 2) _tile_loadd(5, b1 + (k / 2) * kTile, 64);
    _tile_loadd(6, w + k, stride);
    _tile_dpbf16ps(0, 6, 4);
    if (NG == 2 && NC == 1) _tile_dpbf16ps(1, 6, 5);  // C tile g * NC + c
    if (NG == 2 && NC == 2) _tile_dpbf16ps(2, 6, 5);
    if (NC > 1) {
      _tile_loadd(7, w + kTile * I + k, stride);
      _tile_dpbf16ps(1, 7, 4);
      if (NG == 2) _tile_dpbf16ps(3, 7, 5);
    }
    if (NG == 1 && NC > 2) {
      _tile_loadd(5, w + 2 * kTile * I + k, stride);
      _tile_dpbf16ps(2, 5, 4);
    }
    if (NG == 1 && NC > 3) {
      _tile_loadd(6, w + 3 * kTile * I + k, stride);
      _tile_dpbf16ps(3, 6, 4);
    }
  }
  constexpr int kC = kTile * kTile;
  _tile_stored(0, c_out, 64);
  if (NG * NC > 1) _tile_stored(1, c_out + kC, 64);
  if (NG * NC > 2) _tile_stored(2, c_out + 2 * kC, 64);
  if (NG * NC > 3) _tile_stored(3, c_out + 3 * kC, 64);
}

// `grouped` through AMX (the shapes `amx_serves` takes); each task a block of an expert's weight rows
// times all of its rows. block(e, o0, rows, scratch): the bf16 rows [o0, o0 + rows) of expert e's
// weights, read in place (bf16) or written into `scratch` (room for 64 rows, where `widens`: int8 codes
// widened, int4 dequantised) while it stays in cache; scale: per weight row, applied as the outputs are
// written (int8), or null; raw, row_bytes: the stack as stored (bf16, int8 or int4 codes), row (e, o) at
// raw + (e * O + o) * row_bytes, whose next block each task asks into cache while it multiplies its own
template <typename Block, typename TS = float>
void grouped_amx(const c10::BFloat16* x, Block block, bool widens, const TS* scale, const ByExpert& by, float* y,
                 int64_t O, int64_t I, const void* raw, int64_t row_bytes) {
  const std::vector<int64_t>& starts = by.starts;
  const std::vector<int64_t>& order = by.order;
  const int64_t E = by.experts();
  // tasks: an expert's block of 64 weight rows (32 where it has more than 16 rows: two B tiles a pass),
  // times all of its rows, 16 or 32 a pass while the block stays in cache
  struct Task { int64_t e, o0; int span; };
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e) {
    if (starts[e + 1] == starts[e]) continue;
    const int span = starts[e + 1] - starts[e] > kTile ? 2 * kTile : 4 * kTile;
    for (int64_t o0 = 0; o0 < O; o0 += span) tasks.push_back({e, o0, span});
  }
  // B tiles, one per group of 16 rows, are built by each thread for its own tasks' expert, into a buffer
  // of its own: an expert's tasks are consecutive, so a thread builds each of its experts' tiles once (the
  // expert its range starts in is built by both). Built once for all threads before the tasks, half of them
  // were read from the other core's cache: a 256 × 512 linear at 32 rows took 28 µs, now 17; a 32-row
  // decode step 2-4 % less; a linear's 1,024 rows, built by both threads, no slower
  const int64_t tile_words = (I / 2) * kTile;
  int64_t most_rows = 0;
  for (int64_t e = 0; e < E; ++e) most_rows = std::max(most_rows, starts[e + 1] - starts[e]);
  const int64_t most_groups = (most_rows + kTile - 1) / kTile;
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    amx_configure();
    alignas(64) float c[4 * kTile * kTile];
    std::vector<c10::BFloat16> scratch(widens ? 4 * kTile * I : 0);
    std::unique_ptr<uint32_t[]> pairs(new uint32_t[most_groups * tile_words]);  // each word written before use
    int64_t built = -1;  // the expert whose B tiles `pairs` holds
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      if (task.e != built) {
        for (int64_t r = starts[task.e], g = 0; r < starts[task.e + 1]; r += kTile, ++g)
          amx_pairs(x, order.data() + r, static_cast<int>(std::min<int64_t>(kTile, starts[task.e + 1] - r)), I,
                    pairs.get() + g * tile_words);
        built = task.e;
      }
      const int nc = static_cast<int>(std::min<int64_t>(task.span, O - task.o0) / kTile);
      const c10::BFloat16* wb = block(task.e, task.o0, nc * kTile, scratch.data());
      const char* ahead = nullptr;  // the next task's block, asked for during this one's first pass
      int64_t ahead_lines = 0;
      if (t + 1 < end) {
        const Task& next = tasks[t + 1];
        ahead = static_cast<const char*>(raw) + (next.e * O + next.o0) * row_bytes;
        ahead_lines = (std::min<int64_t>(next.span, O - next.o0) * row_bytes + 63) / 64;
      }
      for (int64_t r = starts[task.e], g = 0; r < starts[task.e + 1]; r += 2 * kTile, g += 2) {
        const int64_t rows = std::min<int64_t>(2 * kTile, starts[task.e + 1] - r);
        const uint32_t* b0 = pairs.get() + g * tile_words;
        const uint32_t* b1 = b0 + tile_words;
        if (rows > kTile) {
          if (nc == 2) amx_block<2, 2>(wb, b0, b1, I, c, ahead, ahead_lines);
          else amx_block<2, 1>(wb, b0, b1, I, c, ahead, ahead_lines);
        } else {
          switch (nc) {
            case 4: amx_block<1, 4>(wb, b0, b1, I, c, ahead, ahead_lines); break;
            case 3: amx_block<1, 3>(wb, b0, b1, I, c, ahead, ahead_lines); break;
            case 2: amx_block<1, 2>(wb, b0, b1, I, c, ahead, ahead_lines); break;
            default: amx_block<1, 1>(wb, b0, b1, I, c, ahead, ahead_lines);
          }
        }
        ahead_lines = 0;
        for (int h = 0; h * kTile < rows; ++h) {  // each group's tiles, h * NC + j
          const int n = static_cast<int>(std::min<int64_t>(kTile, rows - h * kTile));
          float* y_rows[kTile];
          for (int j = 0; j < nc; ++j) {
            for (int k = 0; k < n; ++k) y_rows[k] = y + order[r + h * kTile + k] * O + task.o0 + j * kTile;
            const TS* sj = scale ? scale + task.e * O + task.o0 + j * kTile : nullptr;
            amx_scatter(c + (h * nc + j) * kTile * kTile, y_rows, n, sj);
          }
        }
      }
    }
    _tile_release();
  });
}

// the AMX path takes this call: bf16 weights of whole tiles, enough rows an expert to pay for building
// B tiles (`kAmxRows`), AMX permitted and not turned off
constexpr int64_t kAmxRows = 4;
bool amx_serves(int64_t M, int64_t used, int64_t O, int64_t I) {
  return O % kTile == 0 && I % kTileK == 0 && M >= kAmxRows * used && openk2_simd::amx_on();
}
#endif

// idx as int64, checked against x [M, I] and a stack w [E, O, I] (or, `packed`, [E, O, I/2]: int4 codes)
at::Tensor checked_idx(const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx, const char* op,
                       bool packed = false) {
  TORCH_CHECK(w.dim() == 3 && x.dim() == 2 && idx.dim() == 1, op, ": x [M, I], w [E, O, I], idx [M]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && idx.device().is_cpu(), op, ": CPU tensors");
  TORCH_CHECK(w.size(2) * (packed ? 2 : 1) == x.size(1) && idx.size(0) == x.size(0), op, ": shapes do not agree");
  at::Tensor ic = idx.to(at::kLong).contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t m = 0; m < x.size(0); ++m)
    TORCH_CHECK(ip[m] >= 0 && ip[m] < w.size(0), op, ": idx outside [0, ", w.size(0), ")");
  return ic;
}

// x [M, I] as fp32: its own data if it is fp32 and contiguous, else widened into `buf` here (bf16 read in
// place, any strides: for a few rows this costs less than a tensor op's dispatch, which costs as much as
// a small linear's product; other dtypes converted by torch)
const float* widened(const at::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x.data_ptr<float>();
  const int64_t M = x.size(0), I = x.size(1);
  buf.resize(M * I);
  if (x.scalar_type() == at::kBFloat16) {
    const auto* p = x.data_ptr<c10::BFloat16>();
    const int64_t sm = x.stride(0), si = x.stride(1);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < I; ++i) buf[m * I + i] = static_cast<float>(p[m * sm + i * si]);
  } else {
    const at::Tensor xc = x.to(at::kFloat).contiguous();
    std::memcpy(buf.data(), xc.data_ptr<float>(), M * I * sizeof(float));
  }
  return buf.data();
}

}  // namespace

// x [M, I] (any float dtype), w [E, O, I] bf16 or fp32, idx [M] in [0, E) -> [M, O] fp32
at::Tensor float_pairs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat, "float_pairs: bf16 or fp32 weights");
  const at::Tensor ic = checked_idx(x, w, idx, "float_pairs");
  const int64_t M = x.size(0), I = x.size(1), E = w.size(0), O = w.size(1);
  const at::Tensor wc = w.contiguous(), xc = x.to(w.scalar_type()).contiguous();
  at::Tensor y = at::empty({M, O}, x.options().dtype(at::kFloat));
  const float* none = nullptr;
  const ByExpert by(ic.data_ptr<int64_t>(), M, E);
#if defined(OPENK2_AMX)
  if (w.scalar_type() == at::kBFloat16 && amx_serves(M, by.used(), O, I)) {
    const c10::BFloat16* wp = wc.data_ptr<c10::BFloat16>();
    auto in_place = [&](int64_t e, int64_t o0, int, c10::BFloat16*) { return wp + (e * O + o0) * I; };
    grouped_amx(xc.data_ptr<c10::BFloat16>(), in_place, false, none, by, y.data_ptr<float>(), O, I, wp, I * 2);
    return y;
  }
#endif
  if (w.scalar_type() == at::kBFloat16) {
    grouped(xc.data_ptr<c10::BFloat16>(), wc.data_ptr<c10::BFloat16>(), none, by, y.data_ptr<float>(), O, I);
  } else {
    grouped(xc.data_ptr<float>(), wc.data_ptr<float>(), none, by, y.data_ptr<float>(), O, I);
  }
  return y;
}

// x [M, I] (any float dtype), w [E, O, I] int8, scale [E, O] (fp32, bf16 or fp16), idx [M] -> [M, O] fp32
at::Tensor int8_pairs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& idx) {
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_pairs: int8 codes");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == w.size(0) && scale.size(1) == w.size(1),
              "int8_pairs: scale [E, O]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16 ||
              scale.scalar_type() == at::kHalf, "int8_pairs: fp32, bf16 or fp16 scales");
  TORCH_CHECK(scale.device().is_cpu(), "int8_pairs: CPU tensors");
  const at::Tensor ic = checked_idx(x, w, idx, "int8_pairs");
  const int64_t M = x.size(0), I = x.size(1), E = w.size(0), O = w.size(1);
  std::vector<float> xf;
  const at::Tensor wc = w.contiguous(), sc = scale.contiguous();
  at::Tensor y = at::empty({M, O}, x.options().dtype(at::kFloat));
  const int8_t* wp = wc.data_ptr<int8_t>();
  const ByExpert by(ic.data_ptr<int64_t>(), M, E);
#if defined(OPENK2_AMX)
  // bf16 activations through tiles: their exact products with the codes, as the vector path's fp32
  if (x.scalar_type() == at::kBFloat16 && amx_serves(M, by.used(), O, I)) {
    const at::Tensor xc = x.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sc.scalar_type(), "int8_pairs", [&] {
      auto widened = [&](int64_t e, int64_t o0, int rows, c10::BFloat16* scratch) {
        codes_to_bf16(wp + (e * O + o0) * I, rows * I, scratch);
        return static_cast<const c10::BFloat16*>(scratch);
      };
      grouped_amx(xc.data_ptr<c10::BFloat16>(), widened, true, sc.data_ptr<scalar_t>(), by, y.data_ptr<float>(), O, I,
                  wp, I);
    });
    return y;
  }
#endif
  const float* xp = widened(x, xf);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sc.scalar_type(), "int8_pairs", [&] {
    grouped(xp, wp, sc.data_ptr<scalar_t>(), by, y.data_ptr<float>(), O, I);
  });
  return y;
}

// x [M, I] (any float dtype, rounded to bf16), codes [E, O, I/2] uint8 in the int4 decode layout, scale
// [E, O, G] (fp32, bf16 or fp16), idx [M] -> [M, O] fp32: row m times expert idx[m]'s weights dequantised
// to bf16 (`unpack_halves`: what int4 experts and linears multiply by for many rows), through AMX tiles
// only (`int4_pairs` reads the codes exactly, for few rows)
at::Tensor int4_bf16_pairs(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                           const at::Tensor& idx) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3, "int4_bf16_pairs: uint8 codes [E, O, I/2]");
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == codes.size(0) && scale.size(1) == codes.size(1),
              "int4_bf16_pairs: scale [E, O, G]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16 ||
              scale.scalar_type() == at::kHalf, "int4_bf16_pairs: fp32, bf16 or fp16 scales");
  TORCH_CHECK(scale.device().is_cpu(), "int4_bf16_pairs: CPU tensors");
  const at::Tensor ic = checked_idx(x, codes, idx, "int4_bf16_pairs", /*packed=*/true);
  const int64_t M = x.size(0), I = x.size(1), E = codes.size(0), O = codes.size(1), G = scale.size(2);
  TORCH_CHECK(G > 0 && I % G == 0 && (I / G) % 32 == 0, "int4_bf16_pairs: groups of a multiple of 32 inputs");
#if defined(OPENK2_AMX)
  TORCH_CHECK(amx_serves(std::max<int64_t>(M, 1), 0, O, I), "int4_bf16_pairs: needs AMX tiles (set_amx) and "
              "outputs in whole tiles of 16");
  const at::Tensor xc = x.to(at::kBFloat16).contiguous(), cc = codes.contiguous(), sc = scale.contiguous();
  const ByExpert by(ic.data_ptr<int64_t>(), M, E);
  at::Tensor y = at::empty({M, O}, x.options().dtype(at::kFloat));
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sc.scalar_type(), "int4_bf16_pairs", [&] {
    const scalar_t* sp = sc.data_ptr<scalar_t>();
    auto dequantised = [&](int64_t e, int64_t o0, int rows, c10::BFloat16* scratch) {
      for (int r = 0; r < rows; ++r)
        int4_to_bf16(cp + ((e * O + o0 + r) * I) / 2, sp + (e * O + o0 + r) * G, I, G, scratch + r * I);
      return static_cast<const c10::BFloat16*>(scratch);
    };
    const float* no_scale = nullptr;
    grouped_amx(xc.data_ptr<c10::BFloat16>(), dequantised, true, no_scale, by, y.data_ptr<float>(), O, I, cp, I / 2);
  });
  return y;
#else
  TORCH_CHECK(false, "int4_bf16_pairs: needs AMX tiles, which this build has not");
  return at::Tensor();
#endif
}

// whether bf16 stacks may go through AMX tiles (where the CPU has them and Linux permits them): `on`
// applied, the answer whether they will; off, they take the vector path (tests compare the two)
bool set_amx(bool on) {
#if defined(OPENK2_AMX)
  amx_wanted.store(on);
  return openk2_simd::amx_on();
#else
  (void)on;
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(openk2, m) {
  m.def("set_amx(bool on) -> bool", &set_amx);
  m.def("float_pairs(Tensor x, Tensor w, Tensor idx) -> Tensor");
  m.def("int8_pairs(Tensor x, Tensor w, Tensor scale, Tensor idx) -> Tensor");
  m.def("int4_bf16_pairs(Tensor x, Tensor codes, Tensor scale, Tensor idx) -> Tensor");
}

TORCH_LIBRARY_IMPL(openk2, CPU, m) {
  m.impl("float_pairs", &float_pairs);
  m.impl("int8_pairs", &int8_pairs);
  m.impl("int4_bf16_pairs", &int4_bf16_pairs);
}
