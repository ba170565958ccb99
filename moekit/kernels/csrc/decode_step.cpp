// One whole batch-1 fp32 decode step in one call: every decoder layer, the final norm, the LM head.
//
// Shape legend: D = model width, H = query heads, G = key/value heads, Dh = head width,
// Dr = rotary width (<= Dh), K = keys so far (the cache plus this token), C = cache capacity,
// E = experts, Kt = experts chosen for the token, F = FFN hidden width, Hin = FFN input rows
// (2F for SwiGLU, gate rows first), V = vocabulary.
//
// Why: with the GEMVs native (decode_f32.cpp) a step of the 100m benchmark model still spent
// about 1.3 of its 7 ms in ~150 small eager operator calls (norms, RoPE, routing, the cache
// write), each a few microseconds of dispatch whatever its size. A second thread did not help
// either, because each op forked and joined its own team. Here one OpenMP team runs the whole
// step: the GEMVs split their rows across the threads, the small serial pieces (norms, RoPE,
// routing) run on one thread between barriers, and the threads wait at barriers instead of
// going back to the pool between ops.
//
// Op (torch.ops.moekit.decode_step_f32; the fake and the plan builder live in
// moekit/kernels/step.py and moekit/models/native_step.py):
//   decode_step_f32(x [D], weights Tensor[L * kSlots], ints int[L * kInts], floats float[L * kFloats],
//                   keys Tensor[L] ([1, G, C, Dh]), values Tensor[L], num_keys K, cos [Dr], sin [Dr],
//                   final_norm [D], final_eps, lm_head [V, D], lm_bias [V] or empty, dims [H, G, Dh])
//     -> logits [1, V]
//   The new key and value of each layer are written into keys/values at position K - 1.
//   An absent weight (a bias, a norm, a shared expert) is an empty tensor.

#include <torch/library.h>

#include <vector>

#include "gemv_f32.h"

namespace {

// Per-layer tensor slots.
enum Slot {
  kLn1, kWq, kBq, kWk, kBk, kWv, kBv, kQNorm, kKNorm, kWo, kBo, kLn2,
  kRouterW, kRouterB, kExpertBias, kExpertIn, kExpertOut,
  kFfnIn, kFfnInBias, kFfnOut, kFfnOutBias, kSharedGate, kSlots
};
// Per-layer ints: is_moe, top_k, expert activation, FFN activation, route kind (0: softmax scores,
// 1: sigmoid scores, 2: softmax over the chosen logits), norm_topk_prob, q/k norm (0: none,
// 1: per head before RoPE, 2: per head after RoPE), interleaved RoPE.
enum Int { kIsMoe, kTopK, kExpertAct, kFfnAct, kRouteKind, kNormTopK, kQkNorm, kInterleave, kInts };
// Per-layer floats: the two norms' eps, the q/k norms' eps, routed_scaling_factor.
enum Float { kEps1, kEps2, kQkEps, kRouteScale, kFloats };

const float* ptr_or_null(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

struct LayerPtrs {
  const float *ln1, *wq, *bq, *wk, *bk, *wv, *bv, *q_norm, *k_norm, *wo, *bo, *ln2;
  const float *router_w, *router_b, *expert_bias, *expert_in, *expert_out;
  const float *ffn_in, *ffn_in_b, *ffn_out, *ffn_out_b, *shared_gate;
  float *keys, *values;
  int64_t num_experts, expert_hin, expert_f, ffn_hin, ffn_f;
};

void check_weight(const at::Tensor& t, std::initializer_list<int64_t> shape, const char* what, int64_t layer) {
  if (!t.numel()) return;
  check_f32_cpu(t, what);
  TORCH_CHECK(t.is_contiguous(), "decode_step_f32: layer ", layer, " ", what, " must be contiguous");
  TORCH_CHECK(t.dim() == static_cast<int64_t>(shape.size()), "decode_step_f32: layer ", layer, " ", what,
              " has ", t.dim(), " dims");
  int64_t i = 0;
  for (int64_t s : shape) {
    TORCH_CHECK(s < 0 || t.size(i) == s, "decode_step_f32: layer ", layer, " ", what, " dim ", i, " is ",
                t.size(i), ", expected ", s);
    ++i;
  }
}

inline void rms_norm(const float* x, const float* w, float eps, float* out, int64_t n) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * (w ? w[i] : 1.f);
}

// This thread's share of y = W x + b over R rows (16-row aligned shares).
inline void gemv_share(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t c,
                       int t, int nt) {
  int64_t lo, hi;
  share(rows, t, nt, 16, &lo, &hi);
  if (lo < hi) rows_range(x, c, 1, w, c, c, y, rows, b, lo, hi);
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

// The router for one token: Kt expert ids (best first, ties to the lower id) and their weights,
// the math of moekit.layers.strategies' TopKRouting (kinds 0, 1) and TopKLogitSoftmaxRouting (2).
void route(const LayerPtrs& p, const int64_t* ints, const double* floats, const float* x, int64_t d,
           float* logits_E, float* scores_E, int64_t* ids, float* gates) {
  const int64_t e = p.num_experts, k = ints[kTopK], kind = ints[kRouteKind];
  for (int64_t i = 0; i < e; ++i) logits_E[i] = dot(p.router_w + i * d, x, d) + (p.router_b ? p.router_b[i] : 0.f);
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
  // Selection on score + bias (the bias only steers the choice).
  std::vector<char> taken(e, 0);
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
    if (ints[kNormTopK]) {
      const float inv = 1.f / std::max(sum, 1e-20f);
      for (int64_t s = 0; s < k; ++s) gates[s] *= inv;
    }
  }
  const float scale = static_cast<float>(floats[kRouteScale]);
  if (scale != 1.f)
    for (int64_t s = 0; s < k; ++s) gates[s] *= scale;
}

// This thread's part of a dense FFN (a dense layer's MLP or the shared expert): hidden rows split
// like moe_thread's, one barrier, then output rows. y [D] = w_out act(w_in x + b_in) + b_out.
void ffn_thread(int t, int nt, const LayerPtrs& p, int64_t act, const float* x, int64_t d, float* h_H,
                float* a_F, float* y) {
  const int64_t f = p.ffn_f, hin = p.ffn_hin;
  int64_t f0, f1;
  share(f, t, nt, 16, &f0, &f1);
  if (f0 < f1) {
    rows_range(x, d, 1, p.ffn_in, d, d, h_H, hin, p.ffn_in_b, f0, f1);
    if (act == 0) {
      rows_range(x, d, 1, p.ffn_in, d, d, h_H, hin, p.ffn_in_b, f + f0, f + f1);
      for (int64_t j = f0; j < f1; ++j) a_F[j] = silu(h_H[j]) * h_H[f + j];
    } else {
      for (int64_t j = f0; j < f1; ++j) a_F[j] = act_one(h_H[j], act);
    }
  }
#pragma omp barrier
  int64_t d0, d1;
  share(d, t, nt, 16, &d0, &d1);
  if (d0 < d1) rows_range(a_F, f, 1, p.ffn_out, f, f, y, d, p.ffn_out_b, d0, d1);
}

at::Tensor decode_step_f32(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef ints,
                           at::ArrayRef<double> floats, at::TensorList keys, at::TensorList values,
                           int64_t num_keys, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& final_norm, double final_eps, const at::Tensor& lm_head,
                           const at::Tensor& lm_bias, at::IntArrayRef dims) {
  check_f32_cpu(x_in, "x");
  TORCH_CHECK(dims.size() == 3, "decode_step_f32: dims must be [H, G, Dh]");
  const int64_t num_layers = static_cast<int64_t>(keys.size());
  const int64_t d = x_in.numel(), nh = dims[0], ng = dims[1], dh = dims[2];
  TORCH_CHECK(nh > 0 && ng > 0 && nh % ng == 0 && dh > 0, "decode_step_f32: bad heads H=", nh, " G=", ng);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_layers * kSlots &&
                  static_cast<int64_t>(ints.size()) == num_layers * kInts &&
                  static_cast<int64_t>(floats.size()) == num_layers * kFloats &&
                  static_cast<int64_t>(values.size()) == num_layers,
              "decode_step_f32: per-layer lists do not match ", num_layers, " layers");
  check_f32_cpu(cos, "cos");
  check_f32_cpu(sin, "sin");
  const int64_t dr = cos.numel();
  TORCH_CHECK(sin.numel() == dr && dr <= dh && dr % 2 == 0 && cos.is_contiguous() && sin.is_contiguous(),
              "decode_step_f32: cos/sin must be contiguous [Dr] with even Dr <= Dh");
  TORCH_CHECK(num_keys >= 1, "decode_step_f32: num_keys must be >= 1");
  check_weight(final_norm, {d}, "final norm", -1);
  check_f32_cpu(lm_head, "lm_head");
  TORCH_CHECK(lm_head.dim() == 2 && lm_head.size(1) == d && lm_head.is_contiguous(), "decode_step_f32: lm_head [V, D]");
  const int64_t vocab = lm_head.size(0);
  check_weight(lm_bias, {vocab}, "lm_head bias", -1);

  std::vector<LayerPtrs> layers(num_layers);
  int64_t weight_bytes = vocab * d * 4, max_kt = 1, max_e = 1, max_hin = 1, max_f = 1;
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor* w = weights.data() + l * kSlots;
    const int64_t* li = ints.data() + l * kInts;
    LayerPtrs& p = layers[l];
    check_weight(w[kLn1], {d}, "input norm", l);
    check_weight(w[kLn2], {d}, "post-attention norm", l);
    check_weight(w[kWq], {nh * dh, d}, "q_proj", l);
    check_weight(w[kWk], {ng * dh, d}, "k_proj", l);
    check_weight(w[kWv], {ng * dh, d}, "v_proj", l);
    check_weight(w[kWo], {d, nh * dh}, "o_proj", l);
    check_weight(w[kBq], {nh * dh}, "q bias", l);
    check_weight(w[kBk], {ng * dh}, "k bias", l);
    check_weight(w[kBv], {ng * dh}, "v bias", l);
    check_weight(w[kBo], {d}, "o bias", l);
    check_weight(w[kQNorm], {dh}, "q_norm", l);
    check_weight(w[kKNorm], {dh}, "k_norm", l);
    TORCH_CHECK(w[kWq].numel() && w[kWk].numel() && w[kWv].numel() && w[kWo].numel(),
                "decode_step_f32: layer ", l, " has no attention projections");
    TORCH_CHECK(li[kQkNorm] == 0 || (w[kQNorm].numel() && w[kKNorm].numel()),
                "decode_step_f32: layer ", l, " asks for q/k norms without their weights");
    const at::Tensor& kc = keys[l];
    const at::Tensor& vc = values[l];
    check_f32_cpu(kc, "keys");
    check_f32_cpu(vc, "values");
    TORCH_CHECK(kc.dim() == 4 && kc.size(0) == 1 && kc.size(1) == ng && kc.size(3) == dh && kc.is_contiguous() &&
                    vc.sizes() == kc.sizes() && vc.is_contiguous(),
                "decode_step_f32: layer ", l, " cache must be contiguous [1, G, C, Dh]");
    TORCH_CHECK(kc.size(2) >= num_keys, "decode_step_f32: layer ", l, " cache holds ", kc.size(2),
                " keys, the step needs ", num_keys);
    p.keys = kc.data_ptr<float>();
    p.values = vc.data_ptr<float>();
    weight_bytes += (2 * nh + 2 * ng) * dh * d * 4;
    if (li[kIsMoe]) {
      const at::Tensor &wi = w[kExpertIn], &wo = w[kExpertOut];
      check_weight(wi, {-1, -1, d}, "experts w_in", l);
      check_weight(wo, {-1, d, -1}, "experts w_out", l);
      TORCH_CHECK(wi.numel() && wo.numel() && wo.size(0) == wi.size(0), "decode_step_f32: layer ", l,
                  " experts must be w_in [E, Hin, D] and w_out [E, D, F]");
      p.num_experts = wi.size(0);
      p.expert_hin = wi.size(1);
      p.expert_f = wo.size(2);
      TORCH_CHECK(li[kExpertAct] >= 0 && li[kExpertAct] <= 3 &&
                      p.expert_hin == (li[kExpertAct] == 0 ? 2 : 1) * p.expert_f,
                  "decode_step_f32: layer ", l, " expert activation does not fit w_in");
      check_weight(w[kRouterW], {p.num_experts, d}, "router", l);
      check_weight(w[kRouterB], {p.num_experts}, "router bias", l);
      check_weight(w[kExpertBias], {p.num_experts}, "expert bias", l);
      TORCH_CHECK(w[kRouterW].numel(), "decode_step_f32: layer ", l, " has no router weight");
      TORCH_CHECK(li[kTopK] >= 1 && li[kTopK] <= p.num_experts, "decode_step_f32: layer ", l, " top_k ",
                  li[kTopK], " not in [1, ", p.num_experts, "]");
      TORCH_CHECK(li[kRouteKind] >= 0 && li[kRouteKind] <= 2, "decode_step_f32: bad route kind");
      max_kt = std::max(max_kt, li[kTopK]);
      max_e = std::max(max_e, p.num_experts);
      max_hin = std::max(max_hin, li[kTopK] * p.expert_hin);
      max_f = std::max(max_f, li[kTopK] * p.expert_f);
      weight_bytes += li[kTopK] * (p.expert_hin + p.expert_f) * d * 4;
    }
    p.ffn_hin = p.ffn_f = 0;
    if (w[kFfnIn].numel()) {
      check_weight(w[kFfnIn], {-1, d}, "FFN w_in", l);
      check_weight(w[kFfnOut], {d, -1}, "FFN w_out", l);
      p.ffn_hin = w[kFfnIn].size(0);
      p.ffn_f = w[kFfnOut].size(1);
      TORCH_CHECK(li[kFfnAct] >= 0 && li[kFfnAct] <= 3 && p.ffn_hin == (li[kFfnAct] == 0 ? 2 : 1) * p.ffn_f,
                  "decode_step_f32: layer ", l, " FFN activation does not fit w_in");
      check_weight(w[kFfnInBias], {p.ffn_hin}, "FFN w_in bias", l);
      check_weight(w[kFfnOutBias], {d}, "FFN w_out bias", l);
      check_weight(w[kSharedGate], {1, d}, "shared expert gate", l);
      max_hin = std::max(max_hin, p.ffn_hin);
      max_f = std::max(max_f, p.ffn_f);
      weight_bytes += (p.ffn_hin + p.ffn_f) * d * 4;
    }
    TORCH_CHECK(li[kIsMoe] || p.ffn_hin, "decode_step_f32: layer ", l, " has neither experts nor an FFN");
    p.ln1 = ptr_or_null(w[kLn1]), p.ln2 = ptr_or_null(w[kLn2]);
    p.wq = ptr_or_null(w[kWq]), p.bq = ptr_or_null(w[kBq]), p.wk = ptr_or_null(w[kWk]), p.bk = ptr_or_null(w[kBk]);
    p.wv = ptr_or_null(w[kWv]), p.bv = ptr_or_null(w[kBv]), p.wo = ptr_or_null(w[kWo]), p.bo = ptr_or_null(w[kBo]);
    p.q_norm = ptr_or_null(w[kQNorm]), p.k_norm = ptr_or_null(w[kKNorm]);
    p.router_w = ptr_or_null(w[kRouterW]), p.router_b = ptr_or_null(w[kRouterB]);
    p.expert_bias = ptr_or_null(w[kExpertBias]);
    p.expert_in = ptr_or_null(w[kExpertIn]), p.expert_out = ptr_or_null(w[kExpertOut]);
    p.ffn_in = ptr_or_null(w[kFfnIn]), p.ffn_in_b = ptr_or_null(w[kFfnInBias]);
    p.ffn_out = ptr_or_null(w[kFfnOut]), p.ffn_out_b = ptr_or_null(w[kFfnOutBias]);
    p.shared_gate = ptr_or_null(w[kSharedGate]);
  }

  const int nt = threads_for(weight_bytes / std::max<int64_t>(1, 4 * num_layers + 1));
  const int64_t qw = nh * dh, kvw = ng * dh, per_group = nh / ng;
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  // Scratch, carved from one buffer: the residual stream, the normed input, q / new k / new v,
  // the attention output, o_proj's output (reused for the FFN's: o is added to x before the MLP
  // runs), the routed output, router buffers, hidden buffers for the experts and for the FFN (a
  // shared expert runs right after the routed ones without a barrier, so they must not share),
  // RoPE's temporary and each thread's attention scores.
  std::vector<float> buf(d * 4 + qw * 2 + kvw * 2 + 2 * max_e + max_kt + 2 * max_hin + 2 * max_f + 2 * dh +
                         static_cast<int64_t>(nt) * num_keys);
  float* next = buf.data();
  auto take = [&next](int64_t count) {
    float* out = next;
    next += count;
    return out;
  };
  float *x = take(d), *xn = take(d), *o = take(d), *y = take(d);
  float *q = take(qw), *att = take(qw), *knew = take(kvw), *vnew = take(kvw);
  float *logits_E = take(max_e), *scores_E = take(max_e), *gates = take(max_kt);
  float *h_H = take(max_hin), *hs_H = take(max_hin), *a_F = take(max_f), *as_F = take(max_f);
  float *tmp = take(2 * dh), *scores = take(static_cast<int64_t>(nt) * num_keys);
  float* ys = o;
  std::vector<int64_t> ids(max_kt);
  std::copy(x_in.data_ptr<float>(), x_in.data_ptr<float>() + d, x);

  at::Tensor logits = at::empty({1, vocab}, x_in.options());
  float* logits_V = logits.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float* fn = ptr_or_null(final_norm);
  const float* lm = lm_head.data_ptr<float>();
  const float* lmb = ptr_or_null(lm_bias);
  const int64_t pos = num_keys - 1;
  float shared_scale = 1.f;

#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    for (int64_t l = 0; l < num_layers; ++l) {
      const LayerPtrs& p = layers[l];
      const int64_t* li = ints.data() + l * kInts;
      const double* lf = floats.data() + l * kFloats;
#pragma omp single
      rms_norm(x, p.ln1, static_cast<float>(lf[kEps1]), xn, d);
      gemv_share(xn, p.wq, p.bq, q, qw, d, t, n);
      gemv_share(xn, p.wk, p.bk, knew, kvw, d, t, n);
      gemv_share(xn, p.wv, p.bv, vnew, kvw, d, t, n);
#pragma omp barrier
#pragma omp single
      {
        const float eps = static_cast<float>(lf[kQkEps]);
        for (int64_t h = 0; h < nh; ++h)
          prepare_head(q + h * dh, dh, p.q_norm, eps, li[kQkNorm], li[kInterleave], cp, sp, dr, tmp);
        for (int64_t g = 0; g < ng; ++g) {
          prepare_head(knew + g * dh, dh, p.k_norm, eps, li[kQkNorm], li[kInterleave], cp, sp, dr, tmp);
          const int64_t cap = keys[l].size(2);
          std::copy(knew + g * dh, knew + (g + 1) * dh, p.keys + (g * cap + pos) * dh);
          std::copy(vnew + g * dh, vnew + (g + 1) * dh, p.values + (g * cap + pos) * dh);
        }
      }
      {
        const int64_t cap = keys[l].size(2);
        for (int64_t h = t; h < nh; h += n) {
          const int64_t g = h / per_group;
          attend_head(q + h * dh, p.keys + g * cap * dh, p.values + g * cap * dh, num_keys, dh, scale,
                      scores + t * num_keys, att + h * dh);
        }
      }
#pragma omp barrier
      gemv_share(att, p.wo, p.bo, o, d, qw, t, n);
#pragma omp barrier
#pragma omp single
      {
        for (int64_t i = 0; i < d; ++i) x[i] += o[i];
        rms_norm(x, p.ln2, static_cast<float>(lf[kEps2]), xn, d);
        if (li[kIsMoe]) route(p, li, lf, xn, d, logits_E, scores_E, ids.data(), gates);
        shared_scale = p.shared_gate ? 1.f / (1.f + std::exp(-dot(p.shared_gate, xn, d))) : 1.f;
      }
      if (li[kIsMoe]) {
        moe_thread(t, n, xn, p.expert_in, p.expert_out, ids.data(), gates, li[kTopK], d, p.expert_f,
                   p.expert_hin, li[kExpertAct], h_H, a_F, y, n > 1);
      }
      if (p.ffn_hin) ffn_thread(t, n, p, li[kFfnAct], xn, d, hs_H, as_F, ys);
#pragma omp barrier
#pragma omp single
      {
        const bool moe = li[kIsMoe], ffn = p.ffn_hin;
        for (int64_t i = 0; i < d; ++i) x[i] += (moe ? y[i] : 0.f) + (ffn ? shared_scale * ys[i] : 0.f);
      }
    }
#pragma omp single
    rms_norm(x, fn, static_cast<float>(final_eps), xn, d);
    gemv_share(xn, lm, lmb, logits_V, vocab, d, t, n);
  }
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def(
      "decode_step_f32(Tensor x, Tensor[] weights, int[] ints, float[] floats, Tensor(a!)[] keys, "
      "Tensor(b!)[] values, int num_keys, Tensor cos, Tensor sin, Tensor final_norm, float final_eps, "
      "Tensor lm_head, Tensor lm_bias, int[] dims) -> Tensor");
}

TORCH_LIBRARY_IMPL(moekit, CPU, m) { m.impl("decode_step_f32", &decode_step_f32); }
