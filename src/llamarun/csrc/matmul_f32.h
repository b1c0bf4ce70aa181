// float32 weights: the per-row product, inline for the f32_linear op (matmul_f32.cpp) and the
// Decoder.
#pragma once

#include "common.h"

namespace llamarun {

// ---- float32 weights (out, K). One arithmetic for every batch size (batch invariance): an
// output sums its 8-float chunks alternately into two 8-lane accumulators (chunk c into c % 2;
// two chains hide the fused multiply-add latency of a lone row), then hsum(acc0 + acc1) plus
// the last K % 8 products in order. NB activation rows share each weight load.
template <int NB>
inline void f32_rows(const float* w, int64_t K, const float* x, int64_t b0, float* out, int64_t N, int64_t o) {
  if (NB == 1) prefetch_row(w + 2 * K, 4 * K);  // batch 1 streams from DRAM: the row two ahead
  __m256 acc[NB][2];
  for (int j = 0; j < NB; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int j = 0; j < NB; ++j) {
      acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (b0 + j) * K + k), acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + (b0 + j) * K + k + 8), acc[j][1]);
    }
  }
  if (k + 8 <= K) {
    const __m256 w0 = _mm256_loadu_ps(w + k);
    for (int j = 0; j < NB; ++j) acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (b0 + j) * K + k), acc[j][0]);
    k += 8;
  }
  for (int j = 0; j < NB; ++j) {
    float sum = hsum(_mm256_add_ps(acc[j][0], acc[j][1]));
    for (int64_t kk = k; kk < K; ++kk) sum += w[kk] * x[(b0 + j) * K + kk];
    out[(b0 + j) * N + o] = sum;
  }
}

// All B activation rows against weight row o: TILE rows per pass over the weight row, then the
// rest in one pass (a pass per leftover row was load-bound: two loads per multiply-add)
inline void f32_row(const float* w, int64_t K, const float* x, int64_t B, float* out, int64_t N, int64_t o) {
  int64_t b0 = 0;
  for (; b0 + TILE <= B; b0 += TILE) f32_rows<TILE>(w, K, x, b0, out, N, o);
  switch (B - b0) {
    case 3: return f32_rows<3>(w, K, x, b0, out, N, o);
    case 2: return f32_rows<2>(w, K, x, b0, out, N, o);
    case 1: return f32_rows<1>(w, K, x, b0, out, N, o);
    default: return;
  }
}

}  // namespace llamarun
