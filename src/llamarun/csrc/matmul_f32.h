// float32 weights: the per-row product, inline for the f32_linear op (matmul_f32.cpp) and the
// Decoder.
#pragma once

#include "common.h"

namespace llamarun {

// Independent accumulators per batch row: one row alone would wait on the fmadd latency chain.
template <int NB> constexpr int lanes() { return NB == 1 ? 4 : 1; }

// ---- float32 weights (out, K): batch-1 matrix-vector products near memory bandwidth
template <int NB>
inline void f32_rows(const float* w, int64_t K, const float* x, int64_t b0, float* out, int64_t N, int64_t o) {
#ifdef __AVX512F__
  if (NB == 1) {  // one row: 64-byte loads, the row two ahead fetched meanwhile
    prefetch_row(w + 2 * K, 4 * K);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + b0 * K + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + b0 * K + k + 16), a1);
    }
    for (; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + b0 * K + k), a0);
    }
    out[b0 * N + o] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    return;
  }
#endif
  constexpr int U = lanes<NB>();
  __m256 acc[NB][U];
  for (int j = 0; j < NB; ++j)
    for (int u = 0; u < U; ++u) acc[j][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 wv = _mm256_loadu_ps(w + k + 8 * u);
      for (int j = 0; j < NB; ++j) acc[j][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (b0 + j) * K + k + 8 * u), acc[j][u]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    __m256 a = acc[j][0];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[j][u]);
    float sum = hsum(a);
    for (int64_t kk = k; kk < K; ++kk) sum += w[kk] * x[(b0 + j) * K + kk];
    out[(b0 + j) * N + o] = sum;
  }
}

}  // namespace llamarun
