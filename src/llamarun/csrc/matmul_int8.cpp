// int8 weights: the AVX2/VNNI product (int8_range), and the int8_linear / amx_int8_linear ops.
#include "matmul_int8.h"

#include "amx.h"
#include "ops.h"
#include "quantize_act.h"

namespace llamarun {
namespace {

// ---- int8 weights: w (N, Kp) int8, sw (N, G) float with G = 1 (per row) or Kp/32 (per block).
// R weight rows (o, o+1, ...) by NB batch rows per pass: each activation load serves R weight rows
// and each weight load NB batch rows. With VNNI the weights,
// offset to unsigned (w + 128, one xor), meet the signed activations in vpdpbusd directly, and the
// offset's share, 128 * sum(x) per block (xcb), comes off at the end; AVX2's saturating
// vpmaddubsw needs the sign trick instead. xc (B) = the sum of xcb over a row's blocks.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool kOffsetWeights = true;
#else
constexpr bool kOffsetWeights = false;
#endif

// One accumulator per output whatever R and NB are: a row's sum is then the same alone and in a
// batch (batch invariance; independent accumulators for a lone row's latency changed it).
template <int R, int NB>
inline void int8_tile(const int8_t* w, const float* sw, int64_t G, int64_t Kp, const int8_t* xq, const float* dx,
                      const float* xcb, const float* xc, int64_t b0, float* out, int64_t N, int64_t o) {
  constexpr int U = 1;
  const int64_t nb = Kp / QK;
  if (R * NB == 1) prefetch_row(w + 2 * Kp, Kp);
  __m256 acc[R][NB][U];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j)
      for (int u = 0; u < U; ++u) acc[r][j][u] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < nb; ++blk) {
    __m256i wv[R], wa[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm256_loadu_si256((const __m256i*)(w + r * Kp + blk * QK));
      wa[r] = kOffsetWeights ? _mm256_xor_si256(wv[r], _mm256_set1_epi8((char)0x80)) : _mm256_sign_epi8(wv[r], wv[r]);
    }
    for (int j = 0; j < NB; ++j) {
      const int8_t* xb = xq + ((b0 + j) * nb + blk) * 2 * QK;
      const __m256i x1 = _mm256_loadu_si256((const __m256i*)xb), x2 = _mm256_loadu_si256((const __m256i*)(xb + QK));
      const __m256 d = _mm256_set1_ps(dx[(b0 + j) * nb + blk]);
      for (int r = 0; r < R; ++r) {
        const __m256i s = kOffsetWeights ? dot2_u8s8(wa[r], x1, x2)
                                         : dot2_u8s8(wa[r], _mm256_sign_epi8(x1, wv[r]), _mm256_sign_epi8(x2, wv[r]));
        const __m256 scale = G == 1 ? d : _mm256_mul_ps(d, _mm256_set1_ps(sw[r * G + blk]));
        acc[r][j][blk % U] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r][j][blk % U]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      __m256 a = acc[r][j][0];
      for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[r][j][u]);
      float sum = hsum(a);
      if (G == 1) {
        sum = sw[r * G] * (kOffsetWeights ? sum - xc[b0 + j] : sum);
      } else if (kOffsetWeights) {  // sum of sw * xcb over the blocks, eight at a time (as one
        // scalar chain of dependent multiply-adds it cost a Q8_0 row of K = 768 ~100 cycles)
        const float *sr = sw + r * G, *cr = xcb + (b0 + j) * nb;
        __m256 c = _mm256_setzero_ps();
        int64_t blk = 0;
        for (; blk + 8 <= nb; blk += 8) c = _mm256_fmadd_ps(_mm256_loadu_ps(sr + blk), _mm256_loadu_ps(cr + blk), c);
        sum -= hsum(c);
        for (; blk < nb; ++blk) sum -= sr[blk] * cr[blk];
      }
      out[(b0 + j) * N + o + r] = sum;
    }
}

}  // namespace

void int8_range(const int8_t* w, const float* sw, int64_t G, int64_t Kp, const int8_t* xq, const float* dx,
                const float* xcb, const float* xc, int64_t B, float* out, int64_t N, int64_t lo, int64_t hi) {
  constexpr int64_t T = 4;  // batch rows per pass
  // Pairs of weight rows only for batches: from DRAM at batch 1 they stream at half the speed
  // (K = 768: two interleaved row streams confuse the prefetchers), in cache 1.5x faster.
  const int64_t step = B >= T ? 2 : 1;
  for (int64_t o = lo; o < hi; o += step) {
    const int8_t* wr = w + o * Kp;
    const float* sr = sw + o * G;
    int64_t b0 = 0;
    if (step == 2 && o + 1 < hi) {
      for (; b0 + T <= B; b0 += T) int8_tile<2, T>(wr, sr, G, Kp, xq, dx, xcb, xc, b0, out, N, o);
      for (; b0 < B; ++b0) int8_tile<2, 1>(wr, sr, G, Kp, xq, dx, xcb, xc, b0, out, N, o);
    } else {
      for (; b0 + T <= B; b0 += T) int8_tile<1, T>(wr, sr, G, Kp, xq, dx, xcb, xc, b0, out, N, o);
      for (; b0 < B; ++b0) int8_tile<1, 1>(wr, sr, G, Kp, xq, dx, xcb, xc, b0, out, N, o);
    }
  }
}

namespace {

// x2d (B, K) times per-channel int8 w (N, Kp) with scales sw (N, 1) on AMX, shaped like x
at::Tensor amx_product(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& sw, const at::Tensor& x) {
  auto out = at::empty({x2d.size(0), w.size(0)}, x2d.options());
  amx_int8({{w.data_ptr<int8_t>(), sw.data_ptr<float>(), w.size(0), w.size(1), out.data_ptr<float>(), w.size(0)}},
           AmxX(x2d.data_ptr<float>(), x2d.size(0), x2d.size(1)));
  return reshape_output(out, x);
}

}  // namespace

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw, bool amx) {
  const auto x2d = flat_input(x);
  const int64_t N = w.size(0), Kp = w.size(1), G = sw.size(1);
  TORCH_CHECK(Kp % QK == 0 && (G == 1 || G == Kp / QK), "int8_linear: bad weight layout");
  if (amx && G == 1 && x2d.size(0) >= AMX_MIN_ROWS && amx_usable()) return amx_product(x2d, w, sw, x);
  const auto qx = quantize_x(x2d, Kp);
  auto out = at::empty({qx.B, N}, x2d.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = sw.data_ptr<float>();
  const int8_t* xq = qx.xq.data_ptr<int8_t>();
  const float* dx = qx.dx.data_ptr<float>();
  const float* xcb = qx.xcb.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t B = qx.B;
  std::vector<float> xc(B);
  row_sums(xcb, B, Kp / QK, xc.data());
  parallel_rows(N, [&](int64_t begin, int64_t end) {
    int8_range(wp, sp, G, Kp, xq, dx, xcb, xc.data(), B, op, N, begin, end);
  });
  return reshape_output(out, x);
}

// the AMX product alone at any batch size (tests compare it with the AVX path); empty without AMX
at::Tensor amx_int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw) {
  const auto x2d = flat_input(x);
  TORCH_CHECK(w.size(1) % QK == 0 && sw.size(1) == 1, "amx_int8_linear: per-channel int8 weights");
  if (!amx_usable()) return at::empty({0}, x2d.options());
  return amx_product(x2d, w, sw, x);
}

}  // namespace llamarun
