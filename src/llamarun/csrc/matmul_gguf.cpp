// GGUF block weights in their own bytes: the 16-bit activation quantization, the product of
// unpacked blocks (gguf_blocks.h) with it, and the gguf_linear / gguf_rows ops.
//
// One arithmetic for every batch size: each output (weight row o, activation row j) keeps one
// 8-lane accumulator and adds float(W . X) * (s * dx) for each group of 32 in K order, then
// its minimums' term. Up to 4 activation rows meet a weight row unpacked in registers
// (rows_fused, decode); more meet two weight rows unpacked once into int16 (rows_tiled,
// batches and prefill): the same additions in the same order, so a row's result is bitwise the
// same alone, in a batch, or anywhere in it. W . X is vpmaddwd (16-bit pairs into int32): as
// many multiplies per instruction as llama.cpp's 8-bit vpmaddubsw + vpmaddwd pair, at twice the
// activation precision.
#include "matmul_gguf.h"

#include "gguf_blocks.h"
#include "ops.h"

namespace llamarun {

void X16::quantize(const float* x, int64_t rows, int64_t width) {
  TORCH_CHECK(width % QK == 0, "GGUF linears need an input width that is a multiple of 32");
  B = rows, K = width, ng = K / QK;
  const int64_t padded = (B + XT - 1) / XT * XT;  // a last partial tile's spare rows stay zero
  X.assign(padded * K, 0), dx.assign(padded * ng, 0.f), xs16.resize(B * 2 * ng), xs32.resize(B * ng);
  auto groups = [&](int64_t begin, int64_t end) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = begin; i < end; ++i) {
      const float* src = x + i * QK;  // group i of the (B, K) input: row i / ng, group i % ng
      __m256 v[4], vmax = _mm256_setzero_ps();
      for (int c = 0; c < 4; ++c) v[c] = _mm256_loadu_ps(src + 8 * c), vmax = _mm256_max_ps(vmax, _mm256_and_ps(v[c], abs_mask));
      float lanes[8];
      _mm256_storeu_ps(lanes, vmax);
      const float amax = *std::max_element(lanes, lanes + 8);
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
      xs16[2 * i] = d * (float)lo, xs16[2 * i + 1] = d * (float)hi;  // exact integer sums, one rounding
      xs32[i] = d * (float)(lo + hi);
    }
  };
  if (B * ng < 512) groups(0, B * ng);
  else parallel_rows(B * ng, groups);
}

namespace {

// sum over n of m[i] * xs[i], in 8-lane order then the tail
inline float min_dot(const float* m, const float* xs, int64_t n) {
  __m256 a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(m + i), _mm256_loadu_ps(xs + i), a);
  float r = hsum(a);
  for (; i < n; ++i) r += m[i] * xs[i];
  return r;
}

// v = W . X over a group of 32 (16-bit pairs into 8 int32 lanes)
inline __m256i dot32(const W32& w, const int16_t* x) {
  return _mm256_add_epi32(_mm256_madd_epi16(w.lo, _mm256_loadu_si256((const __m256i*)x)),
                          _mm256_madd_epi16(w.hi, _mm256_loadu_si256((const __m256i*)(x + 16))));
}

// The one arithmetic of an output (weight row o, activation row j): acc (8 lanes) += float(v_g) *
// (scale_g * dx_jg) for each group g of 32 in K order, then hsum(acc) + the minimums' term.
template <class T>
inline float finish(__m256 acc, const float* m, const X16& x, int64_t j) {
  float r = hsum(acc);
  if constexpr (T::MG > 0) {
    const int64_t n = x.K / T::MG;
    r += min_dot(m, (T::MG == 16 ? x.xs16 : x.xs32).data() + j * n, n);
  }
  return r;
}

template <class T>
constexpr int64_t mins_per_block() {
  return T::MG > 0 ? T::QK / T::MG : 0;
}

// B <= 4 (decode): each weight row unpacked in registers and met by all NB activation rows at once
template <class T, int NB>
void rows_fused(const uint8_t* w, int64_t row_bytes, const X16& x, float* out, int64_t ld, int64_t lo, int64_t hi) {
  constexpr int G = T::QK / QK;
  const int64_t K = x.K, ng = K / QK, nblk = K / T::QK;
  thread_local std::vector<float> m;
  m.resize(std::max<int64_t>(1, nblk * mins_per_block<T>()));
  const int16_t* X = x.at(0, 0);  // NB <= XT rows: one tile, row j of group g at X + (g * XT + j) * 32
  const float* D = x.dx_at(0, 0);
  (void)ng;
  for (int64_t o = lo; o < hi; ++o) {
    const uint8_t* row = w + o * row_bytes;
    __m256 acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblk; ++b) {
      float scale[G];
      T::unpack(row + b * T::BYTES, scale, m.data() + b * mins_per_block<T>(), [&](int g, const W32& wv) {
        const int64_t gi = b * G + g;
        for (int j = 0; j < NB; ++j)
          acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(wv, X + (gi * XT + j) * QK)),
                                   _mm256_set1_ps(scale[g] * D[gi * XT + j]), acc[j]);
      });
    }
    for (int j = 0; j < NB; ++j) out[j * ld + o] = finish<T>(acc[j], m.data(), x, j);
  }
}

// Load v into a register here and keep it there: without this GCC folds the loads of W and X into
// every vpmaddwd using them (R and NB times over), and the tile product ran load-bound at 1/2 speed.
inline void in_register(__m256i& v) { __asm__("" : "+x"(v)); }

// R weight rows unpacked into a thread's buffers (int16 W, a scale per group, minimums), for
// rows_tiled; S holds the products of their scales with one activation tile's: scale_r,gi *
// dx_j,gi at S[(gi * R + r) * XT + j], one multiply per 4.
struct Tile {
  std::vector<int16_t> W;
  std::vector<float> s, m, S;
};

template <int R>
inline void tile_scales(Tile& t, const X16& x, int64_t j0) {
  const float* D = x.dx_at(j0, 0);
  for (int64_t gi = 0; gi < x.ng; ++gi) {
    const __m128 d4 = _mm_loadu_ps(D + gi * XT);
    for (int r = 0; r < R; ++r) _mm_storeu_ps(t.S.data() + (gi * R + r) * XT, _mm_mul_ps(_mm_set1_ps(t.s[r * x.ng + gi]), d4));
  }
}

// acc += float(W . X) * S for one group: the step every output takes, once per group of 32
inline __m256 step32(__m256i wl, __m256i wh, __m256i xl, __m256i xh, const float* S, __m256 acc) {
  const __m256i v = _mm256_add_epi32(_mm256_madd_epi16(wl, xl), _mm256_madd_epi16(wh, xh));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(*S), acc);
}

// activation rows j0 .. j0 + NB - 1 (inside one tile; S from tile_scales) against the R rows of
// `t`, R, NB <= 2: R x NB accumulators, each weight and activation vector loaded once per group
// (named variables, not arrays: GCC kept arrays of vectors on the stack)
template <class T, int R, int NB>
inline void tile_product(const Tile& t, const X16& x, int64_t j0, float* out, int64_t ld, int64_t o) {
  static_assert(R <= 2 && NB <= 2, "2 x 2 outputs at most");
  const int64_t K = x.K, ng = x.ng, nmin = std::max<int64_t>(1, K / T::QK * mins_per_block<T>());
  const int16_t* xg = x.at(j0, 0);
  const float* S = t.S.data() + j0 % XT;
  const int16_t *w0 = t.W.data(), *w1 = t.W.data() + (R - 1) * K;
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
  for (int64_t gi = 0; gi < ng; ++gi, xg += XT * QK, S += R * XT, w0 += QK, w1 += QK) {
    __m256i w0l = _mm256_loadu_si256((const __m256i*)w0), w0h = _mm256_loadu_si256((const __m256i*)(w0 + 16));
    __m256i x0l = _mm256_loadu_si256((const __m256i*)xg), x0h = _mm256_loadu_si256((const __m256i*)(xg + 16));
    in_register(w0l), in_register(w0h), in_register(x0l), in_register(x0h);
    a00 = step32(w0l, w0h, x0l, x0h, S, a00);
    if constexpr (R == 2) {
      __m256i w1l = _mm256_loadu_si256((const __m256i*)w1), w1h = _mm256_loadu_si256((const __m256i*)(w1 + 16));
      in_register(w1l), in_register(w1h);
      a10 = step32(w1l, w1h, x0l, x0h, S + XT, a10);
      if constexpr (NB == 2) {
        __m256i x1l = _mm256_loadu_si256((const __m256i*)(xg + QK)), x1h = _mm256_loadu_si256((const __m256i*)(xg + QK + 16));
        in_register(x1l), in_register(x1h);
        a01 = step32(w0l, w0h, x1l, x1h, S + 1, a01);
        a11 = step32(w1l, w1h, x1l, x1h, S + XT + 1, a11);
      }
    } else if constexpr (NB == 2) {
      a01 = step32(w0l, w0h, _mm256_loadu_si256((const __m256i*)(xg + QK)), _mm256_loadu_si256((const __m256i*)(xg + QK + 16)),
                   S + 1, a01);
    }
  }
  const float* m = t.m.data();
  out[j0 * ld + o] = finish<T>(a00, m, x, j0);
  if constexpr (NB == 2) out[(j0 + 1) * ld + o] = finish<T>(a01, m, x, j0 + 1);
  if constexpr (R == 2) {
    out[j0 * ld + o + 1] = finish<T>(a10, m + nmin, x, j0);
    if constexpr (NB == 2) out[(j0 + 1) * ld + o + 1] = finish<T>(a11, m + nmin, x, j0 + 1);
  }
}

template <class T, int R>
void tile_rows(Tile& t, const uint8_t* w, int64_t row_bytes, const X16& x, float* out, int64_t ld, int64_t o) {
  const int64_t K = x.K, nblk = K / T::QK, nmin = std::max<int64_t>(1, nblk * mins_per_block<T>());
  t.W.resize(R * K), t.s.resize(R * x.ng), t.m.resize(R * nmin), t.S.resize(R * XT * x.ng);
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = w + (o + r) * row_bytes;
    for (int64_t b = 0; b < nblk; ++b)
      T::unpack(row + b * T::BYTES, &t.s[r * x.ng + b * (T::QK / QK)], t.m.data() + r * nmin + b * mins_per_block<T>(),
                [&](int g, const W32& wv) {
                  int16_t* dst = t.W.data() + r * K + T::QK * b + QK * g;
                  _mm256_storeu_si256((__m256i*)dst, wv.lo);
                  _mm256_storeu_si256((__m256i*)(dst + 16), wv.hi);
                });
  }
  for (int64_t j0 = 0; j0 < x.B; j0 += XT) {  // per tile of activation rows, pairs of them
    tile_scales<R>(t, x, j0);
    const int64_t n = std::min<int64_t>(XT, x.B - j0);
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) tile_product<T, R, 2>(t, x, j0 + j, out, ld, o);
    if (j < n) tile_product<T, R, 1>(t, x, j0 + j, out, ld, o);
  }
}

// B > 4 (batches, prefill): two weight rows unpacked once into int16 for all activation rows
template <class T>
void rows_tiled(const uint8_t* w, int64_t row_bytes, const X16& x, float* out, int64_t ld, int64_t lo, int64_t hi) {
  thread_local Tile t;
  int64_t o = lo;
  for (; o + 2 <= hi; o += 2) tile_rows<T, 2>(t, w, row_bytes, x, out, ld, o);
  if (o < hi) tile_rows<T, 1>(t, w, row_bytes, x, out, ld, o);
}

template <class T>
void range_of(const uint8_t* w, int64_t row_bytes, const X16& x, float* out, int64_t ld, int64_t lo, int64_t hi) {
  switch (x.B) {
    case 1: return rows_fused<T, 1>(w, row_bytes, x, out, ld, lo, hi);
    case 2: return rows_fused<T, 2>(w, row_bytes, x, out, ld, lo, hi);
    case 3: return rows_fused<T, 3>(w, row_bytes, x, out, ld, lo, hi);
    case 4: return rows_fused<T, 4>(w, row_bytes, x, out, ld, lo, hi);
    default: return rows_tiled<T>(w, row_bytes, x, out, ld, lo, hi);
  }
}

}  // namespace

void gguf_range(int64_t type, const uint8_t* w, int64_t row_bytes, const X16& x, float* out, int64_t ld, int64_t lo,
                int64_t hi) {
  const bool known = with_block_type(type, [&](auto t) { range_of<decltype(t)>(w, row_bytes, x, out, ld, lo, hi); });
  TORCH_CHECK(known, "gguf: unknown block type ", type);
}

void gguf_dequantize_rows(int64_t type, const uint8_t* w, int64_t row_bytes, int64_t K, const int64_t* ids, int64_t n,
                          float* dst) {
  const bool known = with_block_type(type, [&](auto t) {
    using T = decltype(t);
    float m[16] = {0}, scale[8] = {0};
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t* row = w + (ids ? ids[i] : i) * row_bytes;
      for (int64_t b = 0; b < K / T::QK; ++b) {
        float* r = dst + i * K + b * T::QK;
        // w = scale * W (+ m): a product then a sum, two roundings as gguf-py's (the empty asm
        // keeps the compiler from fusing them into one FMA)
        T::unpack(row + b * T::BYTES, scale, m, [&](int g, const W32& wv) {
          const __m256i halves[2] = {wv.lo, wv.hi};
          for (int c = 0; c < 4; ++c) {  // weights 8c .. 8c + 7 of group g
            const __m128i h = c % 2 ? _mm256_extracti128_si256(halves[c / 2], 1) : _mm256_castsi256_si128(halves[c / 2]);
            __m256 v = _mm256_mul_ps(_mm256_set1_ps(scale[g]), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(h)));
            if constexpr (T::MG > 0) {
              __asm__("" : "+x"(v));
              v = _mm256_add_ps(v, _mm256_set1_ps(m[(QK * g + 8 * c) / T::MG]));
            }
            _mm256_storeu_ps(r + QK * g + 8 * c, v);
          }
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
  X16 q;
  q.quantize(x2d.data_ptr<float>(), x2d.size(0), K);
  const int64_t N = w.size(0);
  auto out = at::empty({x2d.size(0), N}, x2d.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  parallel_rows(N, [&](int64_t begin, int64_t end) { gguf_range(type, wp, w.size(1), q, op, N, begin, end); });
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

}  // namespace llamarun
