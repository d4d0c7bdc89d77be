// The absorbed MLA decode step's attention over the latent pool, for many rows at once
// (`openk2.model.attention.MLA.decode` past small batches; its reference is the library-matmul form
// beside it, tests/test_kernels.py).
//
// latent_attention(q [N, H, L], pool [Z, L], slots [N, T], pos [N], latent C, scale) -> [N, H, C] fp32:
// row n attends to its positions 0 .. pos[n], position t held in pool row slots[n, t]; the scores are
// q · row (all L channels: the latent and the rotary key) · scale in fp32, softmaxed over the visible
// positions, and the output the probabilities times the rows' first C channels. Each pool row is read
// once per pass for all H heads (a row of k2-small is 320 bytes, the whole of a 32-row step's context
// ~0.6 MB), where library matmuls on such small shapes cost ~50-80 µs a call (four a layer) and the
// compiler's fused loops recompute the scores for each of the softmax's passes.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;  // partial maxima and sums the softmax keeps (the compiler makes them one vector)

using openk2_simd::widen;

using openk2_simd::exp_nonpositive;

// the scores of kHeads heads (zero-padded queries past H) with kRows cached rows: kt holds the rows
// transposed (kt[i * kRows + r] = row r's channel i), so each step multiplies one channel of the queries by
// that channel of all kRows rows, with no horizontal sums: acc[h][r] = Σ_i q[h][i] · kt[i][r]
constexpr int kRows = 16, kHeads = 8;

inline void score_block(const float* qf, const float* kt, int64_t L, float (*acc)[kRows]) {
#if defined(__AVX512F__)
  __m512 a[kHeads];  // one register a head: its scores with the kRows rows
  for (int h = 0; h < kHeads; ++h) a[h] = _mm512_setzero_ps();
  for (int64_t i = 0; i < L; ++i) {
    const __m512 k = _mm512_loadu_ps(kt + i * kRows);
    for (int h = 0; h < kHeads; ++h) a[h] = _mm512_fmadd_ps(_mm512_set1_ps(qf[h * L + i]), k, a[h]);
  }
  for (int h = 0; h < kHeads; ++h) _mm512_storeu_ps(acc[h], a[h]);
#else
  for (int h = 0; h < kHeads; ++h)
    for (int r = 0; r < kRows; ++r) acc[h][r] = 0.f;
  for (int64_t i = 0; i < L; ++i)
    for (int h = 0; h < kHeads; ++h)
      for (int r = 0; r < kRows; ++r) acc[h][r] += qf[h * L + i] * kt[i * kRows + r];
#endif
}

#if defined(__AVX512BF16__)
// bf16 queries and rows, L a multiple of 32: the scores of kHeads heads (qb [kHeads][L], zero past H)
// with two rows at once by `vdpbf16ps` (exact bf16 products, fp32 sums), the 16 sums reduced together:
// out[r * kHeads + h]
inline void score_pair(const c10::BFloat16* qb, const c10::BFloat16* r0, const c10::BFloat16* r1, int64_t L,
                       float* out) {
  static_assert(2 * kHeads == 16, "one sum16 for two rows");
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < L; i += 32) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(r0 + i), k1 = (__m512bh)_mm512_loadu_si512(r1 + i);
    for (int h = 0; h < kHeads; ++h) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + h * L + i);
      acc[h] = _mm512_dpbf16_ps(acc[h], qv, k0);
      acc[kHeads + h] = _mm512_dpbf16_ps(acc[kHeads + h], qv, k1);
    }
  }
  _mm512_storeu_ps(out, openk2_simd::sum16(acc));
}
#endif

// the scaled scores [H][visible] of one row's queries q [H][L] with its visible cached rows
template <typename T>
void score_rows(const T* q, const T* pool, const int64_t* slot, int64_t visible, int64_t H, int64_t L, float scale,
                std::vector<float>& qf, std::vector<float>& kt, std::vector<T>& qb, float* scores) {
  const int64_t Hp = (H + kHeads - 1) / kHeads * kHeads;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (L % 32 == 0) {
      qb.assign(Hp * L, T(0.f));
      std::copy(q, q + H * L, qb.begin());
      alignas(64) float out[2 * kHeads];
      for (int64_t t = 0; t < visible; t += 2) {
        const T* r0 = pool + slot[t] * L;
        const T* r1 = t + 1 < visible ? pool + slot[t + 1] * L : r0;  // past the end: a copy, not kept
        for (int64_t h0 = 0; h0 < H; h0 += kHeads) {
          score_pair(qb.data() + h0 * L, r0, r1, L, out);
          for (int r = 0; r < 2 && t + r < visible; ++r)
            for (int h = 0; h < kHeads && h0 + h < H; ++h) scores[(h0 + h) * visible + t + r] = out[r * kHeads + h] * scale;
        }
      }
      return;
    }
  }
#endif
  float acc[kHeads][kRows];
  std::fill(qf.begin(), qf.end(), 0.f);
  for (int64_t i = 0; i < H * L; ++i) qf[i] = widen(q[i]);
  for (int64_t t0 = 0; t0 < visible; t0 += kRows) {
    const int nt = static_cast<int>(std::min<int64_t>(kRows, visible - t0));
    for (int r = 0; r < kRows; ++r) {
      const T* src = pool + slot[t0 + std::min(r, nt - 1)] * L;  // past nt: a copy, never read back
      for (int64_t i = 0; i < L; ++i) kt[i * kRows + r] = widen(src[i]);
    }
    for (int64_t h0 = 0; h0 < H; h0 += kHeads) {
      score_block(qf.data() + h0 * L, kt.data(), L, acc);
      for (int h = 0; h < kHeads && h0 + h < H; ++h)
        for (int r = 0; r < nt; ++r) scores[(h0 + h) * visible + t0 + r] = acc[h][r] * scale;
    }
  }
}

// o[0 .. C) += Σ_r p[r] · rows[r][0 .. C) for nt rows (fp32): the outputs kept in registers, 128 at a time,
// across the rows (where C is a multiple of 16)
inline void weigh_rows(const float* p, const float* rows, int nt, int64_t C, float* o) {
  int64_t c0 = 0;
#if defined(__AVX512F__)
  constexpr int kVec = 8;  // registers of outputs a pass
  for (; c0 + 16 <= C; c0 += 16 * kVec) {
    const int nv = static_cast<int>(std::min<int64_t>(kVec, (C - c0) / 16));
    __m512 acc[kVec];
    for (int k = 0; k < nv; ++k) acc[k] = _mm512_loadu_ps(o + c0 + 16 * k);
    for (int r = 0; r < nt; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r]);
      for (int k = 0; k < nv; ++k) acc[k] = _mm512_fmadd_ps(pr, _mm512_loadu_ps(rows + r * C + c0 + 16 * k), acc[k]);
    }
    for (int k = 0; k < nv; ++k) _mm512_storeu_ps(o + c0 + 16 * k, acc[k]);
    if (nv < kVec) {
      c0 += 16 * nv;
      break;
    }
  }
#endif
  for (int r = 0; r < nt; ++r)
    for (int64_t i = c0; i < C; ++i) o[i] += p[r] * rows[r * C + i];
}

template <typename T>
void attend(const T* q, const T* pool, const int64_t* slots, const int64_t* pos, int64_t N, int64_t H, int64_t L,
            int64_t C, int64_t Tn, float scale, float* out) {
  const int64_t Hp = (H + kHeads - 1) / kHeads * kHeads;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Hp * L), kt(L * kRows), rows(kRows * C), scores;
    std::vector<T> qb;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t visible = std::min<int64_t>(pos[n] + 1, Tn);
      const int64_t* slot = slots + n * Tn;
      scores.assign(H * visible, 0.f);  // [H][visible]
      score_rows(q + n * H * L, pool, slot, visible, H, L, scale, qf, kt, qb, scores.data());
      for (int64_t h = 0; h < H; ++h) {  // softmax over the visible positions
        float* s = scores.data() + h * visible;
        // the max and the sum in kLanes partial results, so that their loops are vectorised too
        float tops[kLanes], sums[kLanes] = {};
        std::fill(tops, tops + kLanes, -std::numeric_limits<float>::infinity());
        int64_t t = 0;
        for (; t + kLanes <= visible; t += kLanes)
          for (int j = 0; j < kLanes; ++j) tops[j] = tops[j] < s[t + j] ? s[t + j] : tops[j];
        float top = *std::max_element(tops, tops + kLanes);
        for (; t < visible; ++t) top = std::max(top, s[t]);
        for (t = 0; t < visible; ++t) s[t] = exp_nonpositive(s[t] - top);
        for (t = 0; t + kLanes <= visible; t += kLanes)
          for (int j = 0; j < kLanes; ++j) sums[j] += s[t + j];
        float sum = 0.f;
        for (int j = 0; j < kLanes; ++j) sum += sums[j];
        for (; t < visible; ++t) sum += s[t];
        const float inv = 1.f / sum;
        for (t = 0; t < visible; ++t) s[t] *= inv;
      }
      float* o = out + n * H * C;
      std::fill(o, o + H * C, 0.f);
      for (int64_t t0 = 0; t0 < visible; t0 += kRows) {  // the rows' first C channels, kRows at a time
        const int nt = static_cast<int>(std::min<int64_t>(kRows, visible - t0));
        for (int r = 0; r < nt; ++r) {
          const T* src = pool + slot[t0 + r] * L;
          for (int64_t i = 0; i < C; ++i) rows[r * C + i] = widen(src[i]);
        }
        for (int64_t h = 0; h < H; ++h)
          weigh_rows(scores.data() + h * visible + t0, rows.data(), nt, C, o + h * C);
      }
    }
  });
}

}  // namespace

at::Tensor latent_attention(const at::Tensor& q, const at::Tensor& pool, const at::Tensor& slots,
                            const at::Tensor& pos, int64_t latent, double scale) {
  TORCH_CHECK(q.dim() == 3 && pool.dim() == 2 && slots.dim() == 2 && pos.dim() == 1,
              "latent_attention: q [N, H, L], pool [Z, L], slots [N, T], pos [N]");
  const int64_t N = q.size(0), H = q.size(1), L = q.size(2), Z = pool.size(0), Tn = slots.size(1);
  TORCH_CHECK(pool.size(1) == L && slots.size(0) == N && pos.size(0) == N && latent > 0 && latent <= L,
              "latent_attention: shapes do not agree");
  TORCH_CHECK(q.scalar_type() == pool.scalar_type() &&
              (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "latent_attention: q and pool both bf16 or both fp32");
  TORCH_CHECK(q.device().is_cpu() && pool.device().is_cpu() && slots.device().is_cpu() && pos.device().is_cpu(),
              "latent_attention: CPU tensors");
  const at::Tensor qc = q.contiguous(), pc = pool.contiguous();
  const at::Tensor sc = slots.to(at::kLong).contiguous(), tc = pos.to(at::kLong).contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(tp[n] >= 0, "latent_attention: negative position");
    for (int64_t t = 0; t < std::min<int64_t>(tp[n] + 1, Tn); ++t)
      TORCH_CHECK(sp[n * Tn + t] >= 0 && sp[n * Tn + t] < Z, "latent_attention: slot outside [0, ", Z, ")");
  }
  at::Tensor out = at::empty({N, H, latent}, q.options().dtype(at::kFloat));
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    attend(qc.data_ptr<c10::BFloat16>(), pc.data_ptr<c10::BFloat16>(), sp, tp, N, H, L, latent, Tn, s,
           out.data_ptr<float>());
  } else {
    attend(qc.data_ptr<float>(), pc.data_ptr<float>(), sp, tp, N, H, L, latent, Tn, s, out.data_ptr<float>());
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(openk2, m) {
  m.def("latent_attention(Tensor q, Tensor pool, Tensor slots, Tensor pos, int latent, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(openk2, CPU, m) { m.impl("latent_attention", &latent_attention); }
