// Shared fp32 GEMV primitives for the decode kernels (decode_f32.cpp, decode_step.cpp).
//
// Shape legend: N = rows of the input (tokens, 1..~8), C = input width, R = output rows,
// E = experts, K = experts chosen for the token, D = model width, F = expert hidden width,
// H = input-projection rows (2F for SwiGLU, gate rows first; F for the GELU variants).
//
// Everything here is `inline` in an anonymous namespace, so each kernel source that includes it
// gets its own copy (they are built as separate libraries). build.py hashes this header into
// every kernel's build key, so a change here rebuilds them all.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#else  // a build without OpenMP runs every op on one thread
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// Below this many weight bytes a second thread costs more (fork/join, ~2-5 us) than it saves.
constexpr int64_t kParallelBytes = 96 * 1024;
constexpr int64_t kNBlock = 4;  // input rows per pass over a weight row (4 accumulators each)

// y[n * ldy + r] = dot(x[n * ldx :], w[r * ldw :]) (+ bias[r]) for r in [r0, r1), n in [0, nn).
#ifdef __AVX512F__
// One weight row at a time, read once for all NN input rows: a single sequential stream, which
// the hardware prefetcher follows best (measured here: 28-34 GB/s on one core, against 22-26 for
// 4 rows interleaved per pass). Four accumulators per input row hide the FMA latency. Each
// (n, r) result is summed in the same order whatever NN is, so a row batched with others gets
// bitwise the result it gets alone.
template <int NN>
inline void row_nn(const float* x, int64_t ldx, const float* wr, int64_t c, float* out, int64_t ldo,
                   float b) {
  __m512 acc[NN][4];
  for (int n = 0; n < NN; ++n)
    for (int i = 0; i < 4; ++i) acc[n][i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 64 <= c; j += 64) {
    const __m512 w0 = _mm512_loadu_ps(wr + j), w1 = _mm512_loadu_ps(wr + j + 16);
    const __m512 w2 = _mm512_loadu_ps(wr + j + 32), w3 = _mm512_loadu_ps(wr + j + 48);
    for (int n = 0; n < NN; ++n) {
      const float* xn = x + n * ldx + j;
      acc[n][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xn), acc[n][0]);
      acc[n][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xn + 16), acc[n][1]);
      acc[n][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xn + 32), acc[n][2]);
      acc[n][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xn + 48), acc[n][3]);
    }
  }
  for (int i = 0; j + 16 <= c; j += 16, ++i) {
    const __m512 wv = _mm512_loadu_ps(wr + j);
    for (int n = 0; n < NN; ++n) acc[n][i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + n * ldx + j), acc[n][i]);
  }
  if (j < c) {
    const __mmask16 m = static_cast<__mmask16>((1u << (c - j)) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(m, wr + j);
    for (int n = 0; n < NN; ++n)
      acc[n][3] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + n * ldx + j), acc[n][3]);
  }
  for (int n = 0; n < NN; ++n) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[n][0], acc[n][1]), _mm512_add_ps(acc[n][2], acc[n][3]));
    out[n * ldo] = _mm512_reduce_add_ps(s) + b;
  }
}

template <int NN>
inline void rows_range_nn(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t c, float* y,
                   int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) row_nn<NN>(x, ldx, w + r * ldw, c, y + r, ldy, bias ? bias[r] : 0.f);
}

inline void rows_range(const float* x, int64_t ldx, int64_t nn, const float* w, int64_t ldw, int64_t c,
                float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  // Input rows in groups of up to 4 (16 accumulators); a later group re-reads the weights only
  // when N > 4, from cache when the thread's share of rows fits in L2.
  for (int64_t n0 = 0; n0 < nn; n0 += kNBlock) {
    const float* xn = x + n0 * ldx;
    float* yn = y + n0 * ldy;
    switch (std::min<int64_t>(kNBlock, nn - n0)) {
      case 1: rows_range_nn<1>(xn, ldx, w, ldw, c, yn, ldy, bias, r0, r1); break;
      case 2: rows_range_nn<2>(xn, ldx, w, ldw, c, yn, ldy, bias, r0, r1); break;
      case 3: rows_range_nn<3>(xn, ldx, w, ldw, c, yn, ldy, bias, r0, r1); break;
      default: rows_range_nn<4>(xn, ldx, w, ldw, c, yn, ldy, bias, r0, r1); break;
    }
  }
}

inline float dot(const float* a, const float* b, int64_t c) {
  float out;
  row_nn<1>(b, 0, a, c, &out, 0, 0.f);
  return out;
}
#else   // portable: the compiler vectorizes these loops for whatever the target has
inline void rows_range(const float* x, int64_t ldx, int64_t nn, const float* w, int64_t ldw, int64_t c,
                float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * ldw;
    for (int64_t n = 0; n < nn; ++n) {
      const float* xn = x + n * ldx;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < c; ++j) acc += wr[j] * xn[j];
      y[n * ldy + r] = acc + (bias ? bias[r] : 0.f);
    }
  }
}

inline float dot(const float* a, const float* b, int64_t c) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < c; ++j) acc += a[j] * b[j];
  return acc;
}
#endif

// The contiguous share [lo, hi) of `total` rows for thread `t` of `nt`, in multiples of `align`
// rows so threads never write the same cache line of the output.
inline void share(int64_t total, int t, int nt, int64_t align, int64_t* lo, int64_t* hi) {
  const int64_t units = (total + align - 1) / align;
  const int64_t per = units / nt, extra = units % nt;
  const int64_t u0 = t * per + std::min<int64_t>(t, extra);
  const int64_t u1 = u0 + per + (t < extra ? 1 : 0);
  *lo = std::min(total, u0 * align);
  *hi = std::min(total, u1 * align);
}

inline int threads_for(int64_t weight_bytes) {
  int nt = at::get_num_threads();
#ifdef _OPENMP
  if (omp_in_parallel()) nt = 1;
#else
  nt = 1;
#endif
  return weight_bytes < kParallelBytes ? 1 : std::max(1, nt);
}

inline void check_f32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }
inline float act_one(float h, int64_t act) {
  switch (act) {
    case 1: return 0.5f * h * (1.f + std::erf(h * 0.70710678118654752f));
    case 2: return 0.5f * h * (1.f + std::tanh(0.79788456080286535f * (h + 0.044715f * h * h * h)));
    case 3: return h / (1.f + std::exp(-1.702f * h));
    default: return h;
  }
}

// One thread's part of the fused expert op. Phase 1 (rows of the hidden width F, the same
// range for every chosen expert): for SwiGLU the thread computes gate rows [f0, f1) and the
// matching up rows, so it can apply the activation without waiting for anyone. Phase 2 (after
// one barrier): output rows [d0, d1), each the gate-weighted sum over slots of w_out rows.
inline void moe_thread(int t, int nt, const float* x, const float* w_in, const float* w_out,
                const int64_t* ids, const float* gates, int64_t k, int64_t d, int64_t f, int64_t h,
                int64_t act, float* h_KH, float* a_KF, float* y, bool barrier) {
  int64_t f0, f1;
  share(f, t, nt, 16, &f0, &f1);
  for (int64_t s = 0; s < k; ++s) {
    const float* wi = w_in + ids[s] * h * d;
    float* hs = h_KH + s * h;
    float* as = a_KF + s * f;
    if (f0 < f1) {
      rows_range(x, d, 1, wi, d, d, hs, h, nullptr, f0, f1);
      if (act == 0) {
        rows_range(x, d, 1, wi, d, d, hs, h, nullptr, f + f0, f + f1);
        for (int64_t j = f0; j < f1; ++j) as[j] = silu(hs[j]) * hs[f + j];
      } else {
        for (int64_t j = f0; j < f1; ++j) as[j] = act_one(hs[j], act);
      }
    }
  }
#ifdef _OPENMP
  if (barrier) {
#pragma omp barrier
  }
#endif
  // Slot-major: the thread streams its block of rows [d0, d1) of one expert's w_out (contiguous
  // in memory) before the next expert's, so the prefetcher sees one long stream per slot instead
  // of K streams alternating every F floats.
  // y[r] still sums the slots in slot order, so the result is bitwise the row-major one's.
  int64_t d0, d1;
  share(d, t, nt, 16, &d0, &d1);
  for (int64_t s = 0; s < k; ++s) {
    const float* wo = w_out + ids[s] * d * f;
    const float* as = a_KF + s * f;
    const float g = gates[s];
    for (int64_t r = d0; r < d1; ++r) {
      const float v = dot(wo + r * f, as, f) * g;
      y[r] = s == 0 ? v : y[r] + v;
    }
  }
}

}  // namespace
