// What every kernel file shares: the x86 SIMD helpers (AVX2; VNNI where the compiler targets it),
// the block of the activation quantization, torch's thread pool and the tensor plumbing of the op
// entry points. All inline: the loops in the other files inline them as they did in one file.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace llamarun {

// fn(begin, end) over parts of [0, N) on torch's intra-op threads
inline void parallel_rows(int64_t N, const std::function<void(int64_t, int64_t)>& fn) {
  at::parallel_for(0, N, std::max<int64_t>(16, N / (at::get_num_threads() * 4)), fn);
}

constexpr int QK = 32;  // block of the activation quantization (and of 4-bit weight groups)

// sum over 8 int32 lanes of u8 a x s8 b, 32 byte pairs
inline __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

// 256 * (a . b1) + a . b2 over 32 byte pairs, in 8 int32 lanes (no overflow for |a| <= 128)
inline __m256i dot2_u8s8(__m256i a, __m256i b1, __m256i b2) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_slli_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b1), 8), a, b2);
#else
  return _mm256_add_epi32(_mm256_slli_epi32(dot_u8s8(a, b1), 8), dot_u8s8(a, b2));
#endif
}

// acc + (u8 a) . (s8 b) per 4 byte pairs, in 8 int32 lanes (AVX2: exact while a <= 15 or |b| < 128
// keeps each pair sum inside int16)
inline __m256i dpbusd(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

// the largest of 8 lanes
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// max |x[i]| over i < n (0 for n <= 0)
inline float abs_max(const float* x, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask));
  float m = hmax(vmax);
  for (; j < n; ++j) m = std::max(m, std::abs(x[j]));
  return m;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Prefetch the lines of n bytes at p (a weight row two rows ahead at batch 1: from DRAM, a
// float32 matrix-vector product streamed at ~21.5 GB/s on 2 threads with it, ~18 without; the
// int8 rows gain too, the 4-bit ones measured slower with it)
inline void prefetch_row(const void* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) _mm_prefetch((const char*)p + i, _MM_HINT_T0);
}

constexpr int64_t TILE = 4;  // batch rows that share one read of a weight row

// dst[0..n) = src rounded to bfloat16, to nearest even as torch's own conversion (prompt tiles on
// CPUs whose bfloat16 GEMM is the fast one)
inline void floats_to_bf16(const float* src, int64_t n, at::BFloat16* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h[2];
    for (int c = 0; c < 2; ++c) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src + i + 8 * c));
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      h[c] = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    }
    // packus interleaves 128-bit lanes; permute4x64 puts the 16 values back in order
    _mm256_storeu_si256((__m256i*)(dst + i), _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xD8));
  }
  for (; i < n; ++i) dst[i] = at::BFloat16(src[i]);
}

// Rows of a prompt's tile: out (n, K) float32 or bfloat16, contiguous, on the CPU; row(i, dst)
// writes row i as K floats into dst, out's own row or, for bfloat16, a row of scratch in L1 that
// is then rounded (floats_to_bf16). One thread's share is `grain` rows or more.
template <class Fn>
void rows_into(const at::Tensor& out, int64_t K, int64_t grain, const char* op, Fn&& row) {
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_CHECK(out.device().is_cpu() && (out.scalar_type() == at::kFloat || bf16) && out.is_contiguous() &&
                  out.dim() == 2 && out.size(1) == K,
              op, ": out must be a contiguous float32 or bfloat16 (n, ", K, ") CPU tensor");
  at::parallel_for(0, out.size(0), grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(bf16 ? K : 0);
    for (int64_t i = begin; i < end; ++i) {
      if (!bf16) {
        row(i, out.data_ptr<float>() + i * K);
        continue;
      }
      row(i, scratch.data());
      floats_to_bf16(scratch.data(), K, out.data_ptr<at::BFloat16>() + i * K);
    }
  });
}

inline at::Tensor flat_input(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "llamarun cpu kernels need CPU tensors");
  return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
}

inline at::Tensor reshape_output(const at::Tensor& out2d, const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.back() = out2d.size(1);
  return out2d.view(sizes).to(x.scalar_type());
}

}  // namespace llamarun
