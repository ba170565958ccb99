// One whole batch-1 decode step in one call: every decoder layer, the final norm, the LM head.
//
// Shape legend: D = model width, H = query heads, G = key/value heads, Dh = head width,
// Dr = rotary width (<= Dh), K = keys so far (the cache plus this token), C = cache capacity,
// E = experts, Kt = experts chosen for the token, F = FFN hidden width, Hin = FFN input rows
// (2F for SwiGLU, gate rows first), V = vocabulary.
//
// Why: with the GEMVs native (decode_f32.cpp, quant_gemv.cpp) a step of the 100m benchmark model
// still spent about 1.3 of its 7 ms in ~150 small eager operator calls (norms, RoPE, routing, the
// cache write), each a few microseconds of dispatch whatever its size, and a second thread did
// not help, because each op forked and joined its own team. Here one OpenMP team runs the whole
// step: the GEMVs split their rows across the threads, the small serial pieces (norms, RoPE,
// routing, activation quantization) run on one thread between barriers, and the threads wait at
// barriers instead of going back to the pool between ops.
//
// Every weight matrix is float32 rows or moekit's group-wise quantized codes (quant_gemv.h: 8 or
// 1..4 bits; activations quantized in blocks of 32 once per input vector), chosen per matrix, so
// one plan runs fp32 models, quantized ones and mixed-precision experts alike.
//
// Class torch.classes.moekit.DecodeStepPlan (built once per session by moekit/models/native_step.py):
//   DecodeStepPlan(tensors, scales, zeros, bits, groups, ints, floats, dims)
//     tensors/scales/zeros/bits/groups: parallel lists, one entry per weight. Per layer kSlots
//       entries, then, when ints[kNumExpertMats] = E > 0, E expert w_in and E expert w_out
//       matrices (each expert its own, e.g. quantized), else the stacked float32 experts sit in
//       kExpertIn [E, Hin, D] / kExpertOut [E, D, F]; after the layers: final norm, LM head, its
//       bias. A float32 entry has bits 32 (scale/zero empty); a quantized one is the kernel-layout
//       codes with float16 scale and uint8 zero [R, G]. An absent weight is an empty tensor.
//     ints: kInts per layer; floats: kFloats per layer, then the final norm's eps;
//     dims: [L, H, G, Dh].
//   step(x [D], keys [L] of [1, G, C, Dh], values [L], num_keys K, cos [Dr], sin [Dr]) -> logits [1, V]
//     writes each layer's new key/value into its cache at position K - 1.

#include <torch/custom_class.h>
#include <torch/library.h>

#include <vector>

#include "gemv_f32.h"
#include "quant_gemv.h"

namespace {

enum Slot {
  kLn1, kWq, kBq, kWk, kBk, kWv, kBv, kQNorm, kKNorm, kWo, kBo, kLn2,
  kRouterW, kRouterB, kExpertBias, kExpertIn, kExpertOut,
  kFfnIn, kFfnInBias, kFfnOut, kFfnOutBias, kSharedGate, kSlots
};
// is_moe, top_k, expert activation, FFN activation, route kind (0: softmax scores, 1: sigmoid
// scores, 2: softmax over the chosen logits), norm_topk_prob, q/k norm (0: none, 1: per head
// before RoPE, 2: per head after RoPE), interleaved RoPE, per-expert matrices (0: stacked fp32).
enum Int { kIsMoe, kTopK, kExpertAct, kFfnAct, kRouteKind, kNormTopK, kQkNorm, kInterleave, kNumExpertMats, kInts };
enum Float { kEps1, kEps2, kQkEps, kRouteScale, kFloats };

// One weight matrix [R, C]: float32 rows or quantized codes.
struct Mat {
  const float* f = nullptr;
  QMat q{};
  bool quant = false;
  int64_t rows = 0, cols = 0;
  int64_t bytes() const { return quant ? rows * (q.nibble ? cols / 2 : cols) + rows * (cols / q.group) * 3 : rows * cols * 4; }
};

// An input vector's block-32 quantization, made once for every quantized matrix that reads it
// (the plan checks that those share a group size).
struct QIn {
  QAct act;
};

inline void quantize_for(QIn& in, const float* x, int64_t c, const Mat& m) {
  if (m.quant) quantize_rows(x, 1, c, m.q.group, in.act);
}

// Rows [lo, hi) of y = W x + b.
inline void mat_rows(const Mat& m, const float* x, const QIn& xq, const float* bias, float* y, int64_t lo, int64_t hi) {
  if (lo >= hi) return;
  if (!m.quant) {
    rows_range(x, m.cols, 1, m.f, m.cols, m.cols, y, m.rows, bias, lo, hi);
    return;
  }
  matvec_range(m.q, xq.act, lo, hi, y);
  if (bias)
    for (int64_t r = lo; r < hi; ++r) y[r] += bias[r];
}

// This thread's share of y = W x + b (16-row aligned shares, so no two threads write one line).
inline void mat_share(const Mat& m, const float* x, const QIn& xq, const float* bias, float* y, int t, int nt) {
  int64_t lo, hi;
  share(m.rows, t, nt, 16, &lo, &hi);
  mat_rows(m, x, xq, bias, y, lo, hi);
}

inline void rms_norm(const float* x, const float* w, float eps, float* out, int64_t n) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * (w ? w[i] : 1.f);
}

// One head vector: the optional per-head norm, de-interleaving, and rotate-half RoPE over the
// first Dr dims, in the general path's order (moekit.blocks.Attention).
inline void prepare_head(float* v, int64_t dh, const float* norm_w, float eps, int64_t qk_norm, bool interleave,
                         const float* cos, const float* sin, int64_t dr, float* tmp) {
  if (qk_norm == 1) rms_norm(v, norm_w, eps, v, dh);
  if (interleave) {
    const int64_t half = dh / 2;
    for (int64_t i = 0; i < half; ++i) tmp[i] = v[2 * i], tmp[half + i] = v[2 * i + 1];
    std::copy(tmp, tmp + dh, v);
  }
  const int64_t half = dr / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    tmp[i] = a * cos[i] - b * sin[i];
    tmp[i + half] = b * cos[i + half] + a * sin[i + half];
  }
  std::copy(tmp, tmp + dr, v);
  if (qk_norm == 2) rms_norm(v, norm_w, eps, v, dh);
}

// Softmax attention of one query head over K cached keys of its group: out [Dh].
inline void attend_head(const float* q, const float* keys, const float* values, int64_t num_keys, int64_t dh,
                        float scale, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < num_keys; ++j) {
    scores[j] = dot(keys + j * dh, q, dh) * scale;
    mx = std::max(mx, scores[j]);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < num_keys; ++j) sum += (scores[j] = std::exp(scores[j] - mx));
  const float inv = 1.f / sum;
  std::fill(out, out + dh, 0.f);
  for (int64_t j = 0; j < num_keys; ++j) {
    const float p = scores[j] * inv;
    const float* vj = values + j * dh;
#pragma omp simd
    for (int64_t i = 0; i < dh; ++i) out[i] += p * vj[i];
  }
}

struct LayerPlan {
  const float *ln1 = nullptr, *ln2 = nullptr, *bq = nullptr, *bk = nullptr, *bv = nullptr, *bo = nullptr;
  const float *q_norm = nullptr, *k_norm = nullptr, *router_b = nullptr, *expert_bias = nullptr;
  const float *ffn_in_b = nullptr, *ffn_out_b = nullptr, *shared_gate = nullptr;
  Mat wq, wk, wv, wo, router, ffn_in, ffn_out;
  std::vector<Mat> expert_in, expert_out;
  int64_t ints[kInts];
  double floats[kFloats];
};

// The router for one token: Kt expert ids (best first, ties to the lower id) and their weights,
// the math of moekit.layers.strategies' TopKRouting (kinds 0, 1) and TopKLogitSoftmaxRouting (2).
void route(const LayerPlan& p, int64_t k, const float* x, int64_t d, float* logits_E, float* scores_E,
           int64_t* ids, float* gates) {
  const int64_t e = p.router.rows, kind = p.ints[kRouteKind];
  for (int64_t i = 0; i < e; ++i) logits_E[i] = dot(p.router.f + i * d, x, d) + (p.router_b ? p.router_b[i] : 0.f);
  if (kind == 0) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t i = 0; i < e; ++i) mx = std::max(mx, logits_E[i]);
    for (int64_t i = 0; i < e; ++i) sum += (scores_E[i] = std::exp(logits_E[i] - mx));
    for (int64_t i = 0; i < e; ++i) scores_E[i] /= sum;
  } else if (kind == 1) {
    for (int64_t i = 0; i < e; ++i) scores_E[i] = 1.f / (1.f + std::exp(-logits_E[i]));
  } else {
    std::copy(logits_E, logits_E + e, scores_E);
  }
  std::vector<char> taken(e, 0);  // selection on score + bias (the bias only steers the choice)
  for (int64_t s = 0; s < k; ++s) {
    int64_t best = -1;
    float best_v = -INFINITY;
    for (int64_t i = 0; i < e; ++i) {
      const float v = scores_E[i] + (p.expert_bias ? p.expert_bias[i] : 0.f);
      if (!taken[i] && (best < 0 || v > best_v)) best = i, best_v = v;
    }
    taken[best] = 1;
    ids[s] = best;
  }
  if (kind == 2) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < k; ++s) mx = std::max(mx, logits_E[ids[s]]);
    for (int64_t s = 0; s < k; ++s) sum += (gates[s] = std::exp(logits_E[ids[s]] - mx));
    for (int64_t s = 0; s < k; ++s) gates[s] /= sum;
  } else {
    float sum = 0.f;
    for (int64_t s = 0; s < k; ++s) sum += (gates[s] = scores_E[ids[s]]);
    if (p.ints[kNormTopK]) {
      const float inv = 1.f / std::max(sum, 1e-20f);
      for (int64_t s = 0; s < k; ++s) gates[s] *= inv;
    }
  }
  const float scale = static_cast<float>(p.floats[kRouteScale]);
  if (scale != 1.f)
    for (int64_t s = 0; s < k; ++s) gates[s] *= scale;
}

// Scratch of one FFN pass over up to Kt experts.
struct FfnScratch {
  float *h, *a, *yk;  // [Kt, Hin], [Kt, F], [Kt, D]
  QIn* aq;            // [Kt]: each expert's activation, quantized for its w_out
};

// This thread's part of y [D] = sum_s gates[s] (w_out_s act(w_in_s x + b_in) + b_out), summed in
// slot order: hidden rows split by thread (a thread computes gate row j and up row F + j, so it can
// apply SwiGLU alone), one barrier (and one single section to quantize the activations for
// quantized w_out), then output rows. Ends without a barrier: each thread owns its rows of y.
void ffn_thread(int t, int nt, const Mat* const* ins, const Mat* const* outs, const float* in_b,
                const float* out_b, const float* gates, int64_t k, int64_t act, const float* x, const QIn& xq,
                const FfnScratch& sc, float* y, int64_t d) {
  const int64_t hin = ins[0]->rows, f = outs[0]->cols;
  int64_t f0, f1;
  share(f, t, nt, 16, &f0, &f1);
  bool quant_out = false;
  for (int64_t s = 0; s < k; ++s) {
    quant_out = quant_out || outs[s]->quant;
    float* hs = sc.h + s * hin;
    float* as = sc.a + s * f;
    if (f0 >= f1) continue;
    mat_rows(*ins[s], x, xq, in_b, hs, f0, f1);
    if (act == 0) {
      mat_rows(*ins[s], x, xq, in_b, hs, f + f0, f + f1);
      for (int64_t j = f0; j < f1; ++j) as[j] = silu(hs[j]) * hs[f + j];
    } else {
      for (int64_t j = f0; j < f1; ++j) as[j] = act_one(hs[j], act);
    }
  }
#pragma omp barrier
  if (quant_out) {
#pragma omp single
    for (int64_t s = 0; s < k; ++s) quantize_for(sc.aq[s], sc.a + s * f, f, *outs[s]);
  }
  int64_t d0, d1;
  share(d, t, nt, 16, &d0, &d1);
  // Slot-major: one expert's block of rows [d0, d1) before the next (one stream per slot).
  for (int64_t s = 0; s < k; ++s) mat_rows(*outs[s], sc.a + s * f, sc.aq[s], out_b, sc.yk + s * d, d0, d1);
  for (int64_t r = d0; r < d1; ++r) {
    float acc = sc.yk[r] * gates[0];
    for (int64_t s = 1; s < k; ++s) acc += sc.yk[s * d + r] * gates[s];
    y[r] = acc;
  }
}

struct DecodeStepPlan : torch::CustomClassHolder {
  std::vector<at::Tensor> keep;  // every tensor the raw pointers point into
  std::vector<LayerPlan> layers;
  const float *final_norm = nullptr, *lm_bias = nullptr;
  Mat lm_head;
  float final_eps = 1e-6f;
  int64_t d = 0, nh = 0, ng = 0, dh = 0, max_kt = 1, max_e = 1, max_hin = 1, max_f = 1, active_bytes = 0;

  DecodeStepPlan(std::vector<at::Tensor> tensors, std::vector<at::Tensor> scales, std::vector<at::Tensor> zeros,
                 std::vector<int64_t> bits, std::vector<int64_t> groups, std::vector<int64_t> ints,
                 std::vector<double> floats, std::vector<int64_t> dims)
      : keep(tensors) {
    TORCH_CHECK(dims.size() == 4, "DecodeStepPlan: dims must be [L, H, G, Dh]");
    const int64_t num_layers = dims[0];
    nh = dims[1], ng = dims[2], dh = dims[3];
    TORCH_CHECK(num_layers >= 1 && nh > 0 && ng > 0 && nh % ng == 0 && dh > 0 && dh % 2 == 0,
                "DecodeStepPlan: bad dims");
    const size_t n = tensors.size();
    TORCH_CHECK(scales.size() == n && zeros.size() == n && bits.size() == n && groups.size() == n,
                "DecodeStepPlan: tensors, scales, zeros, bits and groups must be parallel lists");
    TORCH_CHECK(static_cast<int64_t>(ints.size()) == num_layers * kInts &&
                    static_cast<int64_t>(floats.size()) == num_layers * kFloats + 1,
                "DecodeStepPlan: ints/floats do not match ", num_layers, " layers");
    keep.insert(keep.end(), scales.begin(), scales.end());
    keep.insert(keep.end(), zeros.begin(), zeros.end());
    d = tensors.at(0).numel();  // layer 0's input norm [D]
    size_t cursor = 0;
    auto vec = [&](size_t i, int64_t len, const char* what, int64_t layer) -> const float* {
      const at::Tensor& t = tensors.at(i);
      if (!t.numel()) return nullptr;
      check_f32_cpu(t, what);
      TORCH_CHECK(t.is_contiguous() && t.numel() == len, "DecodeStepPlan: layer ", layer, " ", what, " must be [",
                  len, "], got ", t.sizes());
      return t.data_ptr<float>();
    };
    auto mat = [&](size_t i, int64_t rows, int64_t cols, const char* what, int64_t layer) -> Mat {
      const at::Tensor& t = tensors.at(i);
      Mat m;
      if (!t.numel()) return m;
      if (bits.at(i) == 32) {
        check_f32_cpu(t, what);
        TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.size(1) == cols, "DecodeStepPlan: layer ", layer, " ",
                    what, " must be contiguous [R, ", cols, "], got ", t.sizes());
        m.f = t.data_ptr<float>();
        m.rows = t.size(0);
      } else {
        m.q = check_matrix(t, scales.at(i), zeros.at(i), bits.at(i), groups.at(i), cols);
        m.quant = true;
        m.rows = m.q.rows;
      }
      m.cols = cols;
      TORCH_CHECK(rows < 0 || m.rows == rows, "DecodeStepPlan: layer ", layer, " ", what, " has ", m.rows,
                  " rows, expected ", rows);
      return m;
    };
    auto same_group = [](std::initializer_list<const Mat*> ms, const char* what, int64_t layer) {
      int64_t group = 0;
      for (const Mat* m : ms) {
        if (!m->quant) continue;
        TORCH_CHECK(!group || group == m->q.group, "DecodeStepPlan: layer ", layer, " ", what,
                    " read one vector but differ in group size");
        group = m->q.group;
      }
    };
    layers.resize(num_layers);
    const int64_t qw = nh * dh, kvw = ng * dh;
    for (int64_t l = 0; l < num_layers; ++l) {
      LayerPlan& p = layers[l];
      std::copy(ints.begin() + l * kInts, ints.begin() + (l + 1) * kInts, p.ints);
      std::copy(floats.begin() + l * kFloats, floats.begin() + (l + 1) * kFloats, p.floats);
      const size_t b = cursor;
      p.ln1 = vec(b + kLn1, d, "input norm", l);
      p.ln2 = vec(b + kLn2, d, "post-attention norm", l);
      p.wq = mat(b + kWq, qw, d, "q_proj", l);
      p.wk = mat(b + kWk, kvw, d, "k_proj", l);
      p.wv = mat(b + kWv, kvw, d, "v_proj", l);
      p.wo = mat(b + kWo, d, qw, "o_proj", l);
      TORCH_CHECK(p.wq.rows && p.wk.rows && p.wv.rows && p.wo.rows, "DecodeStepPlan: layer ", l,
                  " has no attention projections");
      same_group({&p.wq, &p.wk, &p.wv}, "q/k/v projections", l);
      p.bq = vec(b + kBq, qw, "q bias", l);
      p.bk = vec(b + kBk, kvw, "k bias", l);
      p.bv = vec(b + kBv, kvw, "v bias", l);
      p.bo = vec(b + kBo, d, "o bias", l);
      p.q_norm = vec(b + kQNorm, dh, "q_norm", l);
      p.k_norm = vec(b + kKNorm, dh, "k_norm", l);
      TORCH_CHECK(p.ints[kQkNorm] == 0 || (p.q_norm && p.k_norm), "DecodeStepPlan: layer ", l,
                  " asks for q/k norms without their weights");
      active_bytes += p.wq.bytes() + p.wk.bytes() + p.wv.bytes() + p.wo.bytes();
      const int64_t num_mats = p.ints[kNumExpertMats];
      cursor = b + kSlots + 2 * num_mats;
      if (p.ints[kIsMoe]) {
        const int64_t act = p.ints[kExpertAct], k = p.ints[kTopK];
        TORCH_CHECK(act >= 0 && act <= 3, "DecodeStepPlan: layer ", l, " bad expert activation");
        if (num_mats == 0) {  // stacked float32: per-expert views into the two stacks
          const at::Tensor &wi = tensors.at(b + kExpertIn), &wo = tensors.at(b + kExpertOut);
          check_f32_cpu(wi, "experts w_in");
          check_f32_cpu(wo, "experts w_out");
          TORCH_CHECK(wi.dim() == 3 && wo.dim() == 3 && wi.is_contiguous() && wo.is_contiguous() &&
                          wi.size(2) == d && wo.size(1) == d && wo.size(0) == wi.size(0),
                      "DecodeStepPlan: layer ", l, " experts must be w_in [E, Hin, D] and w_out [E, D, F]");
          const int64_t e = wi.size(0), hin = wi.size(1), f = wo.size(2);
          for (int64_t i = 0; i < e; ++i) {
            Mat in, out;
            in.f = wi.data_ptr<float>() + i * hin * d, in.rows = hin, in.cols = d;
            out.f = wo.data_ptr<float>() + i * d * f, out.rows = d, out.cols = f;
            p.expert_in.push_back(in);
            p.expert_out.push_back(out);
          }
        } else {
          for (int64_t i = 0; i < num_mats; ++i) {
            p.expert_in.push_back(mat(b + kSlots + i, -1, d, "expert w_in", l));
            const at::Tensor& out_t = tensors.at(b + kSlots + num_mats + i);
            const int64_t f = bits.at(b + kSlots + num_mats + i) == 32
                                  ? out_t.size(1)
                                  : out_t.size(1) * (bits.at(b + kSlots + num_mats + i) <= 4 ? 2 : 1);
            p.expert_out.push_back(mat(b + kSlots + num_mats + i, d, f, "expert w_out", l));
          }
        }
        const int64_t e = static_cast<int64_t>(p.expert_in.size());
        TORCH_CHECK(e >= 1, "DecodeStepPlan: layer ", l, " has no experts");
        for (int64_t i = 0; i < e; ++i) {
          TORCH_CHECK(p.expert_in[i].rows == (act == 0 ? 2 : 1) * p.expert_out[i].cols && p.expert_out[i].rows == d,
                      "DecodeStepPlan: layer ", l, " expert ", i, " w_in rows do not fit its activation and F");
          TORCH_CHECK(p.expert_in[i].rows == p.expert_in[0].rows, "DecodeStepPlan: layer ", l,
                      " experts differ in shape");
        }
        p.router = mat(b + kRouterW, e, d, "router", l);
        TORCH_CHECK(p.router.rows && !p.router.quant, "DecodeStepPlan: layer ", l, " needs a float32 router");
        p.router_b = vec(b + kRouterB, e, "router bias", l);
        p.expert_bias = vec(b + kExpertBias, e, "expert bias", l);
        TORCH_CHECK(k >= 1 && k <= e, "DecodeStepPlan: layer ", l, " top_k ", k, " not in [1, ", e, "]");
        TORCH_CHECK(p.ints[kRouteKind] >= 0 && p.ints[kRouteKind] <= 2, "DecodeStepPlan: bad route kind");
        max_kt = std::max(max_kt, k);
        max_e = std::max(max_e, e);
        max_hin = std::max(max_hin, p.expert_in[0].rows);
        max_f = std::max(max_f, p.expert_out[0].cols);
        active_bytes += k * (p.expert_in[0].bytes() + p.expert_out[0].bytes());
      }
      p.ffn_in = mat(b + kFfnIn, -1, d, "FFN w_in", l);
      if (p.ffn_in.rows) {
        const at::Tensor& out_t = tensors.at(b + kFfnOut);
        const int64_t ob = bits.at(b + kFfnOut);
        const int64_t f = ob == 32 ? out_t.size(1) : out_t.size(1) * (ob <= 4 ? 2 : 1);
        p.ffn_out = mat(b + kFfnOut, d, f, "FFN w_out", l);
        TORCH_CHECK(p.ints[kFfnAct] >= 0 && p.ints[kFfnAct] <= 3 &&
                        p.ffn_in.rows == (p.ints[kFfnAct] == 0 ? 2 : 1) * f,
                    "DecodeStepPlan: layer ", l, " FFN activation does not fit w_in");
        p.ffn_in_b = vec(b + kFfnInBias, p.ffn_in.rows, "FFN w_in bias", l);
        p.ffn_out_b = vec(b + kFfnOutBias, d, "FFN w_out bias", l);
        p.shared_gate = vec(b + kSharedGate, d, "shared expert gate", l);
        max_hin = std::max(max_hin, p.ffn_in.rows);
        max_f = std::max(max_f, f);
        active_bytes += p.ffn_in.bytes() + p.ffn_out.bytes();
      }
      TORCH_CHECK(p.ints[kIsMoe] || p.ffn_in.rows, "DecodeStepPlan: layer ", l, " has neither experts nor an FFN");
      if (p.ints[kIsMoe]) {
        for (const Mat& m : p.expert_in) same_group({&m, &p.expert_in[0], &p.ffn_in}, "experts and shared FFN", l);
      }
    }
    TORCH_CHECK(cursor + 3 == n, "DecodeStepPlan: ", n, " tensors, expected ", cursor + 3);
    final_norm = vec(cursor, d, "final norm", -1);
    lm_head = mat(cursor + 1, -1, d, "lm_head", -1);
    TORCH_CHECK(lm_head.rows, "DecodeStepPlan: no lm_head");
    lm_bias = vec(cursor + 2, lm_head.rows, "lm_head bias", -1);
    final_eps = static_cast<float>(floats.back());
    active_bytes += lm_head.bytes();
  }

  at::Tensor step(at::Tensor x_in, std::vector<at::Tensor> keys, std::vector<at::Tensor> values, int64_t num_keys,
                  at::Tensor cos, at::Tensor sin) {
    const int64_t num_layers = static_cast<int64_t>(layers.size());
    check_f32_cpu(x_in, "x");
    TORCH_CHECK(x_in.numel() == d && x_in.is_contiguous(), "DecodeStepPlan.step: x must be [D] contiguous");
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == num_layers && values.size() == keys.size(),
                "DecodeStepPlan.step: one cache tensor per layer");
    check_f32_cpu(cos, "cos");
    check_f32_cpu(sin, "sin");
    const int64_t dr = cos.numel();
    TORCH_CHECK(sin.numel() == dr && dr <= dh && dr % 2 == 0 && cos.is_contiguous() && sin.is_contiguous(),
                "DecodeStepPlan.step: cos/sin must be contiguous [Dr] with even Dr <= Dh");
    TORCH_CHECK(num_keys >= 1, "DecodeStepPlan.step: num_keys must be >= 1");
    std::vector<float*> kp(num_layers), vp(num_layers);
    std::vector<int64_t> cap(num_layers);
    for (int64_t l = 0; l < num_layers; ++l) {
      const at::Tensor &kc = keys[l], &vc = values[l];
      check_f32_cpu(kc, "keys");
      check_f32_cpu(vc, "values");
      TORCH_CHECK(kc.dim() == 4 && kc.size(0) == 1 && kc.size(1) == ng && kc.size(3) == dh && kc.is_contiguous() &&
                      vc.sizes() == kc.sizes() && vc.is_contiguous(),
                  "decode_step: layer ", l, " cache must be contiguous [1, G, C, Dh]");
      TORCH_CHECK(kc.size(2) >= num_keys, "decode_step: layer ", l, " cache holds ", kc.size(2),
                  " keys, the step needs ", num_keys);
      kp[l] = kc.data_ptr<float>(), vp[l] = vc.data_ptr<float>(), cap[l] = kc.size(2);
    }
    const int nt = threads_for(active_bytes / (4 * num_layers + 1));
    const int64_t qw = nh * dh, kvw = ng * dh, per_group = nh / ng, vocab = lm_head.rows;
    const float scale = 1.f / std::sqrt(static_cast<float>(dh));
    // Scratch: the residual stream, normed input, o_proj's output, routed and shared outputs,
    // q / attention output / new k / new v, router buffers, FFN buffers, RoPE's temporary and
    // each thread's attention scores.
    std::vector<float> buf(d * 5 + qw * 2 + kvw * 2 + 2 * max_e + max_kt + max_kt * (max_hin + max_f + d) +
                           2 * dh + static_cast<int64_t>(nt) * num_keys);
    float* next = buf.data();
    auto take = [&next](int64_t count) {
      float* out = next;
      next += count;
      return out;
    };
    float *x = take(d), *xn = take(d), *o = take(d), *y = take(d), *ys = take(d);
    float *q = take(qw), *att = take(qw), *knew = take(kvw), *vnew = take(kvw);
    float *logits_E = take(max_e), *scores_E = take(max_e), *gates = take(max_kt);
    std::vector<QIn> aq(max_kt);
    FfnScratch sc{take(max_kt * max_hin), take(max_kt * max_f), take(max_kt * d), aq.data()};
    float *tmp = take(2 * dh), *scores = take(static_cast<int64_t>(nt) * num_keys);
    std::vector<int64_t> ids(max_kt);
    std::vector<const Mat*> ins(max_kt), outs(max_kt);
    QIn xq, attq;
    std::copy(x_in.data_ptr<float>(), x_in.data_ptr<float>() + d, x);

    at::Tensor logits = at::empty({1, vocab}, x_in.options());
    float* logits_V = logits.data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t pos = num_keys - 1;
    float shared_scale = 1.f, one = 1.f;
    const Mat* shared_in[1];
    const Mat* shared_out[1];

#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
      for (int64_t l = 0; l < num_layers; ++l) {
        const LayerPlan& p = layers[l];
#pragma omp single
        {
          rms_norm(x, p.ln1, static_cast<float>(p.floats[kEps1]), xn, d);
          quantize_for(xq, xn, d, p.wq.quant ? p.wq : (p.wk.quant ? p.wk : p.wv));
        }
        mat_share(p.wq, xn, xq, p.bq, q, t, n);
        mat_share(p.wk, xn, xq, p.bk, knew, t, n);
        mat_share(p.wv, xn, xq, p.bv, vnew, t, n);
#pragma omp barrier
#pragma omp single
        {
          const float eps = static_cast<float>(p.floats[kQkEps]);
          for (int64_t h = 0; h < nh; ++h)
            prepare_head(q + h * dh, dh, p.q_norm, eps, p.ints[kQkNorm], p.ints[kInterleave], cp, sp, dr, tmp);
          for (int64_t g = 0; g < ng; ++g) {
            prepare_head(knew + g * dh, dh, p.k_norm, eps, p.ints[kQkNorm], p.ints[kInterleave], cp, sp, dr, tmp);
            std::copy(knew + g * dh, knew + (g + 1) * dh, kp[l] + (g * cap[l] + pos) * dh);
            std::copy(vnew + g * dh, vnew + (g + 1) * dh, vp[l] + (g * cap[l] + pos) * dh);
          }
        }
        for (int64_t h = t; h < nh; h += n) {
          const int64_t g = h / per_group;
          attend_head(q + h * dh, kp[l] + g * cap[l] * dh, vp[l] + g * cap[l] * dh, num_keys, dh, scale,
                      scores + t * num_keys, att + h * dh);
        }
#pragma omp barrier
        if (p.wo.quant) {
#pragma omp single
          quantize_for(attq, att, qw, p.wo);
        }
        mat_share(p.wo, att, attq, p.bo, o, t, n);
#pragma omp barrier
#pragma omp single
        {
          for (int64_t i = 0; i < d; ++i) x[i] += o[i];
          rms_norm(x, p.ln2, static_cast<float>(p.floats[kEps2]), xn, d);
          const bool moe = p.ints[kIsMoe];
          if (moe) {
            route(p, p.ints[kTopK], xn, d, logits_E, scores_E, ids.data(), gates);
            for (int64_t s = 0; s < p.ints[kTopK]; ++s) ins[s] = &p.expert_in[ids[s]], outs[s] = &p.expert_out[ids[s]];
          }
          // One quantization of xn serves every quantized matrix reading it (they share a group).
          const Mat* probe = &p.ffn_in;
          for (int64_t s = 0; moe && !probe->quant && s < p.ints[kTopK]; ++s) probe = ins[s];
          quantize_for(xq, xn, d, *probe);
          shared_scale = p.shared_gate ? 1.f / (1.f + std::exp(-dot(p.shared_gate, xn, d))) : 1.f;
          shared_in[0] = &p.ffn_in, shared_out[0] = &p.ffn_out;
        }
        if (p.ints[kIsMoe])
          ffn_thread(t, n, ins.data(), outs.data(), nullptr, nullptr, gates, p.ints[kTopK], p.ints[kExpertAct], xn,
                     xq, sc, y, d);
        if (p.ffn_in.rows) {
          if (p.ints[kIsMoe]) {
#pragma omp barrier
          }
          ffn_thread(t, n, shared_in, shared_out, p.ffn_in_b, p.ffn_out_b, &one, 1, p.ints[kFfnAct], xn, xq, sc, ys,
                     d);
        }
#pragma omp barrier
#pragma omp single
        {
          const bool moe = p.ints[kIsMoe], ffn = p.ffn_in.rows;
          for (int64_t i = 0; i < d; ++i) x[i] += (moe ? y[i] : 0.f) + (ffn ? shared_scale * ys[i] : 0.f);
        }
      }
#pragma omp single
      {
        rms_norm(x, final_norm, final_eps, xn, d);
        quantize_for(xq, xn, d, lm_head);
      }
      mat_share(lm_head, xn, xq, lm_bias, logits_V, t, n);
    }
    return logits;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.class_<DecodeStepPlan>("DecodeStepPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, std::vector<double>,
                       std::vector<int64_t>>())
      .def("step", &DecodeStepPlan::step);
}
