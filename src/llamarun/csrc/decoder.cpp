// ---- the whole decode step in one call (issue 5): at batch 1 the ~40 eager torch ops per layer
// cost more than the matrix products; here each layer is 4 parallel products and a few loops.
// float32 activations and KV cache; linears of any kind (matmul_*); one token per row (T = 1).

#include <torch/library.h>
#include <torch/custom_class.h>

#include "amx.h"
#include "common.h"
#include "gguf_blocks.h"
#include "linear_kinds.h"
#include "matmul_f32.h"
#include "matmul_gguf.h"
#include "matmul_int8.h"
#include "matmul_q4.h"
#include "ops.h"
#include "quantize_act.h"

namespace llamarun {
namespace {

struct Lin {
  int64_t kind = LIN_NONE, N = 0, K = 0, G = 1;  // K: stored (padded) input width; GGUF: G = type
  int64_t row_bytes = 0;  // GGUF: bytes per weight row
  const void* a = nullptr;
  const void* b = nullptr;
  const void* c = nullptr;
};

// 8 floats from a float32 or float16 (KV cache) array
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// dst[0..n) = src as float32 or float16
inline void store_row(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, int64_t n, at::Half* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = at::Half(src[i]);
}

template <typename T>
inline float dot_f32(const float* a, const T* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * (float)b[i];
  return s;
}

// y = x / rms(x) * w per row, like RMSNorm in float32
void rms_norm(const float* x, const float* w, int64_t B, int64_t C, double eps, float* y) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * C;
    const float r = 1.f / std::sqrt(dot_f32(xr, xr, C) / C + (float)eps);
    for (int64_t i = 0; i < C; ++i) y[b * C + i] = xr[i] * r * w[i];
  }
}

// exp(x) for 8 floats: 2^k * e^r with |r| <= ln2 / 2 and Cephes' degree-6 polynomial for e^r
// (relative error ~2e-7); softmax and SiLU spent more time in scalar std::exp than in attention
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// y[i] = silu(gate[i]) * up[i]
void silu_mul(const float* gate, const float* up, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sig = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(sig, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) y[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// o (D) = softmax(q . k_t * scale over t < n) weighted sum of v_t; k, v (n, D) float32 or float16;
// p: n floats of scratch
template <typename T>
void attend(const float* q, const T* k, const T* v, int64_t n, int64_t D, float scale, float* p, float* o) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {  // four positions at a time: one horizontal reduction for all four
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int u = 0; u < 4; ++u) a[u] = _mm256_fmadd_ps(qv, load8(k + (t + u) * D + d), a[u]);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    float sc[4];
    _mm_storeu_ps(sc, s4);
    for (int u = 0; u < 4; ++u) {
      for (int64_t dd = d; dd < D; ++dd) sc[u] += q[dd] * (float)k[(t + u) * D + dd];
      p[t + u] = sc[u] * scale;
    }
  }
  for (; t < n; ++t) p[t] = dot_f32(q, k + t * D, D) * scale;
  float mx = -INFINITY;
  for (t = 0; t < n; ++t) mx = std::max(mx, p[t]);
  __m256 sv = _mm256_setzero_ps();
  t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(p + t, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  for (; t < n; ++t) sum += (p[t] = std::exp(p[t] - mx));
  const float inv = 1.f / sum;
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {  // four output vectors kept in registers across all positions
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (t = 0; t < n; ++t) {
      const __m256 pt = _mm256_set1_ps(p[t]);
      const T* vt = v + t * D + d;
      a0 = _mm256_fmadd_ps(pt, load8(vt), a0);
      a1 = _mm256_fmadd_ps(pt, load8(vt + 8), a1);
      a2 = _mm256_fmadd_ps(pt, load8(vt + 16), a2);
      a3 = _mm256_fmadd_ps(pt, load8(vt + 24), a3);
    }
    const __m256 iv = _mm256_set1_ps(inv);
    _mm256_storeu_ps(o + d, _mm256_mul_ps(a0, iv));
    _mm256_storeu_ps(o + d + 8, _mm256_mul_ps(a1, iv));
    _mm256_storeu_ps(o + d + 16, _mm256_mul_ps(a2, iv));
    _mm256_storeu_ps(o + d + 24, _mm256_mul_ps(a3, iv));
  }
  for (; d + 8 <= D; d += 8) {
    __m256 a0 = _mm256_setzero_ps();
    for (t = 0; t < n; ++t) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), load8(v + t * D + d), a0);
    _mm256_storeu_ps(o + d, _mm256_mul_ps(a0, _mm256_set1_ps(inv)));
  }
  for (; d < D; ++d) {
    float a = 0.f;
    for (t = 0; t < n; ++t) a += p[t] * (float)v[t * D + d];
    o[d] = a * inv;
  }
}

struct Decoder : torch::CustomClassHolder {
  std::vector<at::Tensor> keep;  // every tensor pointed at below stays alive with the decoder
  std::vector<const float*> norms;  // attention and ffn norm per layer, then the final norm
  std::vector<Lin> lins;  // per layer: wq wk wv wo w1 w3 w2 (fused wqkv / w13 sit in wq / w1), then output
  std::vector<void*> kc, vc;  // per layer (maxB, Hkv, S, D), float32 or (half_kv) float16
  bool half_kv = false;
  const float *cos, *sin;  // (S, D/2)
  const void* embed;  // (V_in, C) token embeddings: float32, or GGUF blocks of embed_type
  int64_t embed_type = -1, embed_row_bytes = 0;
  int64_t n_tokens;
  int64_t L, C, H, Hkv, D, F, V, S, maxB;
  double eps;
  std::vector<float> h, xn, qkv, att, tmp, gu, act;
  std::vector<int8_t> xq, xq4;  // activations in the plain and the paired (4-bit) layout
  std::vector<float> dx, xs, xcb, xc;
  X16 x16;  // activations for the GGUF linears (x8: for those of the byte-form types)
  X8 x8;
  bool amx = false;  // per-channel int8 products of 2+ rows on AMX tiles (opt-in: not batch-invariant)

  // embed_type: -1 for a float32 embed_t, else the GGUF type of its uint8 block rows
  Decoder(std::vector<at::Tensor> norm_w, std::vector<at::Tensor> weights, std::vector<int64_t> kinds,
          std::vector<at::Tensor> caches, at::Tensor cos_t, at::Tensor sin_t, at::Tensor embed_t, int64_t embed_type_,
          int64_t n_heads, int64_t n_kv_heads, double norm_eps) {
    TORCH_CHECK(kinds.size() % 7 == 1 && weights.size() == 3 * kinds.size(), "Decoder: bad linear list");
    L = (int64_t)kinds.size() / 7;
    TORCH_CHECK((int64_t)norm_w.size() == 2 * L + 1 && (int64_t)caches.size() == 2 * L, "Decoder: bad lists");
    auto hold = [&](const at::Tensor& t, at::ScalarType type) {
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == type, "Decoder: tensor of wrong kind");
      keep.push_back(t);
      return t;
    };
    for (auto& t : norm_w) norms.push_back(hold(t, at::kFloat).data_ptr<float>());
    for (size_t i = 0; i < kinds.size(); ++i) {
      Lin l;
      l.kind = kinds[i];
      const at::Tensor &a = weights[3 * i], &b = weights[3 * i + 1], &c = weights[3 * i + 2];
      if (l.kind == LIN_F32) {
        l.a = hold(a, at::kFloat).data_ptr<float>();
        l.N = a.size(0), l.K = a.size(1);
      } else if (l.kind == LIN_INT8) {
        l.a = hold(a, at::kChar).data_ptr<int8_t>();
        l.b = hold(b, at::kFloat).data_ptr<float>();
        l.N = a.size(0), l.K = a.size(1), l.G = b.size(1);
        TORCH_CHECK(l.K % QK == 0 && (l.G == 1 || l.G == l.K / QK), "Decoder: bad int8 layout");
      } else if (l.kind == LIN_Q4) {
        l.a = hold(a, at::kByte).data_ptr<uint8_t>();
        l.b = hold(b, at::kHalf).data_ptr<at::Half>();
        l.c = hold(c, at::kHalf).data_ptr<at::Half>();
        l.N = a.size(0), l.K = 2 * a.size(1);
        TORCH_CHECK(l.K % QK == 0 && b.size(1) == l.K / QK && c.size(1) == l.K / QK, "Decoder: bad q4 layout");
      } else if (l.kind == LIN_GGUF) {  // b: int64 [type, in_features]
        l.a = hold(a, at::kByte).data_ptr<uint8_t>();
        const int64_t* spec = hold(b, at::kLong).data_ptr<int64_t>();
        l.G = spec[0], l.K = spec[1], l.N = a.size(0), l.row_bytes = a.size(1);
        TORCH_CHECK(a.dim() == 2 && block_row_bytes(l.G, l.K) == l.row_bytes, "Decoder: bad GGUF layout");
      } else {
        TORCH_CHECK(l.kind == LIN_NONE, "Decoder: unknown linear kind");
      }
      lins.push_back(l);
    }
    half_kv = caches[0].scalar_type() == at::kHalf;
    for (int64_t i = 0; i < 2 * L; ++i)
      (i % 2 ? vc : kc).push_back(hold(caches[i], half_kv ? at::kHalf : at::kFloat).data_ptr());
    cos = hold(cos_t, at::kFloat).data_ptr<float>();
    sin = hold(sin_t, at::kFloat).data_ptr<float>();
    embed_type = embed_type_;
    if (embed_type < 0) {
      embed = hold(embed_t, at::kFloat).data_ptr<float>();
    } else {
      embed = hold(embed_t, at::kByte).data_ptr<uint8_t>();
      embed_row_bytes = embed_t.size(1);
    }
    n_tokens = embed_t.size(0);
    maxB = caches[0].size(0), Hkv = caches[0].size(1), S = caches[0].size(2), D = caches[0].size(3);
    H = n_heads, eps = norm_eps;
    TORCH_CHECK(n_kv_heads == Hkv && H % Hkv == 0 && cos_t.size(0) == S && cos_t.size(1) == D / 2, "Decoder: bad cache shape");
    C = norm_w[0].size(0);
    TORCH_CHECK(embed_t.dim() == 2 && (embed_type < 0 ? embed_t.size(1) == C : block_row_bytes(embed_type, C) == embed_row_bytes),
                "Decoder: embedding shape");
    V = lins.back().N;
    F = 0;
    for (int64_t l = 0; l < L; ++l) {
      const Lin* g = &lins[7 * l];
      TORCH_CHECK(out_width(g, 3) == (H + 2 * Hkv) * D && out_width(g + 3, 1) == C, "Decoder: attention shapes");
      F = out_width(g + 4, 2) / 2;
      TORCH_CHECK(g[6].N == C, "Decoder: feed-forward shapes");
    }
  }

  static int64_t out_width(const Lin* g, int n) {
    int64_t w = 0;
    for (int i = 0; i < n; ++i) w += g[i].N;
    return w;
  }

  // out (B, ld) = x (B, K) times the weights of g[0..n), their outputs side by side
  void matmul(const Lin* g, int n, const float* x, int64_t B, int64_t K, float* out) {
    const int64_t ld = out_width(g, n);
    int64_t Kp = K;
    for (int i = 0; i < n; ++i) {
      if (g[i].kind == LIN_NONE) continue;
      const bool exact = g[i].kind == LIN_F32 || g[i].kind == LIN_GGUF;
      TORCH_CHECK(exact ? g[i].K == K : g[i].K == (K + QK - 1) / QK * QK, "Decoder: input width");
      if (!exact) Kp = g[i].K;
    }
    const auto on_amx = [&](const Lin& l) { return l.kind == LIN_INT8 && l.G == 1; };
    if (amx && B >= AMX_MIN_ROWS && amx_usable() && std::any_of(g, g + n, on_amx)) {
      std::vector<Lin> rest(g, g + n);  // per-channel int8 linears on AMX tiles, the others below
      std::vector<AmxJob> jobs;
      int64_t off = 0;
      for (int i = 0; i < n; off += g[i].N, ++i)
        if (on_amx(g[i])) {
          jobs.push_back({(const int8_t*)g[i].a, (const float*)g[i].b, g[i].N, g[i].K, out + off, ld});
          rest[i].kind = LIN_SKIP;
        }
      amx_int8(jobs, AmxX(x, B, K));
      if (std::any_of(rest.begin(), rest.end(), [](const Lin& l) { return l.kind != LIN_SKIP && l.kind != LIN_NONE; }))
        matmul_avx(rest.data(), n, x, B, K, Kp, ld, out);
      return;
    }
    matmul_avx(g, n, x, B, K, Kp, ld, out);
  }

  // matmul on the AVX kernels; linears of kind LIN_SKIP are left alone (their columns done)
  void matmul_avx(const Lin* g, int n, const float* x, int64_t B, int64_t K, int64_t Kp, int64_t ld, float* out) {
    const bool any8 = std::any_of(g, g + n, [](const Lin& l) { return l.kind == LIN_INT8; });
    const bool any4 = std::any_of(g, g + n, [](const Lin& l) { return l.kind == LIN_Q4; });
    if (std::any_of(g, g + n, [](const Lin& l) { return l.kind == LIN_GGUF && !gguf_takes_x8(l.G); })) x16.quantize(x, B, K);
    if (std::any_of(g, g + n, [](const Lin& l) { return l.kind == LIN_GGUF && gguf_takes_x8(l.G); })) x8.quantize(x, B, K);
    dx.resize(B * Kp / QK), xs.resize(B * Kp / QK), xcb.resize(B * Kp / QK);
    if (any8) {
      xq.resize(B * 2 * Kp), xc.resize(B);
      quantize_rows(x, B, K, Kp, xq.data(), dx.data(), xs.data(), xcb.data());
      row_sums(xcb.data(), B, Kp / QK, xc.data());
    }
    if (any4) xq4.resize(B * 2 * Kp), quantize_rows(x, B, K, Kp, xq4.data(), dx.data(), xs.data(), xcb.data(), true);
    const int64_t nb = Kp / QK;
    parallel_rows(ld, [&](int64_t begin, int64_t end) {
      int64_t off = 0;
      for (int i = 0; i < n; ++i) {
        const Lin& l = g[i];
        if (l.kind == LIN_SKIP) {
          off += l.N;
          continue;
        }
        float* o_base = out + off;
        const int64_t lo = std::max(begin, off) - off, hi = std::min(end, off + l.N) - off;
        if (l.kind == LIN_INT8 && lo < hi)  // two weight rows at a time
          int8_range((const int8_t*)l.a, (const float*)l.b, l.G, Kp, xq.data(), dx.data(), xcb.data(), xc.data(), B,
                     o_base, ld, lo, hi);
        if (l.kind == LIN_GGUF && lo < hi) gguf_range(l.G, (const uint8_t*)l.a, l.row_bytes, x16, x8, o_base, ld, lo, hi);
        for (int64_t o = lo; l.kind != LIN_INT8 && l.kind != LIN_GGUF && o < hi; ++o) {
          int64_t b0 = 0;
          if (l.kind == LIN_F32) {
            f32_row((const float*)l.a + o * K, K, x, B, o_base, ld, o);
          } else {
            const uint8_t* w = (const uint8_t*)l.a + o * (Kp / 2);
            const at::Half* d = (const at::Half*)l.b + o * nb;
            const at::Half* m = (const at::Half*)l.c + o * nb;
            for (; b0 + TILE <= B; b0 += TILE) q4_rows<TILE>(w, d, m, Kp, xq4.data(), dx.data(), xs.data(), b0, o_base, ld, o);
            for (; b0 < B; ++b0) q4_rows<1>(w, d, m, Kp, xq4.data(), dx.data(), xs.data(), b0, o_base, ld, o);
          }
        }
        off += l.N;
      }
    });
  }

  // rotate the interleaved pairs of n heads of x by position p
  void rope(float* x, int64_t n, int64_t p) const {
    const float *c = cos + p * (D / 2), *s = sin + p * (D / 2);
    for (int64_t hd = 0; hd < n; ++hd) {
      float* v = x + hd * D;
      for (int64_t i = 0; i < D / 2; ++i) {
        const float x0 = v[2 * i], x1 = v[2 * i + 1];
        v[2 * i] = x0 * c[i] - x1 * s[i];
        v[2 * i + 1] = x0 * s[i] + x1 * c[i];
      }
    }
  }

  void attention(int64_t l, const int64_t* pos, const int64_t* rows, int64_t B) {
    const int64_t W = (H + 2 * Hkv) * D, rep = H / Hkv;
    int64_t work = 0;
    for (int64_t b = 0; b < B; ++b) work += H * (pos[b] + 1) * D;
    const float scale = 1.f / std::sqrt((float)D);
    auto heads = [&](int64_t begin, int64_t end) {
      std::vector<float> p(S);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / H, hq = i % H, g = hq / rep, n = pos[b] + 1;
        const float* q = qkv.data() + b * W + hq * D;
        const int64_t row = ((rows[b] * Hkv + g) * S) * D;
        float* o = att.data() + b * H * D + hq * D;
        if (half_kv) attend(q, (const at::Half*)kc[l] + row, (const at::Half*)vc[l] + row, n, D, scale, p.data(), o);
        else attend(q, (const float*)kc[l] + row, (const float*)vc[l] + row, n, D, scale, p.data(), o);
      }
    };
    if (work < (1 << 15)) heads(0, B * H);
    else at::parallel_for(0, B * H, 1, heads);
  }

  // tokens, pos, rows: (B,) int64; returns the logits (B, V)
  at::Tensor step(at::Tensor tokens_t, at::Tensor pos_t, at::Tensor rows_t) {
    auto tok_c = tokens_t.to(at::kLong).contiguous(), pos_c = pos_t.to(at::kLong).contiguous(),
         rows_c = rows_t.to(at::kLong).contiguous();
    const int64_t B = tok_c.numel();
    TORCH_CHECK(pos_c.numel() == B && rows_c.numel() == B, "Decoder.step: one position and row per token");
    const int64_t *tok = tok_c.data_ptr<int64_t>(), *pos = pos_c.data_ptr<int64_t>(), *rows = rows_c.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(0 <= pos[b] && pos[b] < S && 0 <= rows[b] && rows[b] < maxB && 0 <= tok[b] && tok[b] < n_tokens,
                  "Decoder.step: token, position or row out of range");
    const int64_t W = (H + 2 * Hkv) * D;
    h.resize(B * C);
    for (int64_t b = 0; b < B; ++b) {
      if (embed_type < 0) std::copy((const float*)embed + tok[b] * C, (const float*)embed + (tok[b] + 1) * C, h.data() + b * C);
      else gguf_dequantize_rows(embed_type, (const uint8_t*)embed, embed_row_bytes, C, tok + b, 1, h.data() + b * C);
    }
    xn.resize(B * C), qkv.resize(B * W), att.resize(B * H * D), tmp.resize(B * C), gu.resize(B * 2 * F), act.resize(B * F);
    for (int64_t l = 0; l < L; ++l) {
      const Lin* g = &lins[7 * l];
      rms_norm(h.data(), norms[2 * l], B, C, eps, xn.data());
      matmul(g, 3, xn.data(), B, C, qkv.data());
      for (int64_t b = 0; b < B; ++b) {
        float* r = qkv.data() + b * W;
        rope(r, H + Hkv, pos[b]);  // q heads then k heads
        for (int64_t kh = 0; kh < Hkv; ++kh) {
          const int64_t slot = ((rows[b] * Hkv + kh) * S + pos[b]) * D;
          if (half_kv) {
            store_row(r + (H + kh) * D, D, (at::Half*)kc[l] + slot);
            store_row(r + (H + Hkv + kh) * D, D, (at::Half*)vc[l] + slot);
          } else {
            store_row(r + (H + kh) * D, D, (float*)kc[l] + slot);
            store_row(r + (H + Hkv + kh) * D, D, (float*)vc[l] + slot);
          }
        }
      }
      attention(l, pos, rows, B);
      matmul(g + 3, 1, att.data(), B, H * D, tmp.data());
      for (int64_t i = 0; i < B * C; ++i) h[i] += tmp[i];
      rms_norm(h.data(), norms[2 * l + 1], B, C, eps, xn.data());
      matmul(g + 4, 2, xn.data(), B, C, gu.data());
      for (int64_t b = 0; b < B; ++b) silu_mul(gu.data() + b * 2 * F, gu.data() + b * 2 * F + F, F, act.data() + b * F);
      matmul(g + 6, 1, act.data(), B, F, tmp.data());
      for (int64_t i = 0; i < B * C; ++i) h[i] += tmp[i];
    }
    rms_norm(h.data(), norms[2 * L], B, C, eps, xn.data());
    auto logits = at::empty({B, V}, at::TensorOptions().dtype(at::kFloat));
    matmul(&lins[7 * L], 1, xn.data(), B, C, logits.data_ptr<float>());
    return logits;
  }
};

}  // namespace

at::Tensor silu_mul_rows(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat, "silu_mul: float32 only");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.dim() >= 1, "silu_mul: gate and up differ in shape");
  const int64_t F = gate.size(-1);
  // rows may be strided (gate and up as the halves of one fused product); the last dim must not be
  const at::Tensor g = gate.stride(-1) == 1 ? gate.reshape({-1, F}) : gate.contiguous().reshape({-1, F});
  const at::Tensor u = up.stride(-1) == 1 ? up.reshape({-1, F}) : up.contiguous().reshape({-1, F});
  const int64_t R = g.size(0), gs = g.stride(0), us = u.stride(0);
  at::Tensor y = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // one row per call, so each row's last F % 8 values take the same (scalar) path in any batch
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul(gp + r * gs, upp + r * us, F, yp + r * F);
  });
  return y;
}

// the Decoder class of the llamarun_cpu library (ops.cpp's TORCH_LIBRARY block calls this)
void register_decoder(torch::Library& lib) {
  lib.class_<Decoder>("Decoder")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                       at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t, double>())
      .def("step", &Decoder::step)
      .def("set_amx", [](const c10::intrusive_ptr<Decoder>& self, bool on) { self->amx = on; });
}

}  // namespace llamarun
