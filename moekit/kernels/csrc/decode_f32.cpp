// fp32 kernels for batch-1 (small-M) CPU decoding: a streaming GEMV and a fused one-token MoE.
//
// Shape legend: N = rows of the input (tokens, 1..~8), C = input width, R = output rows,
// E = experts, K = experts chosen for the token, D = model width, F = expert hidden width,
// H = input-projection rows (2F for SwiGLU, gate rows first; F for the GELU variants).
//
// Why: at M=1 every weight is read once per token, so decode speed is memory bandwidth. MKL's
// sgemm at M=1 streams 7-17 GB/s on this AMD EPYC; a plain AVX-512 loop over one weight row at
// a time streams 25-35 GB/s (about a plain read's rate). Threads split the rows in contiguous
// ranges so each core streams its own part of the matrix.
//
// Ops (torch.ops.moekit.*; fake implementations live in moekit/kernels/linear.py):
//   linear_f32(x [N, C], w [R, C], bias [R]?) -> [N, R]            y = x @ w^T + bias
//   moe_decode_f32(x [1, D], w_in [E, H, D], w_out [E, D, F], ids [K] int64, gates [K], act) -> [1, D]
//       sum_k gates[k] * w_out[ids[k]] @ act(w_in[ids[k]] @ x), summed in slot order.
//       act: 0 swiglu, 1 gelu (erf), 2 gelu_tanh, 3 quick_gelu.
// Portable builds (no AVX-512) use plain loops the compiler vectorizes.

#include <torch/library.h>

#include "gemv_f32.h"

namespace {

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_f32_cpu(x, "x");
  check_f32_cpu(w, "weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear_f32: x [N, C] and weight [R, C]");
  TORCH_CHECK(x.size(1) == w.size(1), "linear_f32: x has ", x.size(1), " columns, weight ", w.size(1));
  TORCH_CHECK(x.stride(1) == 1 && w.stride(1) == 1, "linear_f32: rows must be contiguous");
  const int64_t nn = x.size(0), c = x.size(1), rows = w.size(0);
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_f32_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == rows && bias->is_contiguous(), "linear_f32: bias [R]");
    bp = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({nn, rows}, x.options());
  if (nn == 0 || rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldw = w.stride(0);
  const int nt = threads_for(rows * c * 4);
  if (nt == 1) {
    rows_range(xp, ldx, nn, wp, ldw, c, yp, rows, bp, 0, rows);
    return y;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t lo, hi;
    share(rows, omp_get_thread_num(), omp_get_num_threads(), 16, &lo, &hi);
    if (lo < hi) rows_range(xp, ldx, nn, wp, ldw, c, yp, rows, bp, lo, hi);
  }
  return y;
}

at::Tensor moe_decode_f32(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out,
                          const at::Tensor& ids, const at::Tensor& gates, int64_t act) {
  check_f32_cpu(x, "x");
  check_f32_cpu(w_in, "w_in");
  check_f32_cpu(w_out, "w_out");
  check_f32_cpu(gates, "gates");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.device().is_cpu(), "moe_decode_f32: ids int64 CPU");
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3 && w_in.is_contiguous() && w_out.is_contiguous(),
              "moe_decode_f32: contiguous w_in [E, H, D] and w_out [E, D, F]");
  const int64_t e = w_in.size(0), h = w_in.size(1), d = w_in.size(2), f = w_out.size(2);
  TORCH_CHECK(w_out.size(0) == e && w_out.size(1) == d, "moe_decode_f32: w_out must be [E, D, F]");
  TORCH_CHECK(act >= 0 && act <= 3, "moe_decode_f32: act must be 0..3");
  TORCH_CHECK(h == (act == 0 ? 2 * f : f), "moe_decode_f32: w_in rows ", h, " do not fit F=", f);
  TORCH_CHECK(x.numel() == d && x.is_contiguous(), "moe_decode_f32: x must be [1, D] contiguous");
  at::Tensor ids_c = ids.reshape({-1}).contiguous();
  at::Tensor gates_c = gates.reshape({-1}).contiguous();
  const int64_t k = ids_c.numel();
  TORCH_CHECK(gates_c.numel() == k, "moe_decode_f32: ", k, " ids but ", gates_c.numel(), " gates");
  const int64_t* idp = ids_c.data_ptr<int64_t>();
  for (int64_t s = 0; s < k; ++s)
    TORCH_CHECK(idp[s] >= 0 && idp[s] < e, "moe_decode_f32: expert id ", idp[s], " out of range");
  at::Tensor y = at::empty({1, d}, x.options());
  if (k == 0) return y.zero_();
  at::Tensor scratch = at::empty({k * (h + f)}, x.options());
  float* h_KH = scratch.data_ptr<float>();
  float* a_KF = h_KH + k * h;
  const float* xp = x.data_ptr<float>();
  const float* wi = w_in.data_ptr<float>();
  const float* wo = w_out.data_ptr<float>();
  const float* gp = gates_c.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int nt = threads_for(k * (h * d + d * f) * 4);
  if (nt == 1) {
    moe_thread(0, 1, xp, wi, wo, idp, gp, k, d, f, h, act, h_KH, a_KF, yp, false);
    return y;
  }
#pragma omp parallel num_threads(nt)
  moe_thread(omp_get_thread_num(), omp_get_num_threads(), xp, wi, wo, idp, gp, k, d, f, h, act, h_KH,
             a_KF, yp, true);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("linear_f32(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("moe_decode_f32(Tensor x, Tensor w_in, Tensor w_out, Tensor ids, Tensor gates, int act) -> Tensor");
}

TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("moe_decode_f32", &moe_decode_f32);
}
