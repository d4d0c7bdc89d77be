// Float experts for the decode step, grouped: row m of x times matrix idx[m] of a stack w [E, O, I]
// (bf16 or fp32; fp32 accumulation), each chosen matrix read once for all the rows that chose it.
//
// A batch of decode rows chooses few experts per row but, together, many rows per expert (32 rows ×
// 8 of 64: ~4 rows an expert). The rows are grouped by expert (a counting sort), and the work splits
// into (expert, block of output rows) tasks across torch's intra-op threads; within a task a few
// weight rows are loaded once per few activation rows and stay in L1 for the next few. bf16
// weights on a CPU with AVX512-BF16 multiply by `vdpbf16ps` (exact bf16 products, fp32 sums) with the
// activations rounded to bf16 (as the model's own bf16 matmuls take them); other cases use a plain
// loop over 16 partial sums that the compiler vectorises.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 16;  // output rows per task
constexpr int kRows = 4;        // activation rows per pass over the weights
constexpr int kOuts = 4;        // output rows per pass over the activations
constexpr int kAhead = 64;      // weight rows prefetched (into L2) ahead of the ones being read

inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen(float v) { return v; }

// dot products of up to kOuts consecutive weight rows (w, stride I) with up to kRows activation rows,
// 16 partial sums each: out[o * kRows + k]
template <typename T>
inline void dots(const T* w, int no, const T* const* xs, int n, int64_t I, float* out) {
  for (int o = 0; o < no; ++o) {
    float acc[kRows][16] = {};
    const T* wr = w + o * I;
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
      out[o * kRows + k] = total;
    }
  }
}

#if defined(__AVX512BF16__)
// kOuts × kRows accumulators in registers (16 of 32), enough independent chains to hide vdpbf16ps's
// latency; each weight load serves kRows rows and each activation load kOuts outputs
// the 16 sums of 16 vectors at once, lane j holding the sum of v[j]: pairs of vectors, then pairs of
// pairs, interleaved and added (45 instructions where 16 separate reductions take ~130)
inline __m512 sum16(const __m512* v) {
  __m512 s1[8], s2[4];
  for (int p = 0; p < 8; ++p)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s1[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
  for (int q = 0; q < 4; ++q) {  // per 128-bit lane: the lane's partial sums of v[4q .. 4q + 3]
    const __m512d c = _mm512_castps_pd(s1[2 * q]), d = _mm512_castps_pd(s1[2 * q + 1]);
    s2[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88), _mm512_shuffle_f32x4(s2[0], s2[1], 0xdd));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x88), _mm512_shuffle_f32x4(s2[2], s2[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xdd));
}

template <int NO, int NR>
inline void dots_bf16(const c10::BFloat16* w, const c10::BFloat16* const* xs, int64_t I, float* out) {
  static_assert(kOuts * kRows == 16, "one sum16 for all accumulators");
  __m512 acc[kOuts * kRows];  // acc[o * kRows + k]; the unused ones stay zero
  for (int j = 0; j < kOuts * kRows; ++j) acc[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= I; i += 32) {
    __m512bh xv[NR];
    for (int k = 0; k < NR; ++k) xv[k] = (__m512bh)_mm512_loadu_si512(xs[k] + i);
    for (int o = 0; o < NO; ++o) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (o + kAhead) * I + i), _MM_HINT_T1);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + o * I + i);
      for (int k = 0; k < NR; ++k) acc[o * kRows + k] = _mm512_dpbf16_ps(acc[o * kRows + k], xv[k], wv);
    }
  }
  _mm512_storeu_ps(out, sum16(acc));
  for (int o = 0; o < NO; ++o)
    for (int k = 0; k < NR; ++k)
      for (int64_t t = i; t < I; ++t) out[o * kRows + k] += widen(w[o * I + t]) * widen(xs[k][t]);
}

template <int NO>
inline void dots_bf16(const c10::BFloat16* w, const c10::BFloat16* const* xs, int n, int64_t I, float* out) {
  switch (n) {  // the counts as template arguments: the accumulators stay in registers
    case 4: return dots_bf16<NO, 4>(w, xs, I, out);
    case 3: return dots_bf16<NO, 3>(w, xs, I, out);
    case 2: return dots_bf16<NO, 2>(w, xs, I, out);
    default: return dots_bf16<NO, 1>(w, xs, I, out);
  }
}

inline void dots(const c10::BFloat16* w, int no, const c10::BFloat16* const* xs, int n, int64_t I, float* out) {
  switch (no) {
    case 4: return dots_bf16<4>(w, xs, n, I, out);
    case 3: return dots_bf16<3>(w, xs, n, I, out);
    case 2: return dots_bf16<2>(w, xs, n, I, out);
    default: return dots_bf16<1>(w, xs, n, I, out);
  }
}
#endif

template <typename T>
void grouped(const T* x, const T* w, const int64_t* idx, float* y, int64_t M, int64_t E, int64_t O, int64_t I) {
  // rows grouped by expert: order[starts[e] .. starts[e + 1]) are the rows that chose e
  std::vector<int64_t> starts(E + 1, 0), order(M);
  for (int64_t m = 0; m < M; ++m) ++starts[idx[m] + 1];
  for (int64_t e = 0; e < E; ++e) starts[e + 1] += starts[e];
  std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
  for (int64_t m = 0; m < M; ++m) order[fill[idx[m]]++] = m;
  const int64_t blocks = (O + kBlock - 1) / kBlock;
  std::vector<int64_t> tasks;  // expert * blocks + block, for the experts some row chose
  for (int64_t e = 0; e < E; ++e)
    if (starts[e + 1] > starts[e])
      for (int64_t b = 0; b < blocks; ++b) tasks.push_back(e * blocks + b);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = tasks[t] / blocks, o0 = (tasks[t] % blocks) * kBlock, o1 = std::min(O, o0 + kBlock);
      for (int64_t r = starts[e]; r < starts[e + 1]; r += kRows) {
        const int n = static_cast<int>(std::min<int64_t>(kRows, starts[e + 1] - r));
        const T* xs[kRows];
        for (int k = 0; k < n; ++k) xs[k] = x + order[r + k] * I;
        for (int64_t o = o0; o < o1; o += kOuts) {
          const int no = static_cast<int>(std::min<int64_t>(kOuts, o1 - o));
          float out[kOuts * kRows];
          dots(w + (e * O + o) * I, no, xs, n, I, out);
          for (int j = 0; j < no; ++j)
            for (int k = 0; k < n; ++k) y[order[r + k] * O + o + j] = out[j * kRows + k];
        }
      }
    }
  });
}

}  // namespace

// x [M, I] (any float dtype), w [E, O, I] bf16 or fp32, idx [M] in [0, E) -> [M, O] fp32
at::Tensor float_pairs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx) {
  TORCH_CHECK(w.dim() == 3 && x.dim() == 2 && idx.dim() == 1, "float_pairs: x [M, I], w [E, O, I], idx [M]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && idx.device().is_cpu(), "float_pairs: CPU tensors");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat, "float_pairs: bf16 or fp32 weights");
  const int64_t M = x.size(0), I = x.size(1), E = w.size(0), O = w.size(1);
  TORCH_CHECK(w.size(2) == I && idx.size(0) == M, "float_pairs: shapes do not agree");
  const at::Tensor ic = idx.to(at::kLong).contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(ip[m] >= 0 && ip[m] < E, "float_pairs: idx outside [0, ", E, ")");
  const at::Tensor wc = w.contiguous(), xc = x.to(w.scalar_type()).contiguous();
  at::Tensor y = at::empty({M, O}, x.options().dtype(at::kFloat));
  if (w.scalar_type() == at::kBFloat16) {
    grouped(xc.data_ptr<c10::BFloat16>(), wc.data_ptr<c10::BFloat16>(), ip, y.data_ptr<float>(), M, E, O, I);
  } else {
    grouped(xc.data_ptr<float>(), wc.data_ptr<float>(), ip, y.data_ptr<float>(), M, E, O, I);
  }
  return y;
}

TORCH_LIBRARY_FRAGMENT(openk2, m) {
  m.def("float_pairs(Tensor x, Tensor w, Tensor idx) -> Tensor");
}

TORCH_LIBRARY_IMPL(openk2, CPU, m) {
  m.impl("float_pairs", &float_pairs);
}
