// 4-bit weights: the per-row product, inline for the q4_linear op (matmul_q4.cpp) and the Decoder.
#pragma once

#include "common.h"

namespace llamarun {

// ---- 4-bit weights in GGUF Q4 nibble order: qs (N, Kp/2) uint8, per group of 32 byte i holds
// element i (low nibble) and element i+16 (high nibble); w = d * q + m with d, m (N, Kp/32) fp16.
// Activations in the paired layout (quantize_rows): one 32-byte load of two groups' nibbles
// meets its activations without a shuffle, lanes 0-3 summing group A and 4-7 group B, and one
// conversion and multiply-add serve both groups (1.4x the plain layout's speed here).
// One accumulator per output for every NB: a row's sum is the same alone and in a batch.
template <int NB>
inline void q4_rows(const uint8_t* qs, const at::Half* d, const at::Half* m, int64_t Kp, const int8_t* xq,
                    const float* dx, const float* xs, int64_t b0, float* out, int64_t N, int64_t o) {
  constexpr int U = 1;
  const int64_t nb = Kp / QK;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[NB][U], macc[NB];
  for (int j = 0; j < NB; ++j) { macc[j] = _mm256_setzero_ps(); for (int u = 0; u < U; ++u) acc[j][u] = _mm256_setzero_ps(); }
  const __m256i idx[4] = {_mm256_setr_epi32(0,0,0,0,1,1,1,1), _mm256_setr_epi32(2,2,2,2,3,3,3,3), _mm256_setr_epi32(4,4,4,4,5,5,5,5), _mm256_setr_epi32(6,6,6,6,7,7,7,7)};
  int64_t blk = 0;
  for (; blk + 8 <= nb; blk += 8) {
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + blk)));
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(m + blk)));
    __m256 ds[NB];
    for (int j = 0; j < NB; ++j) {
      ds[j] = _mm256_mul_ps(dv, _mm256_loadu_ps(dx + (b0 + j) * nb + blk));
      macc[j] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xs + (b0 + j) * nb + blk), macc[j]);
    }
    for (int p = 0; p < 4; ++p) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(qs + (blk + 2 * p) * 16));
      const __m256i lo = _mm256_and_si256(q, low4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
      for (int j = 0; j < NB; ++j) {
        const int8_t* xb = xq + ((b0 + j) * nb + blk + 2 * p) * 2 * QK;
        __m256i t1 = dpbusd(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i*)xb));
        t1 = dpbusd(t1, hi, _mm256_loadu_si256((const __m256i*)(xb + 32)));
        __m256i s = dpbusd(_mm256_slli_epi32(t1, 8), lo, _mm256_loadu_si256((const __m256i*)(xb + 64)));
        s = dpbusd(s, hi, _mm256_loadu_si256((const __m256i*)(xb + 96)));
        acc[j][p % U] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_permutevar8x32_ps(ds[j], idx[p]), acc[j][p % U]);
      }
    }
  }
  float tail[NB];
  for (int j = 0; j < NB; ++j) tail[j] = 0.f;
  for (; blk < nb; ++blk) {  // natural or paired order: handle pairs then a single
    const bool pair = blk + 2 <= nb;
    if (pair) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(qs + blk * 16));
      const __m256i lo = _mm256_and_si256(q, low4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
      const float dA = (float)d[blk], dB = (float)d[blk + 1];
      for (int j = 0; j < NB; ++j) {
        const int8_t* xb = xq + ((b0 + j) * nb + blk) * 2 * QK;
        __m256i t1 = dpbusd(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i*)xb));
        t1 = dpbusd(t1, hi, _mm256_loadu_si256((const __m256i*)(xb + 32)));
        __m256i s = dpbusd(_mm256_slli_epi32(t1, 8), lo, _mm256_loadu_si256((const __m256i*)(xb + 64)));
        s = dpbusd(s, hi, _mm256_loadu_si256((const __m256i*)(xb + 96)));
        const float sA = dA * dx[(b0 + j) * nb + blk], sB = dB * dx[(b0 + j) * nb + blk + 1];
        acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_setr_ps(sA, sA, sA, sA, sB, sB, sB, sB), acc[j][0]);
        tail[j] += (float)m[blk] * xs[(b0 + j) * nb + blk] + (float)m[blk + 1] * xs[(b0 + j) * nb + blk + 1];
      }
      ++blk;
      continue;
    }
    const float dw = (float)d[blk], mw = (float)m[blk];
    const __m128i q = _mm_loadu_si128((const __m128i*)(qs + blk * 16));
    const __m128i l4 = _mm_set1_epi8(0x0F);
    const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), l4), _mm_and_si128(q, l4));
    for (int j = 0; j < NB; ++j) {
      const int8_t* xb = xq + ((b0 + j) * nb + blk) * 2 * QK;
      const __m256i s = dot2_u8s8(wv, _mm256_loadu_si256((const __m256i*)xb), _mm256_loadu_si256((const __m256i*)(xb + QK)));
      acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * dx[(b0 + j) * nb + blk]), acc[j][0]);
      tail[j] += mw * xs[(b0 + j) * nb + blk];
    }
  }
  for (int j = 0; j < NB; ++j) {
    __m256 a = acc[j][0];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[j][u]);
    out[(b0 + j) * N + o] = hsum(a) + hsum(macc[j]) + tail[j];
  }
}

}  // namespace llamarun
