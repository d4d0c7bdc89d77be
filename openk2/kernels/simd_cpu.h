// Helpers the CPU kernels share (included by pairs_cpu.cpp, attention_cpu.cpp, optim_cpu.cpp and flash_cpu.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define OPENK2_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <atomic>
#endif

namespace openk2_simd {

// an element as fp32 (the kernels' loops are templates over the stored type)
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen(float v) { return v; }

// bf16 bits to fp32, and fp32 to bf16 bits rounded to nearest even (NaN not kept: callers that may see
// one handle it), in integer arithmetic so that loops over them are vectorised
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t bf16_round(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// e^x for x <= 0 (the softmax's scores less their max), to 1e-7 relative: e^x = 2^n · e^g, n the nearest
// integer to x·log2(e) (rounded by adding 1.5·2^23, which leaves it in the sum's low bits), g = x − n·ln 2
// (ln 2 in two parts, so g keeps its low bits), |g| ≤ 0.35, e^g by its Taylor series to g⁷ (< 1e-8);
// below −87, e^−87 (~1e-38: the softmax's rounding of 0). Plain arithmetic and no float-to-int conversion
// (which may trap, so the compiler would not vectorise it), so that the loop around it is vectorised:
// std::exp stays one call a value, 12,800 of them a k2-small layer at 32 rows.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float shifted = x * 1.44269504f + 12582912.f;
  int32_t bits;
  std::memcpy(&bits, &shifted, 4);
  const int32_t n = bits - 0x4B400000;  // the integer in the low bits of 1.5·2^23 + n
  const float nf = shifted - 12582912.f;
  const float g = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.f / 5040;
  p = p * g + 1.f / 720;
  p = p * g + 1.f / 120;
  p = p * g + 1.f / 24;
  p = p * g + 1.f / 6;
  p = p * g + 0.5f;
  p = p * g + 1.f;
  p = p * g + 1.f;
  const int32_t e = (n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &e, 4);
  return p * two_n;
}

}  // namespace openk2_simd

#if defined(OPENK2_AMX)
namespace openk2_simd {

inline std::atomic<bool> amx_wanted{true};  // `set_amx`: tests compare the two paths

// Linux lets a process use the tile registers once it asks (once per process)
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// whether bf16 goes through the tiles: wanted (`set_amx`) and permitted
inline bool amx_on() { return amx_wanted.load(std::memory_order_relaxed) && amx_permitted(); }

// every tile 16 rows × 64 bytes (bf16: 16 × 32; fp32 and pairs of bf16: 16 × 16), for this thread
inline void amx_configure() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

}  // namespace openk2_simd
#endif

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
