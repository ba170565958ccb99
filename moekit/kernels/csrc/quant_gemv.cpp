// Quantized GEMV / small-M linears over moekit's group-wise asymmetric codes, and a fused
// one-token experts op. Ops: moekit::q_linear, moekit::q_experts_token (see qlinear.py).
//
// Shape legend: N = activation rows (1..8 is the target), R = output rows, C = input columns,
// G = weight groups per row (C / g), B = activation blocks per row (C / 32), K = experts of a token,
// H = input-projection rows (2F for SwiGLU), F = expert hidden width, D = model width.
//
// Math. Weights: codes q (unsigned, 0..255 or 0..15), per (row, group) a float16 scale s and a
// uint8 zero z, w = (q - z) s. Activations are quantized on the fly in blocks of 32, as llama.cpp's
// q8_0 does: d = amax / 127, xq = round(x / d) in int8. Then
//     y[n, r] = sum_b s_g(b) d_b (sum_{k in b} q xq) - sum_g s_g z_g (sum_{b in g} d_b sum xq_b),
// where the first dot is exact in int32 (u8 x s8: AVX-512 VNNI's dpbusd) and the second term
// depends on the row only through (s_g, z_g), so it costs G multiply-adds per row.
//
// Kernel layout (built by qlinear.py at load time; the saved format is unchanged): row tiles of 16
// rows, block-interleaved so each dpbusd lane is one output row (quant_gemv.h, "The weight
// layout"); codes keep the shape [R, C] (8 bits) or [R, C / 2] (1..4 bits, nibbles) and the
// float16 scales and uint8 zeros [R, G], in tile order. Needs C % 32 == 0 and g % 32 == 0.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "quant_gemv.h"

namespace {

constexpr int64_t ROW_GRAIN = 16;

at::Tensor q_linear_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                         const at::Tensor& zero, int64_t bits, int64_t group, bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "q_linear: x must be float32 [N, C]");
  const auto xc = x.contiguous();
  const QMat w = check_matrix(codes, scale, zero, bits, group, xc.size(1));
  QAct a;
  quantize_rows(xc.data_ptr<float>(), xc.size(0), xc.size(1), group, a);
  auto y = at::empty({xc.size(0), w.rows}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, w.rows, ROW_GRAIN, [&](int64_t r0, int64_t r1) { matvec_range(w, a, r0, r1, yp, portable); });
  return y;
}

at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                    int64_t bits, int64_t group) {
  return q_linear_impl(x, codes, scale, zero, bits, group, false);
}

// The same product through the portable scalar tiles (what a CPU without VNNI runs): an oracle.
at::Tensor q_linear_portable(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                             const at::Tensor& zero, int64_t bits, int64_t group) {
  return q_linear_impl(x, codes, scale, zero, bits, group, true);
}

inline float apply_act(float v, int64_t act) {
  if (act == 1) return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));  // exact GELU
  return v;
}

// The routed experts of one token: out [1, D] = sum_k weights[k] * w_out_k(act(w_in_k(x))).
// Activation 0: SwiGLU (rows [:F] gate, [F:] up); 1: GELU. Three parallel phases (gate/up rows of
// all K experts, then the activations, then down rows of all K experts); at 2 threads and K = 2 the
// static split gives each core one expert in the matrix phases.
at::Tensor q_experts_token(const at::Tensor& x, const at::Tensor& weights, at::TensorList in_codes,
                           at::TensorList in_scale, at::TensorList in_zero, at::TensorList out_codes,
                           at::TensorList out_scale, at::TensorList out_zero, at::IntArrayRef bits, int64_t in_group,
                           int64_t out_group, int64_t activation) {
  const int64_t k = static_cast<int64_t>(in_codes.size());
  TORCH_CHECK(k >= 1 && in_scale.size() == k && in_zero.size() == k && out_codes.size() == k &&
                  out_scale.size() == k && out_zero.size() == k && static_cast<int64_t>(bits.size()) == k,
              "q_experts_token: every list needs one entry per expert");
  TORCH_CHECK(activation == 0 || activation == 1, "q_experts_token: activation must be 0 (swiglu) or 1 (gelu)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == x.size(-1), "q_experts_token: x must be float32 [1, D]");
  const auto wts = weights.to(at::kFloat).contiguous().view(-1);
  TORCH_CHECK(wts.numel() == k, "q_experts_token: ", k, " experts but ", wts.numel(), " weights");
  const auto xc = x.contiguous();
  const int64_t d = xc.size(-1);
  std::vector<QMat> w_in, w_out;
  for (int64_t e = 0; e < k; ++e) {
    w_in.push_back(check_matrix(in_codes[e], in_scale[e], in_zero[e], bits[e], in_group, d));
    const int64_t f = out_codes[e].size(1) * (bits[e] <= 4 ? 2 : 1);
    w_out.push_back(check_matrix(out_codes[e], out_scale[e], out_zero[e], bits[e], out_group, f));
    TORCH_CHECK(w_out[e].rows == d, "q_experts_token: w_out must have D rows");
    TORCH_CHECK(w_in[e].rows == (activation == 0 ? 2 * f : f), "q_experts_token: w_in rows do not fit F = ", f);
  }
  const int64_t h = w_in[0].rows, f = w_out[0].cols;
  for (int64_t e = 1; e < k; ++e) TORCH_CHECK(w_in[e].rows == h, "q_experts_token: experts differ in shape");
  QAct xa;
  quantize_rows(xc.data_ptr<float>(), 1, d, in_group, xa);
  std::vector<float> hid(k * h), y(k * d);
  at::parallel_for(0, k * h, ROW_GRAIN, [&](int64_t b, int64_t e_) {
    for (int64_t e = b / h; e * h < e_; ++e) {
      const int64_t r0 = std::max(b, e * h) - e * h, r1 = std::min(e_, (e + 1) * h) - e * h;
      matvec_range(w_in[e], xa, r0, r1, hid.data() + e * h);
    }
  });
  std::vector<QAct> acts(k);
  at::parallel_for(0, k, 1, [&](int64_t b, int64_t e_) {
    for (int64_t e = b; e < e_; ++e) {
      std::vector<float> a(f);
      const float* he = hid.data() + e * h;
      for (int64_t j = 0; j < f; ++j) {
        if (activation == 0) {
          const float g = he[j];
          a[j] = g / (1.f + std::exp(-g)) * he[f + j];
        } else {
          a[j] = apply_act(he[j], activation);
        }
      }
      quantize_rows(a.data(), 1, f, out_group, acts[e]);
    }
  });
  at::parallel_for(0, k * d, ROW_GRAIN, [&](int64_t b, int64_t e_) {
    for (int64_t e = b / d; e * d < e_; ++e) {
      const int64_t r0 = std::max(b, e * d) - e * d, r1 = std::min(e_, (e + 1) * d) - e * d;
      matvec_range(w_out[e], acts[e], r0, r1, y.data() + e * d);
    }
  });
  auto out = at::zeros({1, d}, x.options());
  float* op = out.data_ptr<float>();
  const float* wp = wts.data_ptr<float>();
  for (int64_t e = 0; e < k; ++e)  // slot order, as the general path sums
    for (int64_t j = 0; j < d; ++j) op[j] += wp[e] * y[e * d + j];
  return out;
}

int64_t q_has_vnni() { return MOEKIT_VNNI; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("q_linear(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group) -> Tensor");
  m.def(
      "q_experts_token(Tensor x, Tensor weights, Tensor[] in_codes, Tensor[] in_scale, Tensor[] in_zero, "
      "Tensor[] out_codes, Tensor[] out_scale, Tensor[] out_zero, int[] bits, int in_group, int out_group, "
      "int activation) -> Tensor");
  m.def("q_linear_portable(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group) -> Tensor");
  m.def("q_has_vnni() -> int", &q_has_vnni);
}

TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("q_linear", &q_linear);
  m.impl("q_linear_portable", &q_linear_portable);
  m.impl("q_experts_token", &q_experts_token);
}
