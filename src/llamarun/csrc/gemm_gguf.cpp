// A prompt's product with GGUF block weights (gguf_prompt_linear): matrix times matrix in 8-bit
// integers, as llama.cpp's repacked kernels do, where the one-token kernels (matmul_gguf.cpp)
// would unpack every weight row once per 8 prompt rows.
//
// Each thread takes panels of 32 weight rows. A panel is unpacked once (gguf_blocks.h) into
// unsigned bytes interleaved 4 at a time across its 32 rows, [group][k/4][row][4], with one
// float scale and one minimum per row and group (GS = 16 weights for the types whose scales
// differ per 16, else 32). Then every prompt row meets it: one vpdpbusd (AVX-512 VNNI) adds 4
// weights x 4 activations for 16 rows at once, the activations' 4 bytes broadcast. Per group,
// in int32: a = U . q (q: the activations, one 8-bit level or two, 256 q1 + q2, about 15 bits as
// the one-token kernels'), minus OFF * sum(q) for the types with a signed offset (exact); then
// in float: out += float(a) * (scale * dx) (+ minimum * dx * sum(q)). Each output's operations
// are the same wherever its row sits in the prompt or batch (batch invariance), so a prompt's
// row does not depend on what runs beside it.
//
// Without AVX-512 VNNI (AVX2 alone, e.g. an AMD Zen 3), the panel holds 16-bit weights,
// [group][k/2][row][2], and the activations are 16-bit too (256 q1 + q2, exact in int16, or q1):
// one vpmaddwd adds 2 weights x 2 activations for 8 rows. There vpmaddwd does as many products per
// instruction as vpmaddubsw + vpmaddwd on 8-bit activations, so both levels cost the same, and no
// product saturates. The int32 group sums are the same integers as VNNI's (256 (U . q1) + U . q2),
// and the float steps are the same in the same order, so both ISAs give the same bits by
// construction (not yet compared on one machine). On an AMD Zen 3 it ran 138-173 GOP/s, against
// oneDNN's 119 GFLOP/s on float32 tiles.
#include "gguf_blocks.h"
#include "matmul_gguf.h"
#include "ops.h"
#include "quantize_act.h"

#include <ATen/ops/constant_pad_nd.h>

#include <type_traits>

namespace llamarun {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LLAMARUN_PROMPT_VNNI 1
#endif

bool gguf_prompt_available() { return true; }

namespace {

constexpr int PR = 32;  // weight rows per panel: two zmm of int32 lanes

// the activations of a prompt for groups of GS, quantized by quantize_rows (quantize_act.h: two
// int8 levels per 32, x ~ (d1 / 256) (256 q1 + q2)), of which L levels are used: xq (M, K/32, 64)
// q1 then q2 of each 32; dx (M, K/GS) the scale of each GS (its 32's: d1 for one level, d1 / 256
// for two), qs (M, K/GS) the int32 sum of its q1 (one level) or of its 256 q1 + q2 (two)
struct PromptX {
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> qs;
  std::vector<int16_t> x16;  // AVX2 only: (M, K) the activations as one int16 each, 256 q1 + q2 or q1
  int64_t M = 0, K = 0, L = 1;
  const int8_t* at(int64_t r, int64_t k) const { return xq.data() + (r * (K / QK) + k / QK) * 2 * QK + k % QK; }
};

inline __m256i widen16(const int8_t* q) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)q)); }

inline int32_t sum16(const int8_t* q) {
  const __m256i w = _mm256_madd_epi16(widen16(q), _mm256_set1_epi16(1));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

void quantize_prompt(const float* x, int64_t M, int64_t K, int L, int GS, PromptX& p) {
  p.M = M, p.K = K, p.L = L;
  const int64_t ng = K / QK;
  std::vector<float> d(M * ng);
  p.xq.resize(M * ng * 2 * QK), p.dx.resize(M * K / GS), p.qs.resize(M * K / GS);
#ifndef LLAMARUN_PROMPT_VNNI
  p.x16.resize(M * K);
#endif
  quantize_rows(x, M, K, K, p.xq.data(), d.data(), nullptr, nullptr);
  parallel_rows(M * ng, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // group i % ng of row i / ng
      const int8_t* q = p.xq.data() + i * 2 * QK;
      int32_t sums[2];
      for (int h = 0; h < 2; ++h) sums[h] = L == 2 ? 256 * sum16(q + 16 * h) + sum16(q + QK + 16 * h) : sum16(q + 16 * h);
      const float dg = L == 2 ? d[i] : 256.f * d[i];  // exact: a power of 2
      const int64_t r = i / ng, g = i % ng;
#ifndef LLAMARUN_PROMPT_VNNI
      for (int h = 0; h < 2; ++h) {  // exact: |256 q1 + q2| <= 32639
        __m256i v = widen16(q + 16 * h);
        if (L == 2) v = _mm256_add_epi16(_mm256_slli_epi16(v, 8), widen16(q + QK + 16 * h));
        _mm256_storeu_si256((__m256i*)(p.x16.data() + r * K + g * QK + 16 * h), v);
      }
#endif
      if (GS == 16) {
        for (int h = 0; h < 2; ++h) p.dx[r * (K / 16) + 2 * g + h] = dg, p.qs[r * (K / 16) + 2 * g + h] = sums[h];
      } else {
        p.dx[r * ng + g] = dg, p.qs[r * ng + g] = sums[0] + sums[1];
      }
    }
  });
}

// A panel: rows [o0, o0 + 32) of the weight, unpacked. u (K/GS, GS/4, 32, 4) bytes (AVX2: (K/GS,
// GS/2, 32, 2) int16); s, m (K/GS, 32)
struct Panel {
  std::vector<uint8_t> u;
  std::vector<float> s, m;
  uint8_t* rows = nullptr;  // (32, K) while it is packed: the rows' bytes in element order
};

// the signed offset a W32 type's int16 weights take to become bytes (its weights' minimum)
template <class T>
constexpr int w32_offset() {
  if constexpr (std::is_same_v<T, Q8_0> || std::is_same_v<T, IQ4_NL> || std::is_same_v<T, IQ4_XS>) return 128;
  else if constexpr (std::is_same_v<T, Q4_0>) return 8;
  else if constexpr (std::is_same_v<T, Q5_0>) return 16;
  else return 0;
}

// Q3_K in a prompt's panels: its sub-scales per 16 multiplied into the weights, (q - 4) * sc in
// -124..128, plus 124 as a byte, so that a group of 32 takes one float scale d and no minimums, as
// Q8_0's do: half the float steps of a scale per 16
template <class T>
constexpr bool folded() {
  return std::is_same_v<T, Q3_K>;
}

template <class T>
constexpr int group_size() {
  if constexpr (bytes8<T>() && !folded<T>()) return T::S16 ? 16 : 32;
  else return 32;
}

// the offset the product subtracts through sum(q): OFF of a byte-form type, else w32_offset
template <class T>
constexpr int offset_of() {
  if constexpr (folded<T>()) return 124;
  else if constexpr (bytes8<T>()) return T::OFF;
  else return w32_offset<T>();
}

// group of 32 bytes u (weights 32 g32 ..) of panel row p
inline void put_group(Panel& P, int64_t K, int64_t g32, int p, __m256i u) {
  _mm256_storeu_si256((__m256i*)(P.rows + p * K + 32 * g32), u);
}

// out[c] = dword c of rows r[0..7]: an 8 x 8 transpose of 4-byte words in registers
inline void transpose8x8_epi32(const __m256i* r, __m256i* out) {
  __m256i t[8], v[8];
  for (int i = 0; i < 8; i += 2)
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  for (int h = 0; h < 8; h += 4) {  // rows h .. h + 3: words 0/4, 1/5, 2/6, 3/7 of each lane
    v[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]), v[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);
    v[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]), v[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
  }
  for (int c = 0; c < 4; ++c)  // word c and c + 4 of the 8 rows
    out[c] = _mm256_permute2x128_si256(v[c], v[c + 4], 0x20), out[c + 4] = _mm256_permute2x128_si256(v[c], v[c + 4], 0x31);
}

#ifdef LLAMARUN_PROMPT_VNNI
constexpr int UB = 1;  // bytes per unpacked weight in a panel

// rows (32, K) bytes -> u, dword j of row p at (j * 32 + p) * 4: a transpose of 4-byte words, 8
// rows by 8 words at a time in registers (one 4-byte store per word cost 2.7x what writing the
// same rows dequantized to float32 did)
inline void interleave(const uint8_t* rows, int64_t K, uint8_t* u) {
  for (int pb = 0; pb < PR; pb += 8) {
    for (int64_t j = 0; j < K / 4; j += 8) {
      __m256i r[8], o[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256((const __m256i*)(rows + (pb + i) * K + 4 * j));
      transpose8x8_epi32(r, o);
      for (int c = 0; c < 8; ++c) _mm256_storeu_si256((__m256i*)(u + ((j + c) * PR + pb) * 4), o[c]);
    }
  }
}
#else
constexpr int UB = 2;

// rows (32, K) bytes -> u as int16, the pair j (weights 2j, 2j + 1) of row p at (j * 32 + p) * 2
inline void interleave(const uint8_t* rows, int64_t K, uint8_t* u) {
  int16_t* u16 = reinterpret_cast<int16_t*>(u);
  for (int pb = 0; pb < PR; pb += 8) {
    for (int64_t j = 0; j < K / 2; j += 8) {
      __m256i r[8], o[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(rows + (pb + i) * K + 2 * j)));
      transpose8x8_epi32(r, o);
      for (int c = 0; c < 8; ++c) _mm256_storeu_si256((__m256i*)(u16 + ((j + c) * PR + pb) * 2), o[c]);
    }
  }
}
#endif

// panel P for weight rows o0 .. o0 + 31: row(o, p, P) writes weight row o < N into its row p (its
// groups through put_group, P.s and P.m); the rows past N stay zero
template <int GS, class Row>
void pack_panel(int64_t N, int64_t K, int64_t o0, Panel& P, Row&& row) {
  thread_local std::vector<uint8_t> rows;  // one thread's scratch, reused (no fresh pages each panel)
  const int64_t ngs = K / GS, n = std::min<int64_t>(PR, N - o0);
  rows.resize(K * PR);
  P.rows = rows.data();
  P.u.resize(K * PR * UB), P.s.assign(ngs * PR, 0.f), P.m.assign(ngs * PR, 0.f);
  if (n < PR) std::memset(P.rows + n * K, 0, (PR - n) * K);
  for (int p = 0; p < n; ++p) row(o0 + p, p, P);
  interleave(P.rows, K, P.u.data());
  P.rows = nullptr;
}

// the row writer of a GGUF matrix of type T
template <class T>
auto gguf_row(const uint8_t* w, int64_t row_bytes, int64_t K) {
  return [=](int64_t o, int p, Panel& P) {
    constexpr int GS = group_size<T>();
    const uint8_t* row = w + o * row_bytes;
    for (int64_t b = 0; b < K / T::QK; ++b) {
      float scale[16] = {0}, m[16] = {0};
      const int64_t g0 = b * (T::QK / QK);  // the block's first group of 32
      if constexpr (folded<T>()) {
        KScales s;
        T::scales(row + b * T::BYTES, s, m);
        alignas(16) int8_t sc[16];
        _mm_store_si128((__m128i*)sc, s.sc);
        T::weights(row + b * T::BYTES, [&](int g, __m256i u) {
          const W32 q = widen(u, T::OFF);
          const __m256i off = _mm256_set1_epi16(offset_of<T>());
          const __m256i lo = _mm256_add_epi16(_mm256_mullo_epi16(q.lo, _mm256_set1_epi16(sc[2 * g])), off);
          const __m256i hi = _mm256_add_epi16(_mm256_mullo_epi16(q.hi, _mm256_set1_epi16(sc[2 * g + 1])), off);
          put_group(P, K, g0 + g, p, _mm256_permute4x64_epi64(_mm256_packus_epi16(lo, hi), 0xD8));
        });
        for (int g = 0; g < T::QK / QK; ++g) P.s[(g0 + g) * PR + p] = s.d;
        continue;
      }
      unpack<T>(row + b * T::BYTES, scale, m, [&](int g, const auto& wv) {
        if constexpr (bytes8<T>()) {
          put_group(P, K, g0 + g, p, wv);
        } else {
          const __m256i off = _mm256_set1_epi16(w32_offset<T>());
          const __m256i packed = _mm256_packus_epi16(_mm256_add_epi16(wv.lo, off), _mm256_add_epi16(wv.hi, off));
          put_group(P, K, g0 + g, p, _mm256_permute4x64_epi64(packed, 0xD8));  // undo the lane interleave
        }
      });
      for (int i = 0; i < T::QK / GS; ++i) {
        const int64_t gs = b * (T::QK / GS) + i;
        if constexpr (bytes8<T>()) P.s[gs * PR + p] = scale[i];
        else P.s[gs * PR + p] = scale[i * GS / QK];
        if constexpr (T::MG > 0) P.m[gs * PR + p] = m[i * GS / T::MG];
      }
    }
  };
}

// Each thread's panels of weight rows in chunks of about 256 KB unpacked (L2 on the machines
// measured), each chunk unpacked once into the thread's reused panels, then fn(panels, c0, c1)
// runs every prompt row past panels c0 .. c1 - 1 while they stay in cache. All of a thread's
// panels at once had held 2 bytes a weight (AVX2) of its whole share, 23 MB for the two threads
// of a 5632 x 2048 matrix, read back from L3 or DRAM once per sweep of prompt rows: in chunks, a
// 256-token prompt of a 1.1B-shape Q4_K_M ran 40-42 -> 51-56 tok/s, of the 110M shape's
// Q4_K_M 406-459 -> 505-607 (2 threads of a Zen 3, alternating runs).
template <int GS, class Row, class Fn>
void panel_chunks(int64_t N, int64_t K, const Row& row, const Fn& fn) {
  const int64_t npanels = (N + PR - 1) / PR, per = std::max<int64_t>(1, (256 << 10) / (PR * K * UB));
  at::parallel_for(0, npanels, 1, [&](int64_t begin, int64_t end) {
    std::vector<Panel> panels(std::min(per, end - begin));  // reused by every chunk
    for (int64_t c0 = begin; c0 < end; c0 += per) {
      const int64_t c1 = std::min(end, c0 + per);
      for (int64_t pi = c0; pi < c1; ++pi) pack_panel<GS>(N, K, pi * PR, panels[pi - c0], row);
      fn(panels, c0, c1);
    }
  });
}

#ifdef LLAMARUN_PROMPT_VNNI
// prompt rows r0 .. r0 + R - 1 against panel P (weight rows o0 ..): out (M, N)
template <int GS, int L, int R, int OFF, bool MINS>
void panel_times(const Panel& P, const PromptX& x, int64_t r0, int64_t o0, int64_t N, float* out) {
  const int64_t ngs = x.K / GS;
  __m512 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm512_setzero_ps();
  const int8_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = x.at(r0 + r, 0);
  for (int64_t g = 0; g < ngs; ++g) {
    __m512i a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_si512();
    const uint8_t* wp = P.u.data() + g * (GS / 4) * PR * 4;
    // the group's first activation byte within its 32 (of level 0)
    const int64_t xo = (g * GS / QK) * 2 * QK + (g * GS) % QK;
    for (int lv = 0; lv < L; ++lv) {
      if (lv == 1)
        for (int r = 0; r < R; ++r) a[r][0] = _mm512_slli_epi32(a[r][0], 8), a[r][1] = _mm512_slli_epi32(a[r][1], 8);
      for (int k4 = 0; k4 < GS / 4; ++k4) {
        const __m512i w0 = _mm512_loadu_si512(wp + k4 * PR * 4), w1 = _mm512_loadu_si512(wp + k4 * PR * 4 + 64);
        for (int r = 0; r < R; ++r) {
          int32_t q4;
          std::memcpy(&q4, xr[r] + xo + lv * QK + 4 * k4, 4);
          const __m512i xb = _mm512_set1_epi32(q4);
          a[r][0] = _mm512_dpbusd_epi32(a[r][0], w0, xb);
          a[r][1] = _mm512_dpbusd_epi32(a[r][1], w1, xb);
        }
      }
    }
    const __m512 s0 = _mm512_loadu_ps(P.s.data() + g * PR), s1 = _mm512_loadu_ps(P.s.data() + g * PR + 16);
    for (int r = 0; r < R; ++r) {
      const int64_t gi = (r0 + r) * ngs + g;
      const float dx = x.dx[gi];
      const int32_t qs = x.qs[gi];
      if constexpr (OFF != 0) {
        const __m512i c = _mm512_set1_epi32(OFF * qs);  // exact: |OFF * sum| < 2^31
        a[r][0] = _mm512_sub_epi32(a[r][0], c), a[r][1] = _mm512_sub_epi32(a[r][1], c);
      }
      const __m512 dv = _mm512_set1_ps(dx);
      f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][0]), _mm512_mul_ps(s0, dv), f[r][0]);
      f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][1]), _mm512_mul_ps(s1, dv), f[r][1]);
      if constexpr (MINS) {
        const __m512 xs = _mm512_set1_ps(dx * (float)qs);
        f[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(P.m.data() + g * PR), xs, f[r][0]);
        f[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(P.m.data() + g * PR + 16), xs, f[r][1]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t o = o0 + 16 * h, n = std::clamp<int64_t>(N - o, 0, 16);
    if (n == 0) break;
    const __mmask16 mask = (__mmask16)((1u << n) - 1);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + (r0 + r) * N + o, mask, f[r][h]);
  }
}

constexpr int RT = 4;  // prompt rows per pass over a panel's group
// prompt rows per sweep over a thread's panels: their activations stay in L2 (with two levels a
// 2048-wide row is 4 KB) while every panel meets them; a 768 x 2048 product of 256 rows ran 1.2x
// faster in sweeps of 64 than streaming all 256 past each panel
constexpr int64_t MB = 64;

template <int GS, int L, int OFF, bool MINS, class Row>
void prompt_product(int64_t N, const PromptX& x, float* out, const Row& row) {
  panel_chunks<GS>(N, x.K, row, [&](const std::vector<Panel>& panels, int64_t c0, int64_t c1) {
    for (int64_t m0 = 0; m0 < x.M; m0 += MB) {
      const int64_t m1 = std::min(x.M, m0 + MB);
      for (int64_t pi = c0; pi < c1; ++pi) {
        const Panel& P = panels[pi - c0];
        const int64_t o0 = pi * PR;
        int64_t r0 = m0;
        for (; r0 + RT <= m1; r0 += RT) panel_times<GS, L, RT, OFF, MINS>(P, x, r0, o0, N, out);
        switch (m1 - r0) {
          case 3: panel_times<GS, L, 3, OFF, MINS>(P, x, r0, o0, N, out); break;
          case 2: panel_times<GS, L, 2, OFF, MINS>(P, x, r0, o0, N, out); break;
          case 1: panel_times<GS, L, 1, OFF, MINS>(P, x, r0, o0, N, out); break;
          default: break;
        }
      }
    }
  });
}

#else
// prompt rows r0 .. r0 + R - 1 against half h of panel P (its rows 16 h .. 16 h + 15): acc (R, 16,
// zeroed) takes their outputs
template <int GS, int R, int OFF, bool MINS>
void half_times(const Panel& P, const PromptX& x, int64_t r0, int h, float* acc) {
  const int64_t ngs = x.K / GS;
  const int16_t* u = reinterpret_cast<const int16_t*>(P.u.data());
  const int16_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = x.x16.data() + (r0 + r) * x.K;
  for (int64_t g = 0; g < ngs; ++g) {
    __m256i a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
    const int16_t* wp = u + (g * (GS / 2) * PR + 16 * h) * 2;
    for (int k2 = 0; k2 < GS / 2; ++k2) {
      __m256i w0 = _mm256_loadu_si256((const __m256i*)(wp + k2 * PR * 2));
      __m256i w1 = _mm256_loadu_si256((const __m256i*)(wp + k2 * PR * 2 + 16));
      // keeps the weights in registers: gcc otherwise folds their loads into every vpmaddwd (a
      // copy of this loop alone, in L1, ran 1.2 against 1.9-2.5 G vpmaddwd/s on a Zen 3 core)
      asm("" : "+x"(w0), "+x"(w1));
      for (int r = 0; r < R; ++r) {
        int32_t q2;
        std::memcpy(&q2, xr[r] + g * GS + 2 * k2, 4);
        const __m256i xb = _mm256_set1_epi32(q2);
        a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(w0, xb));
        a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(w1, xb));
        // and the accumulators: gcc had kept one on the stack, a store-to-load chain in every
        // step; pinned, the GEMM went from 72-86 to 138-173 GOP/s (Zen 3, 2 threads)
        asm("" : "+x"(a[r][0]), "+x"(a[r][1]));
      }
    }
    const float* sg = P.s.data() + g * PR + 16 * h;
    const __m256 s0 = _mm256_loadu_ps(sg), s1 = _mm256_loadu_ps(sg + 8);
    for (int r = 0; r < R; ++r) {
      const int64_t gi = (r0 + r) * ngs + g;
      const float dx = x.dx[gi];
      const int32_t qs = x.qs[gi];
      if constexpr (OFF != 0) {
        const __m256i c = _mm256_set1_epi32(OFF * qs);  // exact: |OFF * sum| < 2^31
        a[r][0] = _mm256_sub_epi32(a[r][0], c), a[r][1] = _mm256_sub_epi32(a[r][1], c);
      }
      // the float sums live in acc, not registers, which the loop above needs all of
      const __m256 dv = _mm256_set1_ps(dx);
      float* f = acc + 16 * r;
      __m256 f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][0]), _mm256_mul_ps(s0, dv), _mm256_loadu_ps(f));
      __m256 f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][1]), _mm256_mul_ps(s1, dv), _mm256_loadu_ps(f + 8));
      if constexpr (MINS) {
        const float* mg = P.m.data() + g * PR + 16 * h;
        const __m256 xs = _mm256_set1_ps(dx * (float)qs);
        f0 = _mm256_fmadd_ps(_mm256_loadu_ps(mg), xs, f0);
        f1 = _mm256_fmadd_ps(_mm256_loadu_ps(mg + 8), xs, f1);
      }
      _mm256_storeu_ps(f, f0), _mm256_storeu_ps(f + 8, f1);
    }
  }
}

constexpr int RT = 4;  // prompt rows per pass: 2 R int32 accumulators, 2 weight vectors, a broadcast
constexpr int64_t MB = 64;  // prompt rows per sweep, as VNNI's

// rows r0 .. r1 - 1 (fewer than RT) of half_times
template <int GS, int OFF, bool MINS, int R = RT - 1>
void half_tail(const Panel& P, const PromptX& x, int64_t r0, int64_t r1, int h, float* acc) {
  if constexpr (R > 0) {
    if (r1 - r0 == R) half_times<GS, R, OFF, MINS>(P, x, r0, h, acc);
    else half_tail<GS, OFF, MINS, R - 1>(P, x, r0, r1, h, acc);
  }
}

// Each output's sum runs over its groups in order, one fma per group from 0, as VNNI's does.
template <int GS, int L, int OFF, bool MINS, class Row>
void prompt_product(int64_t N, const PromptX& x, float* out, const Row& row) {
  panel_chunks<GS>(N, x.K, row, [&](const std::vector<Panel>& panels, int64_t c0, int64_t c1) {
    std::vector<float> acc(MB * 16);
    for (int64_t m0 = 0; m0 < x.M; m0 += MB) {
      const int64_t m1 = std::min(x.M, m0 + MB);
      for (int64_t pi = c0; pi < c1; ++pi) {
        const Panel& P = panels[pi - c0];
        for (int h = 0; h < 2; ++h) {
          const int64_t o = pi * PR + 16 * h, n = std::clamp<int64_t>(N - o, 0, 16);
          if (n == 0) break;
          std::fill(acc.begin(), acc.end(), 0.f);
          int64_t r0 = m0;
          for (; r0 + RT <= m1; r0 += RT) half_times<GS, RT, OFF, MINS>(P, x, r0, h, acc.data() + (r0 - m0) * 16);
          half_tail<GS, OFF, MINS>(P, x, r0, m1, h, acc.data() + (r0 - m0) * 16);
          // the outputs out: two vector moves per row where a whole half is written (a call of
          // memcpy for each row's 64 bytes had cost ~7% of a 256-row product)
          for (int64_t r = m0; r < m1; ++r) {
            const float* f = acc.data() + (r - m0) * 16;
            if (n == 16) {
              _mm256_storeu_ps(out + r * N + o, _mm256_loadu_ps(f));
              _mm256_storeu_ps(out + r * N + o + 8, _mm256_loadu_ps(f + 8));
            } else {
              std::memcpy(out + r * N + o, f, n * sizeof(float));
            }
          }
        }
      }
    }
  });
}
#endif

// out (M, N) = x (M, K: zero-padded to Kp) times the N weight rows row() writes, in `levels`
template <int GS, int OFF, bool MINS, class Row>
at::Tensor prompt_linear(const at::Tensor& x, int64_t Kp, int64_t N, int64_t levels, const char* op, const Row& row) {
  TORCH_CHECK(levels == 1 || levels == 2, op, ": levels must be 1 or 2, got ", levels);
  auto x2d = flat_input(x);
  TORCH_CHECK(x2d.size(1) <= Kp && Kp % QK == 0, op, ": input width ", x2d.size(1), " but the weight takes ", Kp);
  if (x2d.size(1) < Kp) x2d = at::constant_pad_nd(x2d, {0, Kp - x2d.size(1)});
  const int64_t M = x2d.size(0);
  auto out = at::empty({M, N}, x2d.options());
  if (M == 0) return reshape_output(out, x);
  PromptX px;
  quantize_prompt(x2d.data_ptr<float>(), M, Kp, (int)levels, GS, px);
  if (levels == 2) prompt_product<GS, 2, OFF, MINS>(N, px, out.data_ptr<float>(), row);
  else prompt_product<GS, 1, OFF, MINS>(N, px, out.data_ptr<float>(), row);
  return reshape_output(out, x);
}

}  // namespace

at::Tensor gguf_prompt_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K, int64_t levels) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "gguf_prompt_linear: weights must be a contiguous uint8 (rows, row_bytes) CPU tensor");
  TORCH_CHECK(K > 0 && block_row_bytes(type, K) == w.size(1), "gguf_prompt_linear: ", w.size(1),
              " bytes per row do not hold ", K, " weights of type ", type);
  TORCH_CHECK(x.size(-1) == K, "gguf_prompt_linear: input width ", x.size(-1), " but the weight takes ", K);
  at::Tensor out;
  const bool known = with_block_type(type, [&](auto t) {
    using T = decltype(t);
    out = prompt_linear<group_size<T>(), offset_of<T>(), (T::MG > 0)>(
        x, K, w.size(0), levels, "gguf_prompt_linear", gguf_row<T>(w.data_ptr<uint8_t>(), w.size(1), K));
  });
  TORCH_CHECK(known, "gguf_prompt_linear: unknown block type ", type);
  return out;
}

// llamarun's own int8 layers (quantize.py Int8Linear): w (N, Kp) int8, sw (N, 1 | Kp/32) float
// scales; the bytes are w + 128, the offset leaving through the activations' sums
at::Tensor int8_prompt_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw, int64_t levels) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() &&
                  w.size(1) % QK == 0,
              "int8_prompt_linear: weights must be a contiguous int8 (rows, width padded to 32) CPU tensor");
  const int64_t N = w.size(0), Kp = w.size(1), G = sw.size(-1);
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.is_contiguous() && sw.numel() == N * G && (G == 1 || G == Kp / QK),
              "int8_prompt_linear: scales must be float32 (rows, 1) or (rows, width / 32)");
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = sw.data_ptr<float>();
  auto row = [=](int64_t o, int p, Panel& P) {
    for (int64_t g = 0; g < Kp / QK; ++g) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(wp + o * Kp + g * QK));
      put_group(P, Kp, g, p, _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)));  // q + 128 as bytes
      P.s[g * PR + p] = sp[o * G + (G == 1 ? 0 : g)];
    }
  };
  return prompt_linear<32, 128, false>(x, Kp, N, levels, "int8_prompt_linear", row);
}

// llamarun's own 4-bit layers (quantize.py Int4Linear): qs (N, Kp/2) nibbles in GGUF Q4 order,
// w = d * q + m per group of 32 with d, m (N, Kp/32) float16
at::Tensor q4_prompt_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                            int64_t levels) {
  TORCH_CHECK(qs.device().is_cpu() && qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.is_contiguous() &&
                  qs.size(1) % (QK / 2) == 0,
              "q4_prompt_linear: qs must be a contiguous uint8 (rows, width / 2) CPU tensor");
  const int64_t N = qs.size(0), Kp = 2 * qs.size(1), nb = Kp / QK;
  for (const at::Tensor* t : {&d, &m})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == N * nb,
                "q4_prompt_linear: d and m must be float16 (rows, width / 32)");
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const at::Half *dp = d.data_ptr<at::Half>(), *mp = m.data_ptr<at::Half>();
  auto row = [=](int64_t o, int p, Panel& P) {
    for (int64_t g = 0; g < nb; ++g) {
      const Nibbles q = nibbles(qp + o * (Kp / 2) + g * 16);  // elements 0..15, 16..31
      put_group(P, Kp, g, p, _mm256_set_m128i(q.hi, q.lo));
      P.s[g * PR + p] = (float)dp[o * nb + g], P.m[g * PR + p] = (float)mp[o * nb + g];
    }
  };
  return prompt_linear<32, 0, true>(x, Kp, N, levels, "q4_prompt_linear", row);
}

}  // namespace llamarun
