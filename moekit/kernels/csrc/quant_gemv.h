// Shared quantized-GEMV primitives (quant_gemv.cpp, decode_step.cpp): activation quantization in
// blocks of 32 and the VNNI kernels over group-wise asymmetric codes. See quant_gemv.cpp for the
// math and the kernel layouts. build.py hashes this header into every kernel's build key.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MOEKIT_VNNI 1
#else
#define MOEKIT_VNNI 0
#endif

namespace {

constexpr int64_t QBLOCK = 32;  // activation block (llama.cpp's q8_0 block)
constexpr int64_t CHUNK = 64;   // columns per kernel step: one 512-bit register of int8
constexpr int MAX_ROWS = 8;     // activation rows per weight pass

inline float half_to_float(const at::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);  // one instruction; c10's portable conversion is bit twiddling
#else
  return static_cast<float>(h);
#endif
}

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

// The 4-bit layout: 128-column super-chunks of 64 bytes (low nibbles: columns 0..63, high nibbles:
// columns 64..127, so one 512-bit load and two masks give two chunks), then, when C % 128 == 64, one
// 64-column tail of 32 bytes (low nibbles: columns 0..31, high: 32..63).
inline int32_t nibble_code(const uint8_t* wr, int64_t c, int64_t col) {
  const int64_t supers = c / 128;
  if (col < supers * 128) {
    const int64_t j = col % 128;
    const uint8_t byte = wr[(col / 128) * 64 + j % 64];
    return j < 64 ? (byte & 15) : (byte >> 4);
  }
  const int64_t j = col - supers * 128;
  const uint8_t byte = wr[supers * 64 + j % 32];
  return j < 32 ? (byte & 15) : (byte >> 4);
}

#if MOEKIT_VNNI
// Chunk ch (64 columns) of a row as 64 unsigned codes.
template <bool NIBBLE>
inline __m512i load_chunk(const uint8_t* wr, int64_t c, int64_t ch) {
  if constexpr (NIBBLE) {
    const __m512i m = _mm512_set1_epi8(0x0F);
    const int64_t supers = c / 128;
    if (ch / 2 < supers) {
      const __m512i v = _mm512_loadu_si512(wr + (ch / 2) * 64);
      return ch % 2 ? _mm512_and_si512(_mm512_srli_epi16(v, 4), m) : _mm512_and_si512(v, m);
    }
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + supers * 64));
    const __m256i m2 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, m2);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m2);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  } else {
    return _mm512_loadu_si512(wr + ch * CHUNK);
  }
}
#endif

// Group layouts of the decode kernel (a template argument, so no division in the inner loops):
// GK 0: g % 128 == 0 (whole 128-column pairs of chunks per group, the weight scale applied once
// per group); GK 1: g == 64 (one group per chunk); GK 2: g == 32 (two groups per chunk).
#if MOEKIT_VNNI
// Weight scales of chunk ch as 16 lanes (lanes 0-7: its first 32 columns), GK 1 or 2.
template <int GK>
inline __m512 chunk_scale(const at::Half* sr, int64_t ch) {
  if constexpr (GK == 2) {
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(half_to_float(sr[2 * ch])),
                                _mm512_set1_ps(half_to_float(sr[2 * ch + 1])));
  } else {
    return _mm512_set1_ps(half_to_float(sr[ch]));
  }
}

// Chunks 2s and 2s + 1 of a row (s < C / 128) as two registers of 64 unsigned codes.
template <bool NIBBLE>
inline void load_pair(const uint8_t* wr, int64_t s, __m512i& wa, __m512i& wb) {
  if constexpr (NIBBLE) {
    const __m512i m = _mm512_set1_epi8(0x0F);
    const __m512i v = _mm512_loadu_si512(wr + s * 64);
    wa = _mm512_and_si512(v, m);
    wb = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  } else {
    wa = _mm512_loadu_si512(wr + s * 128);
    wb = _mm512_loadu_si512(wr + s * 128 + 64);
  }
}
#endif

// One activation row (decode) against TR weight rows at a time: each activation chunk is loaded
// once for TR rows, and TR (x2) independent accumulator chains hide the FMA latency.
template <int TR, bool NIBBLE, int GK>
void gemv_tile1(const uint8_t* codes, const at::Half* scale, const uint8_t* zero, const QAct& a, int64_t a_row,
                int64_t group, int64_t r, float* y) {
  const int64_t c = a.c, groups = a.groups, nc = c / CHUNK;
  const int64_t row_bytes = NIBBLE ? c / 2 : c;
  const int8_t* xq = a.q.data() + a_row * c;
  const float* dv = a.dvec.data() + a_row * nc * 16;
  const float* xg = a.xg.data() + a_row * groups;
  float corr[TR] = {};
#if MOEKIT_VNNI
  // The zero-point term, 16 groups per step (at g = 32 a scalar loop here cost as much as the dot).
  for (int t = 0; t < TR; ++t) {
    const at::Half* sr = scale + (r + t) * groups;
    const uint8_t* zr = zero + (r + t) * groups;
    __m512 cv = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const int64_t left = groups - g;
      const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, sr + g));
      const __m512 zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, zr + g)));
      cv = _mm512_fmadd_ps(_mm512_mul_ps(sv, zv), _mm512_maskz_loadu_ps(m, xg + g), cv);
    }
    corr[t] = _mm512_reduce_add_ps(cv);
  }
#else
  for (int t = 0; t < TR; ++t) {
    const at::Half* sr = scale + (r + t) * groups;
    const uint8_t* zr = zero + (r + t) * groups;
    for (int64_t g = 0; g < groups; ++g) corr[t] += half_to_float(sr[g]) * static_cast<float>(zr[g]) * xg[g];
  }
#endif
#if MOEKIT_VNNI
  __m512 acc[TR], acc2[TR];
  for (int t = 0; t < TR; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
  const __m512i zero_i = _mm512_setzero_si512();
  if constexpr (GK == 0) {
    const int64_t pairs_per_group = group / 128;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 ga[TR], gb[TR];
      for (int t = 0; t < TR; ++t) ga[t] = gb[t] = _mm512_setzero_ps();
      for (int64_t s = g * pairs_per_group; s < (g + 1) * pairs_per_group; ++s) {
        const __m512i xa = _mm512_loadu_si512(xq + s * 128), xb = _mm512_loadu_si512(xq + s * 128 + 64);
        const __m512 da = _mm512_loadu_ps(dv + s * 32), db = _mm512_loadu_ps(dv + s * 32 + 16);
        for (int t = 0; t < TR; ++t) {
          __m512i wa, wb;
          load_pair<NIBBLE>(codes + (r + t) * row_bytes, s, wa, wb);
          ga[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero_i, wa, xa)), da, ga[t]);
          gb[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero_i, wb, xb)), db, gb[t]);
        }
      }
      for (int t = 0; t < TR; ++t) {
        const __m512 sv = _mm512_set1_ps(half_to_float(scale[(r + t) * groups + g]));
        acc[t] = _mm512_fmadd_ps(ga[t], sv, acc[t]);
        acc2[t] = _mm512_fmadd_ps(gb[t], sv, acc2[t]);
      }
    }
  } else {
    // Weight scales: 16 float16 values converted at once per row, then each chunk's scale vector
    // is one permute of them (lanes 0-7 its first block's scale, 8-15 its second's). Converting
    // and broadcasting two scalars per chunk instead cost more instructions than the dot itself.
    // A pair of chunks uses 4 scales at g = 32 (GK 2) and 2 at g = 64 (GK 1).
    constexpr int64_t per_pair = GK == 2 ? 4 : 2, pairs_per_load = 16 / per_pair;
    const __m512i lanes_lo = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 sv[TR];
    const int64_t pairs = nc / 2;
    for (int64_t s = 0; s < pairs; ++s) {
      if (s % pairs_per_load == 0) {
        const int64_t first = s * per_pair, left = groups - first;
        const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
        for (int t = 0; t < TR; ++t)
          sv[t] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scale + (r + t) * groups + first));
      }
      const int lane = static_cast<int>((s % pairs_per_load) * per_pair);
      const __m512i ia = GK == 2 ? _mm512_add_epi32(lanes_lo, _mm512_set1_epi32(lane)) : _mm512_set1_epi32(lane);
      const __m512i ib = GK == 2 ? _mm512_add_epi32(lanes_lo, _mm512_set1_epi32(lane + 2))
                                 : _mm512_set1_epi32(lane + 1);
      const __m512i xa = _mm512_loadu_si512(xq + s * 128), xb = _mm512_loadu_si512(xq + s * 128 + 64);
      const __m512 da = _mm512_loadu_ps(dv + s * 32), db = _mm512_loadu_ps(dv + s * 32 + 16);
      for (int t = 0; t < TR; ++t) {
        __m512i wa, wb;
        load_pair<NIBBLE>(codes + (r + t) * row_bytes, s, wa, wb);
        const __m512 pa = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero_i, wa, xa));
        const __m512 pb = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero_i, wb, xb));
        acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(pa, da), _mm512_permutexvar_ps(ia, sv[t]), acc[t]);
        acc2[t] = _mm512_fmadd_ps(_mm512_mul_ps(pb, db), _mm512_permutexvar_ps(ib, sv[t]), acc2[t]);
      }
    }
    if (nc % 2) {  // a last lone chunk (C % 128 == 64)
      const int64_t ch = nc - 1;
      const __m512i x = _mm512_loadu_si512(xq + ch * CHUNK);
      const __m512 d = _mm512_loadu_ps(dv + ch * 16);
      for (int t = 0; t < TR; ++t) {
        const uint8_t* wr = codes + (r + t) * row_bytes;
        __m512i w;
        if constexpr (NIBBLE) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + pairs * 64));
          const __m256i m = _mm256_set1_epi8(0x0F);
          w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)),
                                 _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
        } else {
          w = _mm512_loadu_si512(wr + ch * CHUNK);
        }
        const __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero_i, w, x));
        acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(p, d), chunk_scale<GK>(scale + (r + t) * groups, ch), acc[t]);
      }
    }
  }
  for (int t = 0; t < TR; ++t) y[r + t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t])) - corr[t];
#else
  for (int t = 0; t < TR; ++t) {
    const uint8_t* wr = codes + (r + t) * row_bytes;
    const at::Half* sr = scale + (r + t) * groups;
    float acc = 0.f;
    for (int64_t b = 0; b < c / QBLOCK; ++b) {
      int32_t dot = 0;
      for (int k = 0; k < QBLOCK; ++k) {
        const int64_t col = b * QBLOCK + k;
        const int32_t q = NIBBLE ? nibble_code(wr, c, col) : wr[col];
        dot += q * static_cast<int32_t>(xq[col]);
      }
      acc += half_to_float(sr[b * QBLOCK / group]) * dv[(b / 2) * 16 + (b % 2) * 8] * static_cast<float>(dot);
    }
    y[r + t] = acc - corr[t];
  }
#endif
}

template <bool NIBBLE, int GK>
void gemv_decode(const uint8_t* codes, const at::Half* scale, const uint8_t* zero, const QAct& a, int64_t a_row,
                 int64_t group, int64_t r0, int64_t r1, float* y) {
  // Measured (benchmarks/bench_quant_kernels.py): 4-bit rows gain from 4-row tiles (more unpack
  // work per byte to overlap); 8-bit rows stream fastest one at a time (2- and 4-row tiles halved
  // the rate here).
  constexpr int TR = NIBBLE ? 4 : 1;
  int64_t r = r0;
  for (; r + TR <= r1; r += TR) gemv_tile1<TR, NIBBLE, GK>(codes, scale, zero, a, a_row, group, r, y);
  for (; r < r1; ++r) gemv_tile1<1, NIBBLE, GK>(codes, scale, zero, a, a_row, group, r, y);
}

// y[i, r] for r in [r0, r1), i < NR: NR activation rows against one pass over the weight rows.
template <int NR, bool NIBBLE>
void gemv_rows(const uint8_t* codes, const at::Half* scale, const uint8_t* zero, const QAct& a, int64_t a_row0,
               int64_t group, int64_t r0, int64_t r1, float* y, int64_t y_stride) {
  if constexpr (NR == 1) {
    if (group % 128 == 0) return gemv_decode<NIBBLE, 0>(codes, scale, zero, a, a_row0, group, r0, r1, y);
    if (group == CHUNK) return gemv_decode<NIBBLE, 1>(codes, scale, zero, a, a_row0, group, r0, r1, y);
    return gemv_decode<NIBBLE, 2>(codes, scale, zero, a, a_row0, group, r0, r1, y);
  }
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
    for (int64_t ch = 0; ch < nc; ++ch) {
      const __m512i w = load_chunk<NIBBLE>(wr, c, ch);
      const __m512 s = group == QBLOCK ? _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(half_to_float(sr[2 * ch])),
                                                              _mm512_set1_ps(half_to_float(sr[2 * ch + 1])))
                                       : _mm512_set1_ps(half_to_float(sr[ch * CHUNK / group]));
      for (int i = 0; i < NR; ++i) {
        const __m512i x = _mm512_loadu_si512(xq + i * c + ch * CHUNK);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
        const __m512 ds = _mm512_mul_ps(_mm512_loadu_ps(dv + (i * nc + ch) * 16), s);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), ds, acc[i]);
      }
    }
    for (int i = 0; i < NR; ++i) y[i * y_stride + r] = _mm512_reduce_add_ps(acc[i]) - corr[i];
#else
    float acc[NR] = {};
    for (int64_t b = 0; b < c / QBLOCK; ++b) {
      const float s = half_to_float(sr[b * QBLOCK / group]);
      for (int i = 0; i < NR; ++i) {
        int32_t dot = 0;
        const int8_t* x = xq + i * c;
        for (int k = 0; k < QBLOCK; ++k) {
          const int64_t col = b * QBLOCK + k;
          const int32_t q = NIBBLE ? nibble_code(wr, c, col) : wr[col];
          dot += q * static_cast<int32_t>(x[col]);
        }
        acc[i] += s * dv[(i * nc + b / 2) * 16 + (b % 2) * 8] * static_cast<float>(dot);
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

}  // namespace
