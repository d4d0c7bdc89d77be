// Helpers the CPU kernels share (included by pairs_cpu.cpp and attention_cpu.cpp).
#pragma once

#include <c10/util/BFloat16.h>

namespace openk2_simd {

// an element as fp32 (the kernels' loops are templates over the stored type)
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen(float v) { return v; }

}  // namespace openk2_simd

#if defined(__AVX512F__)
#include <immintrin.h>

namespace openk2_simd {

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

}  // namespace openk2_simd
#endif
