// Muon's elementwise passes on the CPU, each one pass over memory where torch takes two or three
// (openk2/optim/muon.py calls them where the kernels are built, its torch ops otherwise). Every value
// equals what those torch ops give, bit for bit: the same fused multiply-adds (torch's vectorised
// `add(alpha=)` is one), float products, round-to-nearest-even casts to bf16
// (tests/test_optim.py compares both paths).
//
// - muon_momentum(grad, buf, out, mu, nesterov): buf = grad + mu·buf, out = grad + mu·buf (Nesterov)
//   or buf; fp32.
// - scale_to_bf16(src [N, A, B], inv [N], dst [N, A, B] bf16): dst = bf16(src · inv[n]) (the Newton–Schulz
//   input, normalised).
// - muon_apply(p, o, decay, alpha): p = (p · decay) + alpha · o, o in bf16 (or fp32), p fp32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd_cpu.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t GRAIN = 1 << 15;  // elements a task: ~128 KB of fp32

using openk2_simd::bf16_to_float;

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN as torch's vectorised cast writes it
  const uint16_t r = openk2_simd::bf16_round(f);
  return f != f ? static_cast<uint16_t>(0xffff) : r;
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous fp32 CPU tensor");
}

void muon_momentum(const at::Tensor& grad, at::Tensor& buf, at::Tensor& out, double mu, bool nesterov) {
  check_f32(grad, "grad");
  check_f32(buf, "buf");
  check_f32(out, "out");
  TORCH_CHECK(grad.numel() == buf.numel() && grad.numel() == out.numel(), "grad, buf and out differ in size");
  const float m = static_cast<float>(mu);
  const float* g = grad.data_ptr<float>();
  float* b = buf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, grad.numel(), GRAIN, [&](int64_t begin, int64_t end) {
    if (nesterov) {
      for (int64_t i = begin; i < end; ++i) {
        const float nb = std::fma(b[i], m, g[i]);
        b[i] = nb;
        o[i] = std::fma(nb, m, g[i]);
      }
    } else {
      for (int64_t i = begin; i < end; ++i) {
        const float nb = std::fma(b[i], m, g[i]);
        b[i] = nb;
        o[i] = nb;
      }
    }
  });
}

void scale_to_bf16(const at::Tensor& src, const at::Tensor& inv, at::Tensor& dst) {
  check_f32(src, "src");
  check_f32(inv, "inv");
  TORCH_CHECK(dst.device().is_cpu() && dst.scalar_type() == at::kBFloat16 && dst.is_contiguous(),
              "dst must be a contiguous bf16 CPU tensor");
  TORCH_CHECK(src.dim() == 3 && dst.sizes() == src.sizes() && inv.numel() == src.size(0),
              "src and dst [N, A, B], inv one value a matrix");
  const int64_t per = src.size(1) * src.size(2);
  const float* s = src.data_ptr<float>();
  const float* k = inv.data_ptr<float>();
  uint16_t* d = reinterpret_cast<uint16_t*>(dst.data_ptr<at::BFloat16>());
  at::parallel_for(0, src.numel(), GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {  // a matrix at a time: one scale a run
      const int64_t n = i / per, stop = std::min(end, (n + 1) * per);
      const float c = k[n];
      for (int64_t j = i; j < stop; ++j) d[j] = float_to_bf16(s[j] * c);
      i = stop;
    }
  });
}

void muon_apply(at::Tensor& p, const at::Tensor& o, double decay, double alpha) {
  check_f32(p, "p");
  TORCH_CHECK(o.device().is_cpu() && o.is_contiguous() && o.numel() == p.numel() &&
              (o.scalar_type() == at::kBFloat16 || o.scalar_type() == at::kFloat),
              "o must be a contiguous bf16 or fp32 CPU tensor of p's size");
  const float k = static_cast<float>(decay), a = static_cast<float>(alpha);
  float* w = p.data_ptr<float>();
  if (o.scalar_type() == at::kFloat) {
    const float* u = o.data_ptr<float>();
    at::parallel_for(0, p.numel(), GRAIN, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) w[i] = std::fma(u[i], a, w[i] * k);
    });
  } else {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(o.data_ptr<at::BFloat16>());
    at::parallel_for(0, p.numel(), GRAIN, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) w[i] = std::fma(bf16_to_float(u[i]), a, w[i] * k);
    });
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2, m) {
  m.def("muon_momentum(Tensor grad, Tensor(a!) buf, Tensor(b!) out, float mu, bool nesterov) -> ()");
  m.def("scale_to_bf16(Tensor src, Tensor inv, Tensor(a!) dst) -> ()");
  m.def("muon_apply(Tensor(a!) p, Tensor o, float decay, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(openk2, CPU, m) {
  m.impl("muon_momentum", &muon_momentum);
  m.impl("scale_to_bf16", &scale_to_bf16);
  m.impl("muon_apply", &muon_apply);
}
