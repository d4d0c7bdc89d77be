// int4 matrix-vector products for the decode step: row m of x times matrix idx[m] of a stack of
// group-wise int4 matrices in openk2's decode layout (openk2/quant/int4_decode.py): codes uint8
// [E, O, I/2], where in each group of 2H inputs byte j holds input j (low nibble) and input j + H
// (high nibble), W = (code - 8) * scale[e, o, g]. fp32 accumulation.
//
// Per group: (code - 8) times x in a vector of H lanes, scaled by the group's scale into a per-row
// vector accumulator, reduced once per row. K2's groups of 32 (H = 16) have an AVX-512 path (codes to
// floats by a table lookup, four rows per pass over x); other sizes and CPUs a plain loop the
// compiler vectorises. Rows of the output split across torch's intra-op threads (OpenMP).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int64_t kAhead = 64;  // rows of codes prefetched ahead of the ones being read

// K2's groups of 32 (H = 16: one 16-lane register a half). R rows of one matrix at a time, their
// accumulators in registers, so that each load of x serves R rows.
template <int R, typename S>
inline void block16_avx512(const float* xm, const uint8_t* w, const S* scale, float* y, int64_t G) {
  // code -> code - 8 by a 16-entry table lookup (vpermps reads the low 4 bits of each lane): no mask,
  // no int-to-float conversion, no offset to correct afterwards
  const __m512 table = _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f,
                                      0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  __m512 acc[R];
  for (int k = 0; k < R; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m512 x0 = _mm512_loadu_ps(xm + g * 32), x1 = _mm512_loadu_ps(xm + g * 32 + 16);
    if (g % 4 == 0)  // the rows kAhead ahead into L2, a cache line (four groups' codes) at a time
      for (int k = 0; k < R; ++k) _mm_prefetch(reinterpret_cast<const char*>(w + (k + kAhead) * 16 * G + g * 16), _MM_HINT_T1);
    for (int k = 0; k < R; ++k) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * 16 * G + g * 16)));
      __m512 t = _mm512_mul_ps(x0, _mm512_permutexvar_ps(v, table));
      t = _mm512_fmadd_ps(x1, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), t);
      acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(scale[k * G + g])), t, acc[k]);
    }
  }
  for (int k = 0; k < R; ++k) y[k] = _mm512_reduce_add_ps(acc[k]);
}

template <typename S>
void rows16_avx512(const float* x, const uint8_t* w, const S* scale, const int64_t* idx, float* y, int64_t M,
                   int64_t O, int64_t G) {
  constexpr int R = 4;
  const int64_t I = 32 * G, blocks = (O + R - 1) / R;
  at::parallel_for(0, M * blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t m = r / blocks, o = (r % blocks) * R, row = idx[m] * O + o;
      const float* xm = x + m * I;
      if (o + R <= O) {
        block16_avx512<R>(xm, w + row * 16 * G, scale + row * G, y + m * O + o, G);
      } else {
        for (int64_t k = 0; o + k < O; ++k)
          block16_avx512<1>(xm, w + (row + k) * 16 * G, scale + (row + k) * G, y + m * O + o + k, G);
      }
    }
  });
}
#endif

template <int H, typename S>
void rows(const float* x, const uint8_t* w, const S* scale, const int64_t* idx, float* y, int64_t M, int64_t O,
          int64_t G) {
  const int64_t I = 2 * H * G;
  at::parallel_for(0, M * O, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t m = r / O, o = r % O, row = idx[m] * O + o;
      const float* xm = x + m * I;
      const uint8_t* wr = w + row * (I / 2);
      const S* sr = scale + row * G;
      float acc[H] = {0.f};
      for (int64_t g = 0; g < G; ++g) {
        const float s = static_cast<float>(sr[g]);
        const uint8_t* wg = wr + g * H;
        const float* x0 = xm + g * 2 * H;
        const float* x1 = x0 + H;
        for (int j = 0; j < H; ++j) {
          acc[j] += s * (x0[j] * static_cast<float>((wg[j] & 15) - 8) + x1[j] * static_cast<float>((wg[j] >> 4) - 8));
        }
      }
      float total = 0.f;
      for (int j = 0; j < H; ++j) total += acc[j];
      y[r] = total;
    }
  });
}

template <typename S>
void dispatch(const float* x, const uint8_t* w, const S* scale, const int64_t* idx, float* y, int64_t M,
              int64_t O, int64_t G, int64_t H) {
  switch (H) {
#if defined(__AVX512F__)
    case 16: return rows16_avx512(x, w, scale, idx, y, M, O, G);
#else
    case 16: return rows<16>(x, w, scale, idx, y, M, O, G);
#endif
    case 32: return rows<32>(x, w, scale, idx, y, M, O, G);
    case 64: return rows<64>(x, w, scale, idx, y, M, O, G);
    case 128: return rows<128>(x, w, scale, idx, y, M, O, G);
    default: TORCH_CHECK(false, "int4_pairs: groups of 32, 64, 128 or 256 inputs, not ", 2 * H);
  }
}

}  // namespace

// x [M, I] (any float dtype), w [E, O, I/2] uint8, scale [E, O, G] (fp32, bf16 or fp16), idx [M] int64
// in [0, E) -> [M, O] fp32
at::Tensor int4_pairs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& idx) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && scale.dim() == 3 && x.dim() == 2 && idx.dim() == 1,
              "int4_pairs: x [M, I], codes uint8 [E, O, I/2], scale [E, O, G], idx [M]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu() && idx.device().is_cpu(),
              "int4_pairs: CPU tensors");
  const int64_t M = x.size(0), I = x.size(1), E = w.size(0), O = w.size(1), G = scale.size(2);
  TORCH_CHECK(G > 0 && w.size(2) * 2 == I && I % (2 * G) == 0 && scale.size(0) == E && scale.size(1) == O &&
              idx.size(0) == M, "int4_pairs: shapes do not agree");
  const at::Tensor ic = idx.to(at::kLong).contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(ip[m] >= 0 && ip[m] < E, "int4_pairs: idx outside [0, ", E, ")");
  // x in fp32, once per call, outside the row loop
  const at::Tensor xc = x.contiguous();
  std::vector<float> xf(M * I);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "int4_pairs", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * I; ++i) xf[i] = static_cast<float>(src[i]);
  });
  const at::Tensor wc = w.contiguous(), sc = scale.contiguous();
  at::Tensor y = at::empty({M, O}, x.options().dtype(at::kFloat));
  const int64_t H = I / G / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sc.scalar_type(), "int4_pairs", [&] {
    dispatch(xf.data(), wc.data_ptr<uint8_t>(), sc.data_ptr<scalar_t>(), ic.data_ptr<int64_t>(), y.data_ptr<float>(),
             M, O, G, H);
  });
  return y;
}

namespace {
inline uint8_t int4_code(float x, float s) {  // round half to even, as torch.round; NaN -> -8, as the vector path
  const float r = std::nearbyint(x / s);
  return static_cast<uint8_t>((r > -8.f ? (r < 7.f ? r : 7.f) : -8.f) + 8.f);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits on top, exact
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 codes of x / s, rounded half to even (as nearbyint), clamped to [-8, 7], plus 8, as int32 lanes
inline __m512i codes16(__m512 x, __m512 s) {
  const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 c = _mm512_add_ps(_mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-8.f)), _mm512_set1_ps(7.f)),
                                 _mm512_set1_ps(8.f));
  return _mm512_cvtps_epi32(c);  // exact: whole numbers 0..15
}

// K2's groups of 32: both halves in two registers, the group's max by one reduction, 16 bytes out
template <typename S>
void quantize32_avx512(const S* src, S* scale, uint8_t* codes, int64_t groups) {
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 lo = load16(src + 32 * g), hi = load16(src + 32 * g + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const S s = static_cast<S>(std::max(amax / 7.f, 1e-12f));
    scale[g] = s;
    const __m512 sv = _mm512_set1_ps(static_cast<float>(s));
    const __m512i packed = _mm512_or_si512(codes16(lo, sv), _mm512_slli_epi32(codes16(hi, sv), 4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16 * g), _mm512_cvtepi32_epi8(packed));
  }
}
#endif
}  // namespace

// w [O, I] (fp32, bf16 or fp16) -> (codes uint8 [O, I/2] in the decode layout, scale [O, I/group] in w's
// dtype): the arithmetic of openk2.quant.int4_decode.quantize_halves element for element (scale =
// max|group| / 7 clamped at 1e-12 and rounded to w's dtype; code = round(w / scale) clamped to [-8, 7],
// plus 8), in one pass over w. One thread: the int4 expert cache calls it from its reader threads.
std::tuple<at::Tensor, at::Tensor> quantize_halves(const at::Tensor& w, int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && group > 0 && group % 2 == 0 && w.size(1) % group == 0,
              "quantize_halves: a CPU matrix [O, I] with I a multiple of an even group");
  const at::Tensor wc = w.contiguous();
  const int64_t O = w.size(0), I = w.size(1), G = I / group, H = group / 2;
  at::Tensor codes = at::empty({O, I / 2}, w.options().dtype(at::kByte));
  at::Tensor scale = at::empty({O, G}, w.options());
  std::vector<float> q(group);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wc.scalar_type(), "quantize_halves", [&] {
    const scalar_t* src = wc.data_ptr<scalar_t>();
    scalar_t* sp = scale.data_ptr<scalar_t>();
    uint8_t* cp = codes.data_ptr<uint8_t>();
#if defined(__AVX512F__)
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (group == 32) return quantize32_avx512(src, sp, cp, O * G);
    }
#endif
    for (int64_t og = 0; og < O * G; ++og) {
      float amax = 0.f;
      for (int64_t j = 0; j < group; ++j) {
        q[j] = static_cast<float>(src[og * group + j]);
        amax = std::max(amax, std::fabs(q[j]));
      }
      const scalar_t s = static_cast<scalar_t>(std::max(amax / 7.f, 1e-12f));
      sp[og] = s;
      const float sf = static_cast<float>(s);
      for (int64_t j = 0; j < H; ++j) {
        cp[og * H + j] = int4_code(q[j], sf) | static_cast<uint8_t>(int4_code(q[j + H], sf) << 4);
      }
    }
  });
  return {codes, scale};
}

TORCH_LIBRARY_FRAGMENT(openk2, m) {
  m.def("int4_pairs(Tensor x, Tensor w, Tensor scale, Tensor idx) -> Tensor");
  m.def("quantize_halves(Tensor w, int group) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(openk2, CPU, m) {
  m.impl("int4_pairs", &int4_pairs);
  m.impl("quantize_halves", &quantize_halves);
}
