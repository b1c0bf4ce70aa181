// GGUF block weights in their own bytes: the 16-bit activation quantization, the product of
// unpacked blocks (gguf_blocks.h) with it (with two 8-bit levels, X8, for the byte-form types:
// row_times8), and the gguf_linear / gguf_rows / gguf_rows_into ops.
//
// One arithmetic for every batch size: each output (weight row o, activation row j) keeps two
// 8-lane accumulators, even and odd groups of 32, adds float(W . X) * (s * dx) for each group in
// K order into its parity's, then sums the two and adds its minimums' term. Up to 8 activation
// rows at a time meet a weight row unpacked in registers
// (rows_fused): the same additions in the same order for every row, so a row's result is
// bitwise the same alone, in a batch, or anywhere in it. (Two weight rows unpacked into int16
// buffers for a 2x2 register tile, the earlier path for more than 4 rows, ran at 1/2.2 the speed
// at 5 rows and 1/1.4 at 64.) W . X is vpmaddwd (16-bit pairs into int32): as
// many multiplies per instruction as llama.cpp's 8-bit vpmaddubsw + vpmaddwd pair, at twice the
// activation precision.
#include "matmul_gguf.h"

#include "gguf_blocks.h"
#include "ops.h"
#include "quantize_act.h"

namespace llamarun {

void X16::quantize(const float* x, int64_t rows, int64_t width) {
  TORCH_CHECK(width % QK == 0, "GGUF linears need an input width that is a multiple of 32");
  B = rows, K = width, ng = K / QK;
  X.resize(B * K), dx.resize(B * ng), xs32.resize(B * ng);
  auto groups = [&](int64_t begin, int64_t end) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = begin; i < end; ++i) {
      const float* src = x + i * QK;  // group i of the (B, K) input: row i / ng, group i % ng
      __m256 v[4], vmax = _mm256_setzero_ps();
      for (int c = 0; c < 4; ++c) v[c] = _mm256_loadu_ps(src + 8 * c), vmax = _mm256_max_ps(vmax, _mm256_and_ps(v[c], abs_mask));
      const float amax = hmax(vmax);
      const float d = amax / 32767.f, id = amax > 0.f ? 32767.f / amax : 0.f;
      __m256i q[4];
      for (int c = 0; c < 4; ++c) q[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], _mm256_set1_ps(id)));  // to nearest
      int16_t* dst = const_cast<int16_t*>(at(i / ng, i % ng));
      // packs interleaves 128-bit lanes; permute4x64 puts the 16 values back in order
      _mm256_storeu_si256((__m256i*)dst, _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
      _mm256_storeu_si256((__m256i*)(dst + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
      int32_t s8[8];
      _mm256_storeu_si256((__m256i*)s8, _mm256_add_epi32(q[0], q[1]));
      int32_t lo = 0, hi = 0;
      for (int k = 0; k < 8; ++k) lo += s8[k];
      _mm256_storeu_si256((__m256i*)s8, _mm256_add_epi32(q[2], q[3]));
      for (int k = 0; k < 8; ++k) hi += s8[k];
      *const_cast<float*>(dx_at(i / ng, i % ng)) = d;
      xs32[i] = d * (float)(lo + hi);  // an exact integer sum, one rounding
    }
  };
  if (B * ng < 512) groups(0, B * ng);
  else parallel_rows(B * ng, groups);
}

void X8::quantize(const float* x, int64_t rows, int64_t width) {
  TORCH_CHECK(width % SG == 0, "GGUF K-quant linears need an input width that is a multiple of ", SG);
  B = rows, K = width, ng = K / QK;
  xq.resize(B * 2 * K), dx.resize(B * K / SG), xs16.resize(B * 2 * ng), xs32.resize(B * ng);
  quantize_rows(x, B, K, K, xq.data(), dx.data(), nullptr, nullptr, false, xs16.data(), xs32.data(), SG);
}

bool gguf_takes_x8(int64_t type) {
  bool r = false;
  with_block_type(type, [&](auto t) { r = bytes8<decltype(t)>(); });
  return r;
}

namespace {

// sum over n of m[i] * xs[i] in 8 lanes, the tail in masked lanes: all in intrinsics, so no
// instantiation is compiled another way (a scalar tail loop was, vectorized across the 8 rows of
// one row_times instance and not another: a row's bits then depended on its batch)
inline float min_dot(const float* m, const float* xs, int64_t n) {
  __m256 a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(m + i), _mm256_loadu_ps(xs + i), a);
  if (i < n) {
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    a = _mm256_fmadd_ps(_mm256_maskload_ps(m + i, lanes), _mm256_maskload_ps(xs + i, lanes), a);
  }
  return hsum(a);
}

// v = W . X over a group of 32 (16-bit pairs into 8 int32 lanes; VNNI's vpdpwssd adds the second
// half's pairs in the same instruction: the same exact integers)
inline __m256i dot32(const W32& w, const int16_t* x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(_mm256_madd_epi16(w.lo, _mm256_loadu_si256((const __m256i*)x)), w.hi,
                             _mm256_loadu_si256((const __m256i*)(x + 16)));
#else
  return _mm256_add_epi32(_mm256_madd_epi16(w.lo, _mm256_loadu_si256((const __m256i*)x)),
                          _mm256_madd_epi16(w.hi, _mm256_loadu_si256((const __m256i*)(x + 16))));
#endif
}

// The one arithmetic of an output (weight row o, activation row j): acc (8 lanes) += float(v_g) *
// (scale_g * dx_jg) for each group g of 32 in K order, then hsum(acc) + the minimums' term.
template <class T>
inline float finish(__m256 acc, const float* m, const X16& x, int64_t j) {
  float r = hsum(acc);
  if constexpr (T::MG > 0) {
    static_assert(T::MG == 32, "the 16-bit form's minimums are per 32");
    r += min_dot(m, x.xs32.data() + j * (x.K / 32), x.K / 32);
  }
  return r;
}

template <class T>
constexpr int64_t mins_per_block() {
  return T::MG > 0 ? T::QK / T::MG : 0;
}

// NB <= 8 activation rows j0 .. j0 + NB - 1 against weight row `row`, unpacked in registers and met
// by all NB rows at once: NB accumulators, one weight vector load per group for all of them.
// Each row keeps two accumulators, even groups into one and odd into the other, added at the end:
// with one, every group's multiply-add waited on the previous one's (4 cycles of latency for 32
// weights), which bounded a one-row product, decode, at half the speed of its instructions.
// Two for every NB, so a row's arithmetic stays the same in any batch.
template <class T, int NB>
inline void row_times(const uint8_t* row, const X16& x, int64_t j0, float* m, float* out, int64_t ld) {
  constexpr int G = T::QK / QK;
  const int64_t nblk = x.K / T::QK;
  const int16_t* X[NB];  // row j's group gi at X[j] + gi * QK, its dx at D[j][gi]
  const float* D[NB];
  for (int j = 0; j < NB; ++j) X[j] = x.at(j0 + j, 0), D[j] = x.dx_at(j0 + j, 0);
  __m256 acc[2][NB];
  for (int j = 0; j < NB; ++j) acc[0][j] = acc[1][j] = _mm256_setzero_ps();
  // block b's groups into acc[(b * G + g) % 2]: P, the parity of b * G, is known where it is called
  auto block = [&]<int P>(int64_t b) {
    float scale[G];
    T::unpack(row + b * T::BYTES, scale, m + b * mins_per_block<T>(), [&](int g, const W32& wv) {
      const int64_t gi = b * G + g;
      // scale * dx in all lanes: the group's scale broadcast once, each row's dx broadcast from
      // memory (a load, not a shuffle), the same product as the scalar one
      const __m256 sv = _mm256_set1_ps(scale[g]);
      __m256* a = acc[(P + g) % 2];
      for (int j = 0; j < NB; ++j)
        a[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(wv, X[j] + gi * QK)),
                               _mm256_mul_ps(sv, _mm256_broadcast_ss(D[j] + gi)), a[j]);
    });
  };
  int64_t b = 0;
  if constexpr (G % 2 == 1)
    for (; b + 2 <= nblk; b += 2) block.template operator()<0>(b), block.template operator()<1>(b + 1);
  for (; b < nblk; ++b) block.template operator()<0>(b);
  for (int j = 0; j < NB; ++j) out[(j0 + j) * ld] = finish<T>(_mm256_add_ps(acc[0][j], acc[1][j]), m, x, j0 + j);
}

// ---- the byte-form types (BYTES8) against X8. Their minimums' term per 16 (S16) or 32 weights:
// the type's minimums and -OFF * scale (exact: OFF is a power of 2), one entry per min_group.
template <class T>
constexpr int min_group() {
  return T::S16 ? 16 : 32;
}
template <class T>
constexpr bool has_min_term() {
  return T::MG > 0 || T::OFF != 0;
}
template <class T>
constexpr int terms_per_block() {
  return has_min_term<T>() ? T::QK / min_group<T>() : 0;
}

// the output of a byte-form row: hsum(acc) + the minimums' term
template <class T>
inline float finish8(__m256 acc, const float* me, const X8& x, int64_t j) {
  float r = hsum(acc);
  if constexpr (has_min_term<T>()) {
    const int64_t n = x.K / min_group<T>();
    r += min_dot(me, (min_group<T>() == 16 ? x.xs16 : x.xs32).data() + j * n, n);
  }
  return r;
}

// the sub-scales of group g as 16 int16, in the lanes of vpmaddubsw's sums (lanes 0-7: weights
// 0..15, 8-15: weights 16..31): sc[2g] and sc[2g + 1] for S16, else sc[g] in all
template <class T>
inline __m256i sub_scales(__m128i sc, int g) {
  const int lo = T::S16 ? 2 * g : g, hi = T::S16 ? 2 * g + 1 : g;
  const __m128i idx = _mm_setr_epi8(lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi);
  return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, idx));
}

// row_times for a byte-form type, with dx per block of 256 (X8::SG): each level's U . X by
// vpmaddubsw (pairs of u8 x s8 in int16: at most 2 * 63 * 127, no saturation), times the group's
// integer sub-scales by vpmaddwd, summed in int32 over the block's 8 groups
// (at most 8 * 2 * 16002 * 128 < 2^31); then acc += float(256 * S1 + S2) * (d * dx) once per
// block, and the minimums' term at the end. Against per-group float conversions (two vpdpbusd
// per group and row, then a conversion and a multiply-add, with dx per 32) this takes 4-6
// instructions a group and row where that took 12 on AVX2: a 2048 x 768 product at batch 1 ran
// 1.2x (Q6_K), 1.3x (Q5_K), 1.6x (Q3_K) and 2x (Q2_K, against its 16-bit form) as fast on one
// Zen 3 core. With VNNI (a Zen 4 core, best of 8 alternating runs, 512 x 768 in L2) it ran 1.13x
// (Q2_K), 1.12x (Q3_K), 1.08x (Q6_K), 1.0x (Q4_K, against its 16-bit form) and 0.89x (Q5_K) the
// per-32 form, but 0.90-0.97x at 8 rows (one-token decode is what this serves first); folding
// the sub-scale multiply-add into vpdpwssd halved it (its 4-cycle latency on the block's chain of
// 8 groups), and 512-bit vectors (both levels in one) ran 0.8-0.9x on the Zen 4. The same
// operations for every NB (batch invariance).
template <class T, int NB>
inline void row_times8(const uint8_t* row, const X8& x, int64_t j0, float* me, float* out, int64_t ld) {
  static_assert(T::QK == 256 && X8::SG == 256, "byte-form types are K-quants, met per block");
  constexpr int G = T::QK / QK;
  const int64_t nblk = x.K / T::QK;
  const int8_t* X[NB];  // row j's group gi at X[j] + gi * 64, block b's dx at D[j][b]
  const float* D[NB];
  for (int j = 0; j < NB; ++j) X[j] = x.at(j0 + j, 0), D[j] = x.dx_at(j0 + j, 0);
  __m256 acc[NB];
  for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk = row + b * T::BYTES;
    // the minimums' terms of the block straight into me: the types with minimums have one per
    // min_group and no offset (Q2_K, Q5_K); the others' are -OFF * d * sc (exact, as d * sc)
    static_assert(T::MG == 0 || (T::MG == min_group<T>() && T::OFF == 0), "a minimum per term");
    float* e = me + b * terms_per_block<T>();
    KScales s;
    float unused[1];
    T::scales(blk, s, T::MG > 0 ? e : unused);
    if constexpr (T::MG == 0 && T::OFF != 0) s.floats(e, terms_per_block<T>(), -(float)T::OFF * s.d);
    const __m128i sc = s.sc;
    __m256i s1[NB], s2[NB];
    for (int j = 0; j < NB; ++j) s1[j] = s2[j] = _mm256_setzero_si256();
    T::weights(blk, [&](int g, __m256i u) {
      const int64_t gi = b * G + g;
      const __m256i sv = sub_scales<T>(sc, g);
      for (int j = 0; j < NB; ++j) {
        const __m256i q1 = _mm256_loadu_si256((const __m256i*)(X[j] + gi * 2 * QK));
        const __m256i q2 = _mm256_loadu_si256((const __m256i*)(X[j] + gi * 2 * QK + QK));
        s1[j] = _mm256_add_epi32(s1[j], _mm256_madd_epi16(_mm256_maddubs_epi16(u, q1), sv));
        s2[j] = _mm256_add_epi32(s2[j], _mm256_madd_epi16(_mm256_maddubs_epi16(u, q2), sv));
      }
    });
    const __m256 dv = _mm256_set1_ps(s.d);
    for (int j = 0; j < NB; ++j) {
      const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[j]), _mm256_set1_ps(256.f), _mm256_cvtepi32_ps(s2[j]));
      acc[j] = _mm256_fmadd_ps(v, _mm256_mul_ps(dv, _mm256_broadcast_ss(D[j] + b)), acc[j]);
    }
  }
  for (int j = 0; j < NB; ++j) out[(j0 + j) * ld] = finish8<T>(acc[j], me, x, j0 + j);
}

// Weight rows [lo, hi) times all B activation rows: each weight row is unpacked once per 8
// activation rows, which meet it in registers. The same additions in the same order for every
// row whatever B and wherever the row is (batch invariance).
template <class T, class XT>
void rows_fused(const uint8_t* w, int64_t row_bytes, const XT& x, float* out, int64_t ld, int64_t lo, int64_t hi) {
  constexpr int64_t NBMAX = 8;
  thread_local std::vector<float> m;
  if constexpr (bytes8<T>()) m.resize(std::max<int64_t>(1, x.K / T::QK * terms_per_block<T>()));
  else m.resize(std::max<int64_t>(1, x.K / T::QK * mins_per_block<T>()));
  auto times = [&]<int NB>(const uint8_t* row, int64_t j0, float* po) {
    if constexpr (bytes8<T>()) row_times8<T, NB>(row, x, j0, m.data(), po, ld);
    else row_times<T, NB>(row, x, j0, m.data(), po, ld);
  };
  for (int64_t o = lo; o < hi; ++o) {
    const uint8_t* row = w + o * row_bytes;
    for (int64_t j0 = 0; j0 < x.B; j0 += NBMAX) {
      float* po = out + o;
      switch (std::min(NBMAX, x.B - j0)) {
        case 1: times.template operator()<1>(row, j0, po); break;
        case 2: times.template operator()<2>(row, j0, po); break;
        case 3: times.template operator()<3>(row, j0, po); break;
        case 4: times.template operator()<4>(row, j0, po); break;
        case 5: times.template operator()<5>(row, j0, po); break;
        case 6: times.template operator()<6>(row, j0, po); break;
        case 7: times.template operator()<7>(row, j0, po); break;
        default: times.template operator()<8>(row, j0, po); break;
      }
    }
  }
}

}  // namespace

void gguf_range(int64_t type, const uint8_t* w, int64_t row_bytes, const X16& x16, const X8& x8, float* out, int64_t ld,
                int64_t lo, int64_t hi) {
  const bool known = with_block_type(type, [&](auto t) {
    using T = decltype(t);
    if constexpr (bytes8<T>()) rows_fused<T>(w, row_bytes, x8, out, ld, lo, hi);
    else rows_fused<T>(w, row_bytes, x16, out, ld, lo, hi);
  });
  TORCH_CHECK(known, "gguf: unknown block type ", type);
}

void gguf_dequantize_rows(int64_t type, const uint8_t* w, int64_t row_bytes, int64_t K, const int64_t* ids, int64_t n,
                          float* dst) {
  const bool known = with_block_type(type, [&](auto t) {
    using T = decltype(t);
    float m[16] = {0}, scale[16] = {0};
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t* row = w + (ids ? ids[i] : i) * row_bytes;
      for (int64_t b = 0; b < K / T::QK; ++b) {
        float* r = dst + i * K + b * T::QK;
        unpack<T>(row + b * T::BYTES, scale, m, [&](int g, const auto& wv) {
          if constexpr (bytes8<T>()) store_dequantized_bytes<T>(wv, scale, g, m, r + QK * g);
          else store_dequantized<T::MG>(wv, scale[g], m + QK * g / std::max(T::MG, 1), r + QK * g);
        });
      }
    }
  });
  TORCH_CHECK(known, "gguf: unknown block type ", type);
}

namespace {

int64_t checked_width(const at::Tensor& w, int64_t type, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "gguf: weights must be a contiguous uint8 (rows, row_bytes) CPU tensor");
  TORCH_CHECK(K > 0 && block_row_bytes(type, K) == w.size(1), "gguf: ", w.size(1), " bytes per row do not hold ", K,
              " weights of type ", type);
  return K;
}

}  // namespace

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K) {
  checked_width(w, type, K);
  const auto x2d = flat_input(x);
  TORCH_CHECK(x2d.size(1) == K, "gguf_linear: input width ", x2d.size(1), " but the weight takes ", K);
  X16 q16;
  X8 q8;
  if (gguf_takes_x8(type)) q8.quantize(x2d.data_ptr<float>(), x2d.size(0), K);
  else q16.quantize(x2d.data_ptr<float>(), x2d.size(0), K);
  const int64_t N = w.size(0);
  auto out = at::empty({x2d.size(0), N}, x2d.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  parallel_rows(N, [&](int64_t begin, int64_t end) { gguf_range(type, wp, w.size(1), q16, q8, op, N, begin, end); });
  return reshape_output(out, x);
}

at::Tensor gguf_rows(const at::Tensor& w, int64_t type, int64_t K, const at::Tensor& ids) {
  checked_width(w, type, K);
  const auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t n = flat.numel(), N = w.size(0);
  const int64_t* ip = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(0 <= ip[i] && ip[i] < N, "gguf_rows: row ", ip[i], " out of range");
  auto out = at::empty({n, K}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    gguf_dequantize_rows(type, wp, w.size(1), K, ip + begin, end - begin, op + begin * K);
  });
  auto sizes = ids.sizes().vec();
  sizes.push_back(K);
  return out.view(sizes);
}

void gguf_rows_into(const at::Tensor& w, int64_t type, int64_t K, int64_t start, const at::Tensor& out) {
  checked_width(w, type, K);
  const int64_t n = out.size(0), rb = w.size(1);
  TORCH_CHECK(0 <= start && start + n <= w.size(0), "gguf_rows_into: rows ", start, "..", start + n, " out of range");
  const uint8_t* wp = w.data_ptr<uint8_t>() + start * rb;
  rows_into(out, K, 64, "gguf_rows_into",
            [&](int64_t i, float* dst) { gguf_dequantize_rows(type, wp + i * rb, rb, K, nullptr, 1, dst); });
}

}  // namespace llamarun
