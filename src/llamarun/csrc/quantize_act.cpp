// Activation quantization: the layouts are described in quantize_act.h.
#include "quantize_act.h"

namespace llamarun {

void quantize_rows(const float* x, int64_t B, int64_t K, int64_t Kp, int8_t* xq, float* dx, float* xs,
                   float* xcb, bool paired, float* xs16, float* xs32, int64_t scale_group) {
  const int64_t nb = Kp / QK, per = scale_group / QK;  // blocks of 32 per scale
  // the max |x| of each group of scale_group (> 32: one scale for several blocks)
  std::vector<float> gmax(per > 1 ? B * nb / per : 0);
  for (int64_t i = 0; i < (int64_t)gmax.size(); ++i) {
    const int64_t b = i / (nb / per), lo = (i % (nb / per)) * scale_group, n = std::min(scale_group, K - lo);
    gmax[i] = abs_max(x + b * K + lo, n);
  }
  auto rows = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nb, blk = i % nb;
      const float* src = x + b * K + blk * QK;
      const int64_t n = std::min<int64_t>(QK, K - blk * QK);
      float buf[QK] = {0};
      for (int64_t j = 0; j < n; ++j) buf[j] = src[j];
      __m256 v[4], vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
      const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      for (int c = 0; c < 4; ++c) {
        v[c] = _mm256_loadu_ps(buf + 8 * c);
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(v[c], abs_mask));
        vsum = _mm256_add_ps(vsum, v[c]);
      }
      const float amax = per > 1 ? gmax[(b * nb + blk) / per] : hmax(vmax), sum = hsum(vsum);
      const float d1 = amax / 127.f, id1 = d1 ? 1.f / d1 : 0.f, id2 = id1 * 256.f;
      int8_t* dst = xq + (b * nb + blk) * 2 * QK;
      int8_t q[2 * QK];
      __m256i q1i[4], q2i[4];
      __m256 vh[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // 256 q1 + q2 summed per 16
      constexpr int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      for (int c = 0; c < 4; ++c) {
        const __m256 q1 = _mm256_round_ps(_mm256_mul_ps(v[c], _mm256_set1_ps(id1)), round);
        const __m256 r = _mm256_sub_ps(v[c], _mm256_mul_ps(q1, _mm256_set1_ps(d1)));
        __m256 q2 = _mm256_round_ps(_mm256_mul_ps(r, _mm256_set1_ps(id2)), round);
        q2 = _mm256_min_ps(_mm256_max_ps(q2, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
        vh[c / 2] = _mm256_add_ps(vh[c / 2], _mm256_fmadd_ps(q1, _mm256_set1_ps(256.f), q2));  // exact: |sum| < 2^24
        q1i[c] = _mm256_cvtps_epi32(q1), q2i[c] = _mm256_cvtps_epi32(q2);
      }
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
      auto pack = [&](const __m256i* w) {
        return _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(w[0], w[1]), _mm256_packs_epi32(w[2], w[3])), order);
      };
      _mm256_storeu_si256((__m256i*)q, pack(q1i));
      _mm256_storeu_si256((__m256i*)(q + QK), pack(q2i));
      const float h0 = hsum(vh[0]), h1 = hsum(vh[1]);  // exact integers
      if (xcb) xcb[b * nb + blk] = 128.f * (d1 / 256.f) * (h0 + h1);
      if (xs16) xs16[2 * (b * nb + blk)] = d1 / 256.f * h0, xs16[2 * (b * nb + blk) + 1] = d1 / 256.f * h1;
      if (xs32) xs32[b * nb + blk] = d1 / 256.f * (h0 + h1);
      if (!paired || (blk % 2 == 0 && blk + 1 == nb)) {
        std::memcpy(dst, q, 2 * QK);
      } else {
        int8_t* pair = xq + (b * nb + blk - blk % 2) * 2 * QK + (blk % 2) * 16;
        for (int lv = 0; lv < 2; ++lv) {
          std::memcpy(pair + lv * 64, q + lv * QK, 16);
          std::memcpy(pair + lv * 64 + 32, q + lv * QK + 16, 16);
        }
      }
      if (blk % per == 0) dx[(b * nb + blk) / per] = d1 / 256.f;
      if (xs) xs[b * nb + blk] = sum;
    }
  };
  if (B * nb < 512) rows(0, B * nb);
  else parallel_rows(B * nb, rows);
}

QuantizedX quantize_x(const at::Tensor& x2d, int64_t Kp, bool paired) {
  const int64_t B = x2d.size(0), K = x2d.size(1);
  auto xq = at::empty({B, 2 * Kp}, x2d.options().dtype(at::kChar));
  auto dx = at::empty({B, Kp / QK}, x2d.options());
  auto xs = at::empty({B, Kp / QK}, x2d.options());
  auto xcb = at::empty({B, Kp / QK}, x2d.options());
  quantize_rows(x2d.data_ptr<float>(), B, K, Kp, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), xs.data_ptr<float>(),
                xcb.data_ptr<float>(), paired);
  return {xq, dx, xs, xcb, B, Kp};
}

void row_sums(const float* xcb, int64_t B, int64_t nb, float* xc) {
  for (int64_t b = 0; b < B; ++b) {
    float t = 0.f;
    for (int64_t i = 0; i < nb; ++i) t += xcb[b * nb + i];
    xc[b] = t;
  }
}

}  // namespace llamarun
