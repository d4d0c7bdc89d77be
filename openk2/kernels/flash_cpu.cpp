// Causal attention over packed runs, forward and backward, for training on the CPU
// (`openk2.model.flash.packed_attention`; tests/test_kernels.py checks it against float64 attention run
// by run, as close as torch's own fused bf16 attention comes).
//
// runs_attention(q [H, N, A], k [H, N, A], v [H, N, O] bf16, starts [R + 1], scale)
//   -> (out [H, N, O] bf16, lse [H, N] fp32, top [H] fp32)
// runs_attention_backward(dout, q, k, v, out, lse, starts, scale) -> (dq, dk, dv)
//
// Positions starts[r] .. starts[r + 1] are run r, a causal sequence that sees nothing outside itself.
// Each (head, run) is a task: its queries and keys in blocks of 32, only the blocks on and below the
// diagonal, softmax online in fp32 (the flash algorithm), `lse` the log-sum-exp of each query's scaled
// scores, kept for the backward, and `top` each head's largest scaled score (QK-Clip's max logit, which
// the forward sees anyway). The backward recomputes each block's probabilities from `lse` and
// accumulates dq, dk and dv in fp32 (every task writes only its own run's rows: no two threads share
// one). Products take bf16 operands and sum in fp32, as torch's bf16 matmuls do: through AMX tiles
// where the CPU has them (`set_amx`), else a plain loop (slow; tests check both).
// Operands are copied once per task into the layouts the products read: rows padded to whole blocks,
// head dims to multiples of 32, and "pairs" (two consecutive values of a product's inner dimension in
// one 32-bit word, the layout of an AMX B tile).
//
//   H heads  N positions  A q/k head dim  O value head dim  n a run's length  P padded to 32
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using Bf = c10::BFloat16;
using openk2_simd::exp_nonpositive;
constexpr int64_t kB = 32;  // queries and keys per block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t up32(int64_t x) { return (x + kB - 1) / kB * kB; }

// a pair's two bf16 values; fp32 -> bf16 bits (finite values here: scores and gradients)
inline float lo(uint32_t w) { return openk2_simd::bf16_to_float(static_cast<uint16_t>(w)); }
inline float hi(uint32_t w) { return openk2_simd::bf16_to_float(static_cast<uint16_t>(w >> 16)); }
inline uint32_t bf16_bits(float x) { return openk2_simd::bf16_round(x); }

bool use_tiles() {
#if defined(OPENK2_AMX)
  return openk2_simd::amx_on();
#else
  return false;
#endif
}

// c [M][N] (+)= a [M][K] · b: a bf16 rows (stride lda), b in pairs [K/2][ldb] (word [p][j]: inner indices
// 2p and 2p + 1 of column j), c fp32 (stride ldc); M, N and K multiples of 32. Tiles: 0-3 the four
// 16 × 16 blocks of a 32 × 32 output, 4-5 a's two row halves, 6-7 b's two column halves.
void mm(const Bf* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t M, int64_t K, int64_t N, float* c,
        int64_t ldc, bool accumulate, bool tiles) {
#if defined(OPENK2_AMX)
  if (tiles) {
    for (int64_t m0 = 0; m0 < M; m0 += 32)
      for (int64_t n0 = 0; n0 < N; n0 += 32) {
        float* c0 = c + m0 * ldc + n0;
        if (accumulate) {
          _tile_loadd(0, c0, ldc * 4);
          _tile_loadd(1, c0 + 16, ldc * 4);
          _tile_loadd(2, c0 + 16 * ldc, ldc * 4);
          _tile_loadd(3, c0 + 16 * ldc + 16, ldc * 4);
        } else {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        }
        for (int64_t k = 0; k < K; k += 32) {
          _tile_loadd(4, a + m0 * lda + k, lda * 2);
          _tile_loadd(5, a + (m0 + 16) * lda + k, lda * 2);
          _tile_loadd(6, b + (k / 2) * ldb + n0, ldb * 4);
          _tile_loadd(7, b + (k / 2) * ldb + n0 + 16, ldb * 4);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c0, ldc * 4);
        _tile_stored(1, c0 + 16, ldc * 4);
        _tile_stored(2, c0 + 16 * ldc, ldc * 4);
        _tile_stored(3, c0 + 16 * ldc + 16, ldc * 4);
      }
    return;
  }
#endif
  (void)tiles;
  std::vector<float> row(N);
  for (int64_t m = 0; m < M; ++m) {
    float* r = row.data();
    for (int64_t j = 0; j < N; ++j) r[j] = accumulate ? c[m * ldc + j] : 0.f;
    for (int64_t p = 0; p < K / 2; ++p) {
      const float a0 = static_cast<float>(a[m * lda + 2 * p]), a1 = static_cast<float>(a[m * lda + 2 * p + 1]);
      const uint32_t* bp = b + p * ldb;
      for (int64_t j = 0; j < N; ++j) r[j] += a0 * lo(bp[j]) + a1 * hi(bp[j]);
    }
    for (int64_t j = 0; j < N; ++j) c[m * ldc + j] = r[j];
  }
}

// the layouts, from rows src [n][D] (row stride D) of one head and run:
// rows [P][DP] (rows and columns zero-padded), pairs of rows [P/2][DP] (word [p][d]: rows 2p, 2p + 1 at
// column d), pairs of columns [DP/2][P] (word [p][j]: columns 2p, 2p + 1 of row j), columns [DP][P]
void pack_rows(const Bf* src, int64_t n, int64_t D, int64_t P, int64_t DP, Bf* dst) {
  for (int64_t j = 0; j < P; ++j)
    for (int64_t d = 0; d < DP; ++d) dst[j * DP + d] = j < n && d < D ? src[j * D + d] : Bf(0.f);
}
void pack_row_pairs(const Bf* src, int64_t n, int64_t D, int64_t P, int64_t DP, uint32_t* dst) {
  for (int64_t p = 0; p < P / 2; ++p)
    for (int64_t d = 0; d < DP; ++d) {
      const uint16_t a = 2 * p < n && d < D ? src[2 * p * D + d].x : 0;
      const uint16_t b = 2 * p + 1 < n && d < D ? src[(2 * p + 1) * D + d].x : 0;
      dst[p * DP + d] = uint32_t(a) | (uint32_t(b) << 16);
    }
}
void pack_col_pairs(const Bf* src, int64_t n, int64_t D, int64_t P, int64_t DP, uint32_t* dst) {
  for (int64_t p = 0; p < DP / 2; ++p)
    for (int64_t j = 0; j < P; ++j) {
      const uint16_t a = j < n && 2 * p < D ? src[j * D + 2 * p].x : 0;
      const uint16_t b = j < n && 2 * p + 1 < D ? src[j * D + 2 * p + 1].x : 0;
      dst[p * P + j] = uint32_t(a) | (uint32_t(b) << 16);
    }
}
void pack_cols(const Bf* src, int64_t n, int64_t D, int64_t P, int64_t DP, Bf* dst) {
  for (int64_t d = 0; d < DP; ++d)
    for (int64_t j = 0; j < P; ++j) dst[d * P + j] = j < n && d < D ? src[j * D + d] : Bf(0.f);
}

struct Shape {
  int64_t H, N, A, O, AP, OP;
};

// tasks (head, run), the longest runs first, claimed one at a time by torch's threads
template <typename F>
void for_tasks(const Shape& s, const int64_t* starts, int64_t R, F&& run) {
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (run length, h * R + r)
  for (int64_t h = 0; h < s.H; ++h)
    for (int64_t r = 0; r < R; ++r) tasks.emplace_back(starts[r + 1] - starts[r], h * R + r);
  std::sort(tasks.begin(), tasks.end(), [](auto& x, auto& y) { return x.first > y.first; });
  std::atomic<int64_t> next{0};
  const bool tiles = use_tiles();
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
#if defined(OPENK2_AMX)
    if (tiles) openk2_simd::amx_configure();
#endif
    for (int64_t t; (t = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
      const int64_t h = tasks[t].second / R, r = tasks[t].second % R;
      if (tasks[t].first > 0) run(h, r, starts[r], tasks[t].first, tiles);
    }
#if defined(OPENK2_AMX)
    if (tiles) _tile_release();
#endif
  });
}

Shape check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& starts) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0) &&
              v.size(1) == q.size(1), "runs_attention: q, k [H, N, A] and v [H, N, O]");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous(), "runs_attention: contiguous bf16 q, k, v");
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.dim() == 1 && starts.numel() >= 2 &&
              starts.is_contiguous(), "runs_attention: starts is int64 [R + 1]");
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0 && st[starts.numel() - 1] == q.size(1), "runs_attention: starts go from 0 to N");
  for (int64_t r = 0; r + 1 < starts.numel(); ++r) TORCH_CHECK(st[r + 1] >= st[r], "runs_attention: starts ascend");
  return {q.size(0), q.size(1), q.size(2), v.size(2), up32(q.size(2)), up32(v.size(2))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> runs_attention(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& starts,
                                                              double scale_d) {
  const Shape s = check(q, k, v, starts);
  const int64_t R = starts.numel() - 1;
  const float scale = static_cast<float>(scale_d);
  auto out = at::empty({s.H, s.N, s.O}, q.options());
  auto lse = at::empty({s.H, s.N}, q.options().dtype(at::kFloat));
  std::vector<float> tops(s.H * R, kNegInf);
  const Bf *qp = q.data_ptr<Bf>(), *kp = k.data_ptr<Bf>(), *vp = v.data_ptr<Bf>();
  Bf* op = out.data_ptr<Bf>();
  float* lp = lse.data_ptr<float>();
  for_tasks(s, starts.data_ptr<int64_t>(), R, [&](int64_t h, int64_t r, int64_t s0, int64_t n, bool tiles) {
    const int64_t P = up32(n), AP = s.AP, OP = s.OP;
    // transposed, so that each query's running maximum and sum are a lane of a vector: scoresᵀ [keys][queries]
    // = k rows · q column pairs, and outᵀ [O][queries] += vᵀ · (probabilitiesᵀ in pairs of keys)
    std::vector<Bf> kr(P * AP), vt(OP * P);
    std::vector<uint32_t> qc(AP / 2 * P), pp(kB / 2 * kB);
    std::vector<float> st(kB * kB), acc(OP * kB);
    pack_rows(kp + (h * s.N + s0) * s.A, n, s.A, P, AP, kr.data());
    pack_cols(vp + (h * s.N + s0) * s.O, n, s.O, P, OP, vt.data());
    pack_col_pairs(qp + (h * s.N + s0) * s.A, n, s.A, P, AP, qc.data());
    float top[kB];
    std::fill(top, top + kB, kNegInf);
    for (int64_t i = 0; i < P / kB; ++i) {
      float m[kB], l[kB], best[kB], m_new[kB], keep[kB], sum[kB];
      std::fill(m, m + kB, kNegInf);
      std::fill(l, l + kB, 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t queries = std::min(kB, n - i * kB);  // real queries in the block; the rest see nothing
      for (int64_t j = 0; j <= i; ++j) {
        mm(kr.data() + j * kB * AP, AP, qc.data() + i * kB, P, kB, AP, kB, st.data(), kB, false, tiles);
        std::fill(best, best + kB, kNegInf);
        for (int64_t y = 0; y < kB; ++y) {  // key y of the block: seen by the real queries at or after it
          float* row = st.data() + y * kB;
          for (int64_t x = 0; x < kB; ++x) row[x] *= scale;
          for (int64_t x = j < i ? 0 : y; x < queries; ++x) best[x] = std::max(best[x], row[x]);
          std::fill(row + queries, row + kB, kNegInf);
          if (j == i) std::fill(row, row + std::min(y, queries), kNegInf);
        }
        for (int64_t x = 0; x < kB; ++x) {
          top[x] = std::max(top[x], best[x]);
          m_new[x] = std::max(m[x], best[x]);
          keep[x] = m[x] == kNegInf ? 0.f : exp_nonpositive(m[x] - m_new[x]);
          sum[x] = 0.f;
        }
        for (int64_t y = 0; y < kB; ++y) {
          float* row = st.data() + y * kB;
          for (int64_t x = 0; x < kB; ++x) {
            const float p = row[x] == kNegInf ? 0.f : exp_nonpositive(row[x] - m_new[x]);
            row[x] = p;
            sum[x] += p;
          }
        }
        for (int64_t x = 0; x < kB; ++x) {
          l[x] = l[x] * keep[x] + sum[x];
          m[x] = m_new[x];
        }
        for (int64_t a = 0; a < kB / 2; ++a)
          for (int64_t x = 0; x < kB; ++x)
            pp[a * kB + x] = bf16_bits(st[2 * a * kB + x]) | (bf16_bits(st[(2 * a + 1) * kB + x]) << 16);
        for (int64_t o = 0; o < OP; ++o)
          for (int64_t x = 0; x < kB; ++x) acc[o * kB + x] *= keep[x];
        mm(vt.data() + j * kB, P, pp.data(), kB, OP, kB, kB, acc.data(), kB, true, tiles);
      }
      for (int64_t x = 0; x < queries; ++x) {
        const int64_t row = h * s.N + s0 + i * kB + x;
        const float inv = 1.f / l[x];
        for (int64_t o = 0; o < s.O; ++o) op[row * s.O + o] = Bf(acc[o * kB + x] * inv);
        lp[row] = m[x] + std::log(l[x]);
      }
    }
    tops[h * R + r] = *std::max_element(top, top + kB);
  });
  auto top = at::empty({s.H}, q.options().dtype(at::kFloat));
  for (int64_t h = 0; h < s.H; ++h)
    top.data_ptr<float>()[h] = *std::max_element(tops.begin() + h * R, tops.begin() + (h + 1) * R);
  return {out, lse, top};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> runs_attention_backward(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& starts, double scale_d) {
  const Shape s = check(q, k, v, starts);
  TORCH_CHECK(out.sizes() == v.sizes() && out.scalar_type() == at::kBFloat16 && out.is_contiguous() &&
              lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == s.H * s.N,
              "runs_attention_backward: out and lse as the forward gave them");
  const auto dout = dout_in.to(at::kBFloat16).contiguous();
  TORCH_CHECK(dout.sizes() == out.sizes(), "runs_attention_backward: dout [H, N, O]");
  const int64_t R = starts.numel() - 1;
  const float scale = static_cast<float>(scale_d);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const Bf *qp = q.data_ptr<Bf>(), *kp = k.data_ptr<Bf>(), *vp = v.data_ptr<Bf>();
  const Bf *gp = dout.data_ptr<Bf>(), *op = out.data_ptr<Bf>();
  const float* lp = lse.data_ptr<float>();
  Bf *dqp = dq.data_ptr<Bf>(), *dkp = dk.data_ptr<Bf>(), *dvp = dv.data_ptr<Bf>();
  for_tasks(s, starts.data_ptr<int64_t>(), R, [&](int64_t h, int64_t, int64_t s0, int64_t n, bool tiles) {
    const int64_t P = up32(n), AP = s.AP, OP = s.OP;
    const Bf *qh = qp + (h * s.N + s0) * s.A, *kh = kp + (h * s.N + s0) * s.A, *vh = vp + (h * s.N + s0) * s.O;
    const Bf* gh = gp + (h * s.N + s0) * s.O;
    // scores: q rows · k column pairs; dP: dout rows · v column pairs; dq: dS · k row pairs;
    // dkᵀ: qᵀ · dS row pairs; dvᵀ: doutᵀ · P row pairs
    std::vector<Bf> qr(P * AP), gr(P * OP), qt(AP * P), gt(OP * P), dsb(kB * kB);
    std::vector<uint32_t> kc(AP / 2 * P), vc(OP / 2 * P), kr(P / 2 * AP), dsp(kB / 2 * kB), pp(kB / 2 * kB);
    std::vector<float> sc(kB * kB), dp(kB * kB), ds(kB * kB), pr(kB * kB), dqa(P * AP), dkt(AP * kB), dvt(OP * kB);
    std::vector<float> lse_r(P, 0.f), delta(P, 0.f);
    pack_rows(qh, n, s.A, P, AP, qr.data());
    pack_rows(gh, n, s.O, P, OP, gr.data());
    pack_cols(qh, n, s.A, P, AP, qt.data());
    pack_cols(gh, n, s.O, P, OP, gt.data());
    pack_col_pairs(kh, n, s.A, P, AP, kc.data());
    pack_col_pairs(vh, n, s.O, P, OP, vc.data());
    pack_row_pairs(kh, n, s.A, P, AP, kr.data());
    for (int64_t x = 0; x < n; ++x) {  // D = rowsum(dout ⊙ out): the softmax's backward, per query
      lse_r[x] = lp[h * s.N + s0 + x];
      const Bf* orow = op + (h * s.N + s0 + x) * s.O;
      float d = 0.f;
      for (int64_t o = 0; o < s.O; ++o) d += static_cast<float>(gh[x * s.O + o]) * static_cast<float>(orow[o]);
      delta[x] = d;
    }
    std::fill(dqa.begin(), dqa.end(), 0.f);
    for (int64_t j = 0; j < P / kB; ++j) {
      std::fill(dkt.begin(), dkt.end(), 0.f);
      std::fill(dvt.begin(), dvt.end(), 0.f);
      for (int64_t i = j; i < P / kB; ++i) {
        mm(qr.data() + i * kB * AP, AP, kc.data() + j * kB, P, kB, AP, kB, sc.data(), kB, false, tiles);
        mm(gr.data() + i * kB * OP, OP, vc.data() + j * kB, P, kB, OP, kB, dp.data(), kB, false, tiles);
        for (int64_t x = 0; x < kB; ++x) {
          const int64_t qi = i * kB + x;
          const int64_t seen = qi >= n ? 0 : j < i ? kB : x + 1;
          const float lq = lse_r[qi], dq_ = delta[qi];
          const float* srow = sc.data() + x * kB;
          const float* drow = dp.data() + x * kB;
          float* prow = pr.data() + x * kB;
          float* dsrow = ds.data() + x * kB;
          uint16_t* dsbrow = reinterpret_cast<uint16_t*>(dsb.data() + x * kB);
          for (int64_t y = 0; y < kB; ++y) {
            const float p = y < seen ? exp_nonpositive(std::min(srow[y] * scale - lq, 0.f)) : 0.f;
            const float g = p * (drow[y] - dq_) * scale;
            prow[y] = p;
            dsrow[y] = g;
            dsbrow[y] = static_cast<uint16_t>(bf16_bits(g));
          }
        }
        for (int64_t a = 0; a < kB / 2; ++a)  // pairs of query rows: the inner dimension of dkᵀ and dvᵀ
          for (int64_t y = 0; y < kB; ++y) {
            dsp[a * kB + y] = bf16_bits(ds[2 * a * kB + y]) | (bf16_bits(ds[(2 * a + 1) * kB + y]) << 16);
            pp[a * kB + y] = bf16_bits(pr[2 * a * kB + y]) | (bf16_bits(pr[(2 * a + 1) * kB + y]) << 16);
          }
        mm(dsb.data(), kB, kr.data() + j * (kB / 2) * AP, AP, kB, kB, AP, dqa.data() + i * kB * AP, AP, true, tiles);
        mm(qt.data() + i * kB, P, dsp.data(), kB, AP, kB, kB, dkt.data(), kB, true, tiles);
        mm(gt.data() + i * kB, P, pp.data(), kB, OP, kB, kB, dvt.data(), kB, true, tiles);
      }
      for (int64_t y = 0; y < kB && j * kB + y < n; ++y) {
        const int64_t row = h * s.N + s0 + j * kB + y;
        for (int64_t a = 0; a < s.A; ++a) dkp[row * s.A + a] = Bf(dkt[a * kB + y]);
        for (int64_t o = 0; o < s.O; ++o) dvp[row * s.O + o] = Bf(dvt[o * kB + y]);
      }
    }
    for (int64_t x = 0; x < n; ++x)
      for (int64_t a = 0; a < s.A; ++a) dqp[(h * s.N + s0 + x) * s.A + a] = Bf(dqa[x * AP + a]);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2, m) {
  m.def("runs_attention(Tensor q, Tensor k, Tensor v, Tensor starts, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("runs_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor starts, "
        "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(openk2, CPU, m) {
  m.impl("runs_attention", &runs_attention);
  m.impl("runs_attention_backward", &runs_attention_backward);
}
