// Shared quantized-GEMV primitives (quant_gemv.cpp, decode_step.cpp): activation quantization in
// blocks of 32 and the VNNI kernels over group-wise asymmetric codes. See quant_gemv.cpp for the
// math and the kernel layouts. build.py hashes this header into every kernel's build key.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
constexpr int MAX_ROWS = 8;     // activation rows per weight pass

inline float half_to_float(const at::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);  // one instruction; c10's portable conversion is bit twiddling
#else
  return static_cast<float>(h);
#endif
}

// Quantized activations of N rows: xq [N, C], the block scales d [N, B], and per weight group the
// zero-point term's factor X_g = sum_{b in g} d_b sum(xq_b) [N, G].
struct QAct {
  int64_t n, c, groups;
  std::vector<int8_t> q;  // [N, C]
  std::vector<float> d;   // [N, B]
  std::vector<float> xg;  // [N, G]
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
  const int64_t nb = c / QBLOCK, bpg = group / QBLOCK;
  a.n = n;
  a.c = c;
  a.groups = c / group;
  a.q.resize(n * c);
  a.d.resize(n * nb);
  a.xg.assign(n * a.groups, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      int32_t s;
      quantize_block(x + i * c + b * QBLOCK, a.q.data() + i * c + b * QBLOCK, a.d.data() + i * nb + b, &s);
      a.xg[i * a.groups + b / bpg] += a.d[i * nb + b] * static_cast<float>(s);
    }
  }
}

// The weight layout: row tiles of TILE rows (the last tile holds the R % TILE rest, h rows), each
// tile's codes block by block (32 columns), and in a block one 4-byte lane per row, so a 512-bit
// register of a full tile holds 16 rows x 4 columns and one dpbusd against 4 broadcast activation
// bytes gives every row its own 4-column partial dot (no horizontal sums anywhere):
//   8 bits: 8 lanes-groups per block, group k byte (t * 4 + j) = code[t][32 b + 4 k + j];
//   <= 4 bits: 4 groups per block, group m byte (t * 4 + j) = code[t][32 b + 4 m + j]
//       | code[t][32 b + 16 + 4 m + j] << 4 (low nibbles: the block's first 16 columns).
// A tile of h rows takes h * row_bytes bytes at byte offset (first row) * row_bytes. Scales and
// zeros follow the tiles too: a tile's [G, h] values (group-major) at offset (first row) * G.
// So every shape is the stored one ([R, row_bytes], [R, G]); only the order within a tile differs.
constexpr int TILE = 16;

// Code of (row t of a tile of h rows, column col) in that tile's bytes.
inline int32_t tile_code(const uint8_t* tc, int h, bool nibble, int t, int64_t col) {
  const int64_t b = col / QBLOCK, k = col % QBLOCK;
  if (!nibble) return tc[b * 32 * h + (k / 4) * 4 * h + t * 4 + k % 4];
  const uint8_t byte = tc[b * 16 * h + ((k % 16) / 4) * 4 * h + t * 4 + k % 4];
  return k < 16 ? (byte & 15) : (byte >> 4);
}

// The portable tile kernel (any CPU; also the oracle of the SIMD one, via q_linear_portable).
template <bool NIBBLE>
void tile_portable(int nr, const uint8_t* tc, const at::Half* ts, const uint8_t* tz, int h, const QAct& a,
                   int64_t i0, float* y, int64_t ystride) {
  const int64_t c = a.c, groups = a.groups, nb = c / QBLOCK, bpg = nb / groups;
  for (int i = 0; i < nr; ++i) {
    const int8_t* xq = a.q.data() + (i0 + i) * c;
    const float* d = a.d.data() + (i0 + i) * nb;
    const float* xg = a.xg.data() + (i0 + i) * groups;
    for (int t = 0; t < h; ++t) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float inner = 0.f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
          int32_t dot = 0;
          for (int64_t col = b * QBLOCK; col < (b + 1) * QBLOCK; ++col)
            dot += tile_code(tc, h, NIBBLE, t, col) * static_cast<int32_t>(xq[col]);
          inner += d[b] * static_cast<float>(dot);
        }
        inner -= static_cast<float>(tz[g * h + t]) * xg[g];
        acc += half_to_float(ts[g * h + t]) * inner;
      }
      y[i * ystride + t] = acc;
    }
  }
}

#if MOEKIT_VNNI
inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// NR activation rows (from i0) against one tile: y[i * ystride + t] for t < h (16 when FULL).
// Per block, the tile's codes are loaded and unpacked once for all NR rows; each row's two
// dpbusd chains (low and high half of the block) are independent across blocks, so the loop is
// bound by the loads, not by latency. A group's block sums are scaled by the activation block
// scales, the zero term subtracted, then the 16 rows' weight scales applied in one FMA.
template <int NR, bool NIBBLE, bool FULL>
void tile_vnni(const uint8_t* tc, const at::Half* ts, const uint8_t* tz, int h, const QAct& a, int64_t i0,
               float* y, int64_t ystride) {
  const int64_t c = a.c, groups = a.groups, nb = c / QBLOCK, bpg = nb / groups;
  const int64_t lane_bytes = FULL ? 4 * TILE : 4 * h;                  // one register's worth
  const int64_t block_bytes = (NIBBLE ? 4 : 8) * lane_bytes;           // one block of the tile
  const __mmask64 cm = h >= 16 ? ~0ULL : (1ULL << (4 * h)) - 1;  // h < 16 on the FULL=false path
  const __mmask16 sm = FULL ? 0xFFFF : static_cast<__mmask16>((1u << h) - 1u);
  const __m512i zero_i = _mm512_setzero_si512(), low = _mm512_set1_epi8(0x0F);
  const int8_t* xq = a.q.data() + i0 * c;
  const float* d = a.d.data() + i0 * nb;
  const float* xg = a.xg.data() + i0 * groups;
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 sw, zw;
    if constexpr (FULL) {
      sw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ts + g * TILE)));
      zw = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tz + g * TILE))));
    } else {
      sw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(sm, ts + g * h));
      zw = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(sm, tz + g * h)));
    }
    __m512 inner[NR];
    for (int i = 0; i < NR; ++i) inner[i] = _mm512_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* wb = tc + b * block_bytes;
      auto load = [&](int k) {
        return FULL ? _mm512_loadu_si512(wb + k * lane_bytes) : _mm512_maskz_loadu_epi8(cm, wb + k * lane_bytes);
      };
      if constexpr (NIBBLE) {
        __m512i lo[4], hi[4];
        for (int m = 0; m < 4; ++m) {
          const __m512i v = load(m);
          lo[m] = _mm512_and_si512(v, low);
          hi[m] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        for (int i = 0; i < NR; ++i) {
          const int8_t* xb = xq + i * c + b * QBLOCK;
          __m512i s0 = _mm512_dpbusd_epi32(zero_i, lo[0], broadcast4(xb));
          __m512i s1 = _mm512_dpbusd_epi32(zero_i, hi[0], broadcast4(xb + 16));
          for (int m = 1; m < 4; ++m) {
            s0 = _mm512_dpbusd_epi32(s0, lo[m], broadcast4(xb + 4 * m));
            s1 = _mm512_dpbusd_epi32(s1, hi[m], broadcast4(xb + 16 + 4 * m));
          }
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
          inner[i] = _mm512_fmadd_ps(dot, _mm512_set1_ps(d[i * nb + b]), inner[i]);
        }
      } else {
        __m512i w[8];
        for (int k = 0; k < 8; ++k) w[k] = load(k);
        for (int i = 0; i < NR; ++i) {
          const int8_t* xb = xq + i * c + b * QBLOCK;
          __m512i s0 = _mm512_dpbusd_epi32(zero_i, w[0], broadcast4(xb));
          __m512i s1 = _mm512_dpbusd_epi32(zero_i, w[1], broadcast4(xb + 4));
          for (int k = 2; k < 8; k += 2) {
            s0 = _mm512_dpbusd_epi32(s0, w[k], broadcast4(xb + 4 * k));
            s1 = _mm512_dpbusd_epi32(s1, w[k + 1], broadcast4(xb + 4 * k + 4));
          }
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
          inner[i] = _mm512_fmadd_ps(dot, _mm512_set1_ps(d[i * nb + b]), inner[i]);
        }
      }
    }
    for (int i = 0; i < NR; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_fnmadd_ps(zw, _mm512_set1_ps(xg[i * groups + g]), inner[i]), sw, acc[i]);
  }
  for (int i = 0; i < NR; ++i) {
    if constexpr (FULL) {
      _mm512_storeu_ps(y + i * ystride, acc[i]);
    } else {
      _mm512_mask_storeu_ps(y + i * ystride, sm, acc[i]);
    }
  }
}

template <bool NIBBLE, bool FULL>
void tile_vnni_rows(int nr, const uint8_t* tc, const at::Half* ts, const uint8_t* tz, int h, const QAct& a,
                    int64_t i0, float* y, int64_t ystride) {
  switch (nr) {
#define MOEKIT_CASE(K) \
  case K:              \
    return tile_vnni<K, NIBBLE, FULL>(tc, ts, tz, h, a, i0, y, ystride);
    MOEKIT_CASE(1) MOEKIT_CASE(2) MOEKIT_CASE(3) MOEKIT_CASE(4)
    MOEKIT_CASE(5) MOEKIT_CASE(6) MOEKIT_CASE(7) MOEKIT_CASE(8)
#undef MOEKIT_CASE
    default:
      TORCH_CHECK(false, "tile_vnni: bad row count ", nr);
  }
}
#endif

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
  TORCH_CHECK(cols % QBLOCK == 0, "quant_gemv: input width ", cols, " is not a multiple of 32");
  TORCH_CHECK(group > 0 && group % QBLOCK == 0 && cols % group == 0, "quant_gemv: group size ", group,
              " must be a multiple of 32 dividing ", cols);
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
// Tiles cut by r0 or r1 (a thread's share need not be tile aligned) go through a small buffer.
void matvec_range(const QMat& w, const QAct& a, int64_t r0, int64_t r1, float* y, bool portable = false) {
  const int64_t row_bytes = w.nibble ? w.cols / 2 : w.cols, groups = w.cols / w.group;
  float buf[MAX_ROWS * TILE];
  for (int64_t i0 = 0; i0 < a.n; i0 += MAX_ROWS) {
    const int nr = static_cast<int>(std::min<int64_t>(MAX_ROWS, a.n - i0));
    for (int64_t t0 = r0 - r0 % TILE; t0 < r1; t0 += TILE) {
      const int h = static_cast<int>(std::min<int64_t>(TILE, w.rows - t0));
      const int64_t lo = std::max(r0, t0), hi = std::min(r1, t0 + h);
      const bool direct = lo == t0 && hi == t0 + h;
      float* out = direct ? y + i0 * w.rows + t0 : buf;
      const int64_t stride = direct ? w.rows : TILE;
      const uint8_t* tc = w.codes + t0 * row_bytes;
      const at::Half* ts = w.scale + t0 * groups;
      const uint8_t* tz = w.zero + t0 * groups;
#if MOEKIT_VNNI
      if (!portable) {
        if (w.nibble) {
          if (h == TILE) tile_vnni_rows<true, true>(nr, tc, ts, tz, h, a, i0, out, stride);
          else tile_vnni_rows<true, false>(nr, tc, ts, tz, h, a, i0, out, stride);
        } else {
          if (h == TILE) tile_vnni_rows<false, true>(nr, tc, ts, tz, h, a, i0, out, stride);
          else tile_vnni_rows<false, false>(nr, tc, ts, tz, h, a, i0, out, stride);
        }
      } else
#endif
      {
        if (w.nibble) tile_portable<true>(nr, tc, ts, tz, h, a, i0, out, stride);
        else tile_portable<false>(nr, tc, ts, tz, h, a, i0, out, stride);
      }
      if (!direct)
        for (int i = 0; i < nr; ++i)
          for (int64_t r = lo; r < hi; ++r) y[(i0 + i) * w.rows + r] = buf[i * TILE + (r - t0)];
    }
  }
}

}  // namespace
