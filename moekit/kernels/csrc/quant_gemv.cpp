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
// Kernel layouts (built by qlinear.py at load time; the saved format is unchanged):
//     bits 8: codes uint8 [R, C] (the stored qweight as is);
//     bits <= 4: uint8 [R, C / 2], per 64-column chunk 32 bytes whose low nibbles hold columns
//         0..31 and whose high nibbles hold columns 32..63 (one AND and one shift unpack a chunk).
// Needs C % 64 == 0 and g % 32 == 0 (g == 32 or g % 64 == 0).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define MOEKIT_VNNI 1
#else
#define MOEKIT_VNNI 0
#endif

namespace {

constexpr int64_t QBLOCK = 32;  // activation block (llama.cpp's q8_0 block)
constexpr int64_t CHUNK = 64;   // columns per kernel step: one 512-bit register of int8
constexpr int MAX_ROWS = 8;     // activation rows per weight pass

inline float half_to_float(const at::Half h) { return static_cast<float>(h); }

// Quantized activations of N rows: xq [N, C], per 64-column chunk a 16-lane vector of block scales
// (lanes 0-7: the chunk's first block, 8-15: its second; dpbusd lane i covers columns 4i..4i+3),
// and per weight group the zero-point term's factor X_g = sum_{b in g} d_b sum(xq_b).
struct QAct {
  int64_t n, c, groups;
  std::vector<int8_t> q;    // [N, C]
  std::vector<float> dvec;  // [N, C / 64, 16]
  std::vector<float> xg;    // [N, G]
};

void quantize_block(const float* x, int8_t* q, float* d_out, int32_t* sum_out) {
  float amax = 0.f;
  for (int k = 0; k < QBLOCK; ++k) amax = std::fmax(amax, std::fabs(x[k]));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
#if MOEKIT_VNNI
  for (int h = 0; h < 2; ++h) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * h), _mm512_set1_ps(id)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * h), _mm512_cvtsepi32_epi8(v));
    sum += _mm512_reduce_add_epi32(v);
  }
#else
  for (int k = 0; k < QBLOCK; ++k) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[k] * id));  // round half to even
    q[k] = static_cast<int8_t>(v);
    sum += v;
  }
#endif
  *d_out = d;
  *sum_out = sum;
}

void quantize_rows(const float* x, int64_t n, int64_t c, int64_t group, QAct& a) {
  const int64_t nb = c / QBLOCK, nc = c / CHUNK, bpg = group / QBLOCK;
  a.n = n;
  a.c = c;
  a.groups = c / group;
  a.q.resize(n * c);
  a.dvec.resize(n * nc * 16);
  a.xg.assign(n * a.groups, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      float d;
      int32_t s;
      quantize_block(x + i * c + b * QBLOCK, a.q.data() + i * c + b * QBLOCK, &d, &s);
      float* lanes = a.dvec.data() + (i * nc + b / 2) * 16 + (b % 2) * 8;
      for (int l = 0; l < 8; ++l) lanes[l] = d;
      a.xg[i * a.groups + b / bpg] += d * static_cast<float>(s);
    }
  }
}

// y[i, r] for r in [r0, r1), i < NR: NR activation rows against one weight pass.
template <int NR, bool NIBBLE>
void gemv_rows(const uint8_t* codes, const at::Half* scale, const uint8_t* zero, const QAct& a, int64_t a_row0,
               int64_t group, int64_t r0, int64_t r1, float* y, int64_t y_stride) {
  const int64_t c = a.c, groups = a.groups, nc = c / CHUNK;
  const int64_t row_bytes = NIBBLE ? c / 2 : c;
  const int8_t* xq = a.q.data() + a_row0 * c;
  const float* dv = a.dvec.data() + a_row0 * nc * 16;
  const float* xg = a.xg.data() + a_row0 * groups;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wr = codes + r * row_bytes;
    const at::Half* sr = scale + r * groups;
    const uint8_t* zr = zero + r * groups;
    float corr[NR] = {};
    for (int64_t g = 0; g < groups; ++g) {
      const float sz = half_to_float(sr[g]) * static_cast<float>(zr[g]);
      for (int i = 0; i < NR; ++i) corr[i] += sz * xg[i * groups + g];
    }
#if MOEKIT_VNNI
    __m512 acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
    auto load_chunk = [&](int64_t ch) -> __m512i {
      if constexpr (NIBBLE) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + ch * 32));
        const __m256i m = _mm256_set1_epi8(0x0F);
        const __m256i lo = _mm256_and_si256(v, m);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      } else {
        return _mm512_loadu_si512(wr + ch * CHUNK);
      }
    };
    if (group % CHUNK == 0) {
      const int64_t cpg = group / CHUNK;
      for (int64_t g = 0; g < groups; ++g) {
        __m512 gacc[NR];
        for (int i = 0; i < NR; ++i) gacc[i] = _mm512_setzero_ps();
        for (int64_t ch = g * cpg; ch < (g + 1) * cpg; ++ch) {
          const __m512i w = load_chunk(ch);
          for (int i = 0; i < NR; ++i) {
            const __m512i x = _mm512_loadu_si512(xq + i * c + ch * CHUNK);
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
            gacc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(dv + (i * nc + ch) * 16), gacc[i]);
          }
        }
        const __m512 s = _mm512_set1_ps(half_to_float(sr[g]));
        for (int i = 0; i < NR; ++i) acc[i] = _mm512_fmadd_ps(gacc[i], s, acc[i]);
      }
    } else {  // g == 32: a chunk spans two groups
      for (int64_t ch = 0; ch < nc; ++ch) {
        const __m512i w = load_chunk(ch);
        const __m512 s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(half_to_float(sr[2 * ch])),
                                              _mm512_set1_ps(half_to_float(sr[2 * ch + 1])));
        for (int i = 0; i < NR; ++i) {
          const __m512i x = _mm512_loadu_si512(xq + i * c + ch * CHUNK);
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
          const __m512 ds = _mm512_mul_ps(_mm512_loadu_ps(dv + (i * nc + ch) * 16), s);
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), ds, acc[i]);
        }
      }
    }
    for (int i = 0; i < NR; ++i) y[i * y_stride + r] = _mm512_reduce_add_ps(acc[i]) - corr[i];
#else
    float acc[NR] = {};
    const int64_t bpg = group / QBLOCK;
    for (int64_t b = 0; b < c / QBLOCK; ++b) {
      const float s = half_to_float(sr[b / bpg]);
      const int64_t ch = b / 2, half = b % 2;
      for (int i = 0; i < NR; ++i) {
        int32_t dot = 0;
        const int8_t* x = xq + i * c + b * QBLOCK;
        for (int k = 0; k < QBLOCK; ++k) {
          int32_t q;
          if constexpr (NIBBLE) {
            const uint8_t byte = wr[ch * 32 + k];
            q = half ? (byte >> 4) : (byte & 15);
          } else {
            q = wr[b * QBLOCK + k];
          }
          dot += q * static_cast<int32_t>(x[k]);
        }
        acc[i] += s * dv[(i * nc + ch) * 16 + half * 8] * static_cast<float>(dot);
      }
    }
    for (int i = 0; i < NR; ++i) y[i * y_stride + r] = acc[i] - corr[i];
#endif
  }
}

template <bool NIBBLE>
void gemv_dispatch(int nr, const uint8_t* codes, const at::Half* scale, const uint8_t* zero, const QAct& a,
                   int64_t a_row0, int64_t group, int64_t r0, int64_t r1, float* y, int64_t y_stride) {
  switch (nr) {
#define MOEKIT_CASE(K) \
  case K:              \
    return gemv_rows<K, NIBBLE>(codes, scale, zero, a, a_row0, group, r0, r1, y, y_stride);
    MOEKIT_CASE(1) MOEKIT_CASE(2) MOEKIT_CASE(3) MOEKIT_CASE(4)
    MOEKIT_CASE(5) MOEKIT_CASE(6) MOEKIT_CASE(7) MOEKIT_CASE(8)
#undef MOEKIT_CASE
    default:
      TORCH_CHECK(false, "gemv_dispatch: bad row count ", nr);
  }
}

// One quantized matrix as raw pointers (checked once by check_matrix).
struct QMat {
  const uint8_t* codes;
  const at::Half* scale;
  const uint8_t* zero;
  int64_t rows, cols, group;
  bool nibble;
};

QMat check_matrix(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                  int64_t group, int64_t cols) {
  TORCH_CHECK(bits == 8 || (bits >= 1 && bits <= 4), "quant_gemv: bits must be 8 or 1..4, got ", bits);
  TORCH_CHECK(cols % CHUNK == 0, "quant_gemv: input width ", cols, " is not a multiple of 64");
  TORCH_CHECK(group % QBLOCK == 0 && (group == QBLOCK || group % CHUNK == 0) && cols % group == 0,
              "quant_gemv: group size ", group, " must be 32 or a multiple of 64 dividing ", cols);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2,
              "quant_gemv: codes must be contiguous uint8 [R, C'], got ", codes.sizes());
  const bool nibble = bits <= 4;
  const int64_t rows = codes.size(0);
  TORCH_CHECK(codes.size(1) == (nibble ? cols / 2 : cols), "quant_gemv: codes width ", codes.size(1),
              " does not fit ", cols, " columns at ", bits, " bits");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && zero.scalar_type() == at::kByte &&
                  zero.is_contiguous(),
              "quant_gemv: scale must be contiguous float16 and zero contiguous uint8");
  TORCH_CHECK(scale.numel() == rows * (cols / group) && zero.numel() == rows * (cols / group),
              "quant_gemv: scale/zero must be [R, G] = [", rows, ", ", cols / group, "]");
  return {codes.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), zero.data_ptr<uint8_t>(), rows, cols, group, nibble};
}

// y [N, R] = the quantized product over rows [r0, r1) (serial); N may exceed 8 (passes of 8).
void matvec_range(const QMat& w, const QAct& a, int64_t r0, int64_t r1, float* y) {
  for (int64_t i0 = 0; i0 < a.n; i0 += MAX_ROWS) {
    const int nr = static_cast<int>(std::min<int64_t>(MAX_ROWS, a.n - i0));
    if (w.nibble) {
      gemv_dispatch<true>(nr, w.codes, w.scale, w.zero, a, i0, w.group, r0, r1, y + i0 * w.rows, w.rows);
    } else {
      gemv_dispatch<false>(nr, w.codes, w.scale, w.zero, a, i0, w.group, r0, r1, y + i0 * w.rows, w.rows);
    }
  }
}

constexpr int64_t ROW_GRAIN = 16;

at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                    int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "q_linear: x must be float32 [N, C]");
  const auto xc = x.contiguous();
  const QMat w = check_matrix(codes, scale, zero, bits, group, xc.size(1));
  QAct a;
  quantize_rows(xc.data_ptr<float>(), xc.size(0), xc.size(1), group, a);
  auto y = at::empty({xc.size(0), w.rows}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, w.rows, ROW_GRAIN, [&](int64_t r0, int64_t r1) { matvec_range(w, a, r0, r1, yp); });
  return y;
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
  m.def("q_has_vnni() -> int", &q_has_vnni);
}

TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("q_linear", &q_linear);
  m.impl("q_experts_token", &q_experts_token);
}
