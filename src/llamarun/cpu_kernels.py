"""Weight-only quantized matrix products for x86 CPUs, as a C++ extension built on first use.

Why: on AVX-512 machines torch's own `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` and even
MKL's float GEMV run far below memory bandwidth at batch 1 (issue 5). These kernels follow
llama.cpp's approach: activations are quantized per block of 32 (two int8 levels, ~15 bits), then
int8 x int8 (or 4-bit x int8) dot products run with VNNI `vpdpbusd` (AVX2 `vpmaddubsw` without
VNNI), one pass over each weight row shared by every batch row. On CPUs with AMX (Intel Sapphire
Rapids and later) per-channel int8 products of two or more rows (batches, prefill) run on AMX
tiles instead (activations quantized per row), which makes a batch nearly as cheap as one row. Threads: torch's intra-op pool.

Also here: `Decoder`, the whole one-token decode step in C++ (used through cpu_step.py; at batch 1
the eager step's ~40 torch ops per layer cost more than its weight reads), and `argmax_rows`.

Built with torch.utils.cpp_extension.load_inline into ~/.cache/torch_extensions (once per machine);
`ops()` returns None where no compiler, no x86 AVX2 or a failed build leaves only the torch path.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time

import torch

log = logging.getLogger(__name__)

CPP_SOURCE = r"""
#include <torch/library.h>
#include <torch/custom_class.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512F__) && defined(__linux__)
#define LLAMARUN_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// fn(begin, end) over parts of [0, N) on torch's intra-op threads
void parallel_rows(int64_t N, const std::function<void(int64_t, int64_t)>& fn) {
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

// Activations in two int8 levels per block of 32: x ~ d * (256 * q1 + q2) with |q1|, |q2| <= 127,
// q2 quantizing what q1 leaves (about 15 bits in all; one level alone, as llama.cpp does, turns
// SmolLM2's answers to gibberish). xq (B, Kp/32, 64): q1 then q2 of each block; dx (B, Kp/32) = d;
// xs (B, Kp/32) = the block's exact float sum. Columns K..Kp are zero padding.
// `paired` lays blocks out for 4-bit weights (q4_rows): blocks 2p and 2p+1 (A, B) share 128 bytes,
// per level [A0..15 B0..15][A16..31 B16..31], the order of their nibbles in one 32-byte load; an
// unpaired last block keeps the plain order.
// xcb (B, Kp/32) = 128 * the block's dequantized sum (what int8_tile's weight offset adds).
void quantize_rows(const float* x, int64_t B, int64_t K, int64_t Kp, int8_t* xq, float* dx, float* xs,
                   float* xcb, bool paired = false) {
  const int64_t nb = Kp / QK;
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
      float lanes[8];
      _mm256_storeu_ps(lanes, vmax);
      const float amax = *std::max_element(lanes, lanes + 8), sum = hsum(vsum);
      const float d1 = amax / 127.f, id1 = d1 ? 1.f / d1 : 0.f, id2 = id1 * 256.f;
      int8_t* dst = xq + (b * nb + blk) * 2 * QK;
      int8_t q[2 * QK];
      __m256i q1i[4], q2i[4];
      __m256 vi = _mm256_setzero_ps();
      constexpr int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      for (int c = 0; c < 4; ++c) {
        const __m256 q1 = _mm256_round_ps(_mm256_mul_ps(v[c], _mm256_set1_ps(id1)), round);
        const __m256 r = _mm256_sub_ps(v[c], _mm256_mul_ps(q1, _mm256_set1_ps(d1)));
        __m256 q2 = _mm256_round_ps(_mm256_mul_ps(r, _mm256_set1_ps(id2)), round);
        q2 = _mm256_min_ps(_mm256_max_ps(q2, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
        vi = _mm256_add_ps(vi, _mm256_fmadd_ps(q1, _mm256_set1_ps(256.f), q2));  // exact: |sum| < 2^24
        q1i[c] = _mm256_cvtps_epi32(q1), q2i[c] = _mm256_cvtps_epi32(q2);
      }
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
      auto pack = [&](const __m256i* w) {
        return _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(w[0], w[1]), _mm256_packs_epi32(w[2], w[3])), order);
      };
      _mm256_storeu_si256((__m256i*)q, pack(q1i));
      _mm256_storeu_si256((__m256i*)(q + QK), pack(q2i));
      xcb[b * nb + blk] = 128.f * (d1 / 256.f) * hsum(vi);
      if (!paired || (blk % 2 == 0 && blk + 1 == nb)) {
        std::memcpy(dst, q, 2 * QK);
      } else {
        int8_t* pair = xq + (b * nb + blk - blk % 2) * 2 * QK + (blk % 2) * 16;
        for (int lv = 0; lv < 2; ++lv) {
          std::memcpy(pair + lv * 64, q + lv * QK, 16);
          std::memcpy(pair + lv * 64 + 32, q + lv * QK + 16, 16);
        }
      }
      dx[b * nb + blk] = d1 / 256.f;
      xs[b * nb + blk] = sum;
    }
  };
  if (B * nb < 512) rows(0, B * nb);
  else parallel_rows(B * nb, rows);
}

struct QuantizedX {
  at::Tensor xq, dx, xs, xcb;
  int64_t B, Kp;
};

QuantizedX quantize_x(const at::Tensor& x2d, int64_t Kp, bool paired = false) {
  const int64_t B = x2d.size(0), K = x2d.size(1);
  auto xq = at::empty({B, 2 * Kp}, x2d.options().dtype(at::kChar));
  auto dx = at::empty({B, Kp / QK}, x2d.options());
  auto xs = at::empty({B, Kp / QK}, x2d.options());
  auto xcb = at::empty({B, Kp / QK}, x2d.options());
  quantize_rows(x2d.data_ptr<float>(), B, K, Kp, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), xs.data_ptr<float>(),
                xcb.data_ptr<float>(), paired);
  return {xq, dx, xs, xcb, B, Kp};
}

// Independent accumulators per batch row: one row alone would wait on the fmadd latency chain.
template <int NB> constexpr int lanes() { return NB == 1 ? 4 : 1; }

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

template <int R, int NB>
inline void int8_tile(const int8_t* w, const float* sw, int64_t G, int64_t Kp, const int8_t* xq, const float* dx,
                      const float* xcb, const float* xc, int64_t b0, float* out, int64_t N, int64_t o) {
  constexpr int U = R * NB < 4 ? 4 / (R * NB) : 1;  // independent accumulators per output
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

// weight rows [lo, hi) of an int8 matrix against all B activation rows
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


// ---- AMX (Intel Sapphire Rapids and later): int8 tile products for batches of activation rows.
// Per-channel int8 weights (G = 1) are read as they are stored: 16 weight rows x 64 bytes are one
// A tile (stride Kp), so nothing is repacked. Activations are quantized per row in two int8
// levels, x ~ sx * (256 * q1 + q2) (sx = max|x| / 127 / 256, about 15 bits as quantize_rows), laid
// out as B tiles in the VNNI order (16 rows of 4 consecutive k x 16 batch rows). One tdpbssd does
// 16x16x64 multiply-adds, so a batch of 16 costs about what its weight reads cost (the AVX path
// above reads each weight once per pass too, but its multiply-adds are 16x fewer per cycle; 110M
// shape on 2 cores: a step of 16 rows at position 5 takes ~14 ms, one row ~9 ms). A single row
// stays on the AVX loop, which measured ~10% faster there (medians of alternating runs).
// One per-channel int8 product for amx_int8: out (B, ld) columns [0, N) = x times w (N, Kp)
struct AmxJob {
  const int8_t* w;
  const float* sw;
  int64_t N, Kp;
  float* out;
  int64_t ld;
};

constexpr int64_t AMX_MIN_ROWS = 2;  // activation rows from which products take AMX tiles

#ifdef LLAMARUN_AMX
bool amx_usable() {
  static const bool ok = [] {  // the kernel must grant this process the tile state first
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

// tiles 0-3: int32 results (row block 0 q1, q2, row block 1 q1, q2); 4, 5: weights; 6, 7: q1, q2
void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

constexpr int64_t AMX_K = 64;  // bytes of k per tile row

// x (B, K) float -> xp: per batch tile of 16 rows, per level, (Kp64/64) B tiles of 1 KB;
// sx (B) the row scales. Rows B..16*ceil(B/16) and columns K..Kp64 are zero.
void amx_quantize(const float* x, int64_t B, int64_t K, int64_t Kp64, int8_t* xp, float* sx) {
  const int64_t nt = (B + 15) / 16, nc = Kp64 / AMX_K;
  std::vector<int8_t> q(2 * 16 * Kp64);  // one batch tile's rows, row-major, per level
  for (int64_t t = 0; t < nt; ++t) {
    std::fill(q.begin(), q.end(), 0);
    for (int64_t n = 0; n < 16 && 16 * t + n < B; ++n) {
      const int64_t b = 16 * t + n;
      const float* xr = x + b * K;
      __m512 vmax = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
      float amax = _mm512_reduce_max_ps(vmax);
      for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float d1 = amax / 127.f, id1 = d1 > 0.f ? 1.f / d1 : 0.f;
      sx[b] = d1 / 256.f;
      int8_t* q1 = q.data() + n * Kp64;
      int8_t* q2 = q.data() + (16 + n) * Kp64;
      constexpr int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      const __m512 vd1 = _mm512_set1_ps(d1), vid1 = _mm512_set1_ps(id1), vid2 = _mm512_set1_ps(id1 * 256.f);
      for (k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, xr + k);
        const __m512 a = _mm512_roundscale_ps(_mm512_mul_ps(v, vid1), round);
        __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_fnmadd_ps(a, vd1, v), vid2), round);
        r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
        _mm_mask_storeu_epi8(q1 + k, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(a)));
        _mm_mask_storeu_epi8(q2 + k, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
      }
    }
    // VNNI order: tile row r of chunk c holds, for each batch row n, k = 64c + 4r .. 64c + 4r + 3
    for (int lv = 0; lv < 2; ++lv) {
      const int32_t* src = (const int32_t*)(q.data() + lv * 16 * Kp64);
      int32_t* dst = (int32_t*)(xp + ((t * 2 + lv) * nc) * 1024);
      for (int64_t c = 0; c < nc; ++c)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t n = 0; n < 16; ++n) dst[(c * 16 + r) * 16 + n] = src[n * (Kp64 / 4) + c * 16 + r];
    }
  }
}

// out[b * ld + o] for weight rows [o0, o0 + 16 * R) and all B rows; w points at row o0, stride ws
template <int R>
inline void amx_rows(const int8_t* w, int64_t ws, const float* sw, int64_t nc, const int8_t* xp, const float* sx,
                     int64_t B, float* out, int64_t ld, int64_t o0, int64_t N) {
  alignas(64) int32_t c[4][16 * 16];
  for (int64_t t = 0; t * 16 < B; ++t) {
    const int8_t* x1 = xp + (t * 2) * nc * 1024;
    const int8_t* x2 = x1 + nc * 1024;
    _tile_zero(0);
    _tile_zero(1);
    if (R == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t ck = 0; ck < nc; ++ck) {
      if (t == 0)  // the tile loads read 16 * R rows side by side: fetch the next rows ahead, in order
        for (int i = 0; i < 16 * R; ++i) _mm_prefetch((const char*)w + 16 * R * ws + (ck * 16 * R + i) * 64, _MM_HINT_T1);
      _tile_loadd(6, x1 + ck * 1024, 64);
      _tile_loadd(7, x2 + ck * 1024, 64);
      _tile_loadd(4, w + ck * AMX_K, ws);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      if (R == 2) {
        _tile_loadd(5, w + 16 * ws + ck * AMX_K, ws);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    if (R == 2) {
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
    }
    // tile row i (weight row o) holds batch rows 16t.. side by side: scale them as one vector and
    // scatter it down column o of out (a scalar loop here cost a batch of 16 about 3 ms a step)
    const int64_t nbt = std::min<int64_t>(16, B - 16 * t);
    const __mmask16 live = (__mmask16)((1u << nbt) - 1);
    const __m512 vsx = _mm512_maskz_loadu_ps(live, sx + 16 * t);
    const __m512i down = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)ld));
    for (int rb = 0; rb < R; ++rb)
      for (int64_t i = 0; i < 16 && o0 + 16 * rb + i < N; ++i) {
        const int64_t o = o0 + 16 * rb + i;
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 * rb] + i * 16));
        const __m512 q2 = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 * rb + 1] + i * 16));
        const __m512 v = _mm512_mul_ps(_mm512_fmadd_ps(q1, _mm512_set1_ps(256.f), q2), _mm512_mul_ps(vsx, _mm512_set1_ps(sw[o])));
        _mm512_mask_i32scatter_ps(out + 16 * t * ld + o, live, down, v, 4);
      }
  }
}

// x (B, K) quantized for AMX products over weights of any padded width up to Kp64
struct AmxX {
  std::vector<int8_t> xp;
  std::vector<float> sx;
  int64_t B = 0, Kp64 = 0;

  AmxX(const float* x, int64_t B_, int64_t K) : B(B_), Kp64((K + AMX_K - 1) / AMX_K * AMX_K) {
    xp.resize(((B + 15) / 16) * 2 * Kp64 * 16), sx.resize(B);
    amx_quantize(x, B, K, Kp64, xp.data(), sx.data());
  }
};

// Run `jobs` (products of the same activations ax) in one parallel region, so the products of a
// layer's q/k/v or gate/up pay one fork and join, not one each. Work items: pairs of 16-row blocks
// whose tile loads stay inside w (the last 64-byte chunk of a row may read up to 32 bytes of the
// next row, which meet zero activations, but not past the matrix), then per job one last block
// copied into a zero-padded buffer where those reads would leave the matrix.
void amx_int8(const std::vector<AmxJob>& jobs, const AmxX& ax) {
  const int64_t Kp64 = ax.Kp64, nc = Kp64 / AMX_K, B = ax.B;
  std::vector<int64_t> full(jobs.size()), first(jobs.size() + 1, 0);  // blocks read in place; items
  for (size_t i = 0; i < jobs.size(); ++i) {
    const AmxJob& j = jobs[i];
    TORCH_CHECK(j.Kp <= Kp64 && Kp64 - j.Kp < AMX_K && 16 * j.ld < (int64_t(1) << 31), "amx_int8: shapes");
    full[i] = Kp64 == j.Kp ? j.N / 16 : (j.N - 1) / 16;
    first[i + 1] = first[i] + (full[i] + 1) / 2 + (16 * full[i] < j.N ? 1 : 0);
  }
  const int8_t* xp = ax.xp.data();
  const float* sx = ax.sx.data();
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    amx_configure();
    std::vector<int8_t> buf;
    size_t i = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first[i + 1]) ++i;
      const AmxJob& j = jobs[i];
      const int64_t p = item - first[i], npairs = (full[i] + 1) / 2;
      if (p < npairs) {
        const int64_t o0 = 32 * p;
        if (2 * p + 1 < full[i]) amx_rows<2>(j.w + o0 * j.Kp, j.Kp, j.sw, nc, xp, sx, B, j.out, j.ld, o0, j.N);
        else amx_rows<1>(j.w + o0 * j.Kp, j.Kp, j.sw, nc, xp, sx, B, j.out, j.ld, o0, j.N);
      } else {
        const int64_t o0 = 16 * full[i];
        buf.assign(16 * Kp64, 0);
        for (int64_t r = 0; o0 + r < j.N; ++r) std::memcpy(buf.data() + r * Kp64, j.w + (o0 + r) * j.Kp, j.Kp);
        amx_rows<1>(buf.data(), Kp64, j.sw, nc, xp, sx, B, j.out, j.ld, o0, j.N);
      }
    }
    _tile_release();
  });
}
#else
bool amx_usable() { return false; }
struct AmxX {
  AmxX(const float*, int64_t, int64_t) {}
};
void amx_int8(const std::vector<AmxJob>&, const AmxX&) {}
#endif

// xc[b] = the sum of row b's xcb over its nb blocks
void row_sums(const float* xcb, int64_t B, int64_t nb, float* xc) {
  for (int64_t b = 0; b < B; ++b) {
    float t = 0.f;
    for (int64_t i = 0; i < nb; ++i) t += xcb[b * nb + i];
    xc[b] = t;
  }
}

// ---- 4-bit weights in GGUF Q4 nibble order: qs (N, Kp/2) uint8, per group of 32 byte i holds
// element i (low nibble) and element i+16 (high nibble); w = d * q + m with d, m (N, Kp/32) fp16.
// Activations in the paired layout (quantize_rows): one 32-byte load of two groups' nibbles
// meets its activations without a shuffle, lanes 0-3 summing group A and 4-7 group B, and one
// conversion and multiply-add serve both groups (1.4x the plain layout's speed here).
template <int NB>
inline void q4_rows(const uint8_t* qs, const at::Half* d, const at::Half* m, int64_t Kp, const int8_t* xq,
                    const float* dx, const float* xs, int64_t b0, float* out, int64_t N, int64_t o) {
  constexpr int U = NB == 1 ? 2 : 1;
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

constexpr int64_t TILE = 4;  // batch rows that share one read of a weight row

at::Tensor flat_input(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "llamarun cpu kernels need CPU tensors");
  return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
}

at::Tensor reshape_output(const at::Tensor& out2d, const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.back() = out2d.size(1);
  return out2d.view(sizes).to(x.scalar_type());
}


// x2d (B, K) times per-channel int8 w (N, Kp) with scales sw (N, 1) on AMX, shaped like x
at::Tensor amx_product(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& sw, const at::Tensor& x) {
  auto out = at::empty({x2d.size(0), w.size(0)}, x2d.options());
  amx_int8({{w.data_ptr<int8_t>(), sw.data_ptr<float>(), w.size(0), w.size(1), out.data_ptr<float>(), w.size(0)}},
           AmxX(x2d.data_ptr<float>(), x2d.size(0), x2d.size(1)));
  return reshape_output(out, x);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw) {
  const auto x2d = flat_input(x);
  const int64_t N = w.size(0), Kp = w.size(1), G = sw.size(1);
  TORCH_CHECK(Kp % QK == 0 && (G == 1 || G == Kp / QK), "int8_linear: bad weight layout");
  if (G == 1 && x2d.size(0) >= AMX_MIN_ROWS && amx_usable()) return amx_product(x2d, w, sw, x);
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

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
  const auto x2d = flat_input(x);
  const int64_t N = qs.size(0), Kp = qs.size(1) * 2;
  TORCH_CHECK(Kp % QK == 0 && d.size(1) == Kp / QK && m.size(1) == Kp / QK, "q4_linear: bad weight layout");
  const auto qx = quantize_x(x2d, Kp, /*paired=*/true);
  auto out = at::empty({qx.B, N}, x2d.options());
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  const int8_t* xq = qx.xq.data_ptr<int8_t>();
  const float* dx = qx.dx.data_ptr<float>();
  const float* xs = qx.xs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t B = qx.B, nb = Kp / QK;
  parallel_rows(N, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* qr = qp + o * (Kp / 2);
      int64_t b0 = 0;
      for (; b0 + TILE <= B; b0 += TILE) q4_rows<TILE>(qr, dp + o * nb, mp + o * nb, Kp, xq, dx, xs, b0, op, N, o);
      for (; b0 < B; ++b0) q4_rows<1>(qr, dp + o * nb, mp + o * nb, Kp, xq, dx, xs, b0, op, N, o);
    }
  });
  return reshape_output(out, x);
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w) {
  const auto x2d = flat_input(x);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), "f32_linear: weight must be contiguous float32");
  const int64_t N = w.size(0), K = w.size(1), B = x2d.size(0);
  auto out = at::empty({B, N}, x2d.options());
  const float* wp = w.data_ptr<float>();
  const float* xp = x2d.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_rows(N, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      int64_t b0 = 0;
      for (; b0 + TILE <= B; b0 += TILE) f32_rows<TILE>(wp + o * K, K, xp, b0, op, N, o);
      for (; b0 < B; ++b0) f32_rows<1>(wp + o * K, K, xp, b0, op, N, o);
    }
  });
  return reshape_output(out, x);
}


// ---- the whole decode step in one call (issue 5): at batch 1 the ~40 eager torch ops per layer
// cost more than the matrix products; here each layer is 4 parallel products and a few loops.
// float32 activations and KV cache; linears of any kind above; one token per row (T = 1).

enum LinKind : int64_t { LIN_NONE = 0, LIN_F32 = 1, LIN_INT8 = 2, LIN_Q4 = 3, LIN_SKIP = 4 };

struct Lin {
  int64_t kind = LIN_NONE, N = 0, K = 0, G = 1;  // K: stored (padded) input width
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
  const float* embed;  // (V_in, C) token embeddings
  int64_t n_tokens;
  int64_t L, C, H, Hkv, D, F, V, S, maxB;
  double eps;
  std::vector<float> h, xn, qkv, att, tmp, gu, act;
  std::vector<int8_t> xq, xq4;  // activations in the plain and the paired (4-bit) layout
  std::vector<float> dx, xs, xcb, xc;

  Decoder(std::vector<at::Tensor> norm_w, std::vector<at::Tensor> weights, std::vector<int64_t> kinds,
          std::vector<at::Tensor> caches, at::Tensor cos_t, at::Tensor sin_t, at::Tensor embed_t, int64_t n_heads,
          int64_t n_kv_heads, double norm_eps) {
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
    embed = hold(embed_t, at::kFloat).data_ptr<float>();
    n_tokens = embed_t.size(0);
    maxB = caches[0].size(0), Hkv = caches[0].size(1), S = caches[0].size(2), D = caches[0].size(3);
    H = n_heads, eps = norm_eps;
    TORCH_CHECK(n_kv_heads == Hkv && H % Hkv == 0 && cos_t.size(0) == S && cos_t.size(1) == D / 2, "Decoder: bad cache shape");
    C = norm_w[0].size(0);
    TORCH_CHECK(embed_t.dim() == 2 && embed_t.size(1) == C, "Decoder: embedding shape");
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
      TORCH_CHECK(g[i].kind == LIN_F32 ? g[i].K == K : g[i].K == (K + QK - 1) / QK * QK, "Decoder: input width");
      if (g[i].kind != LIN_F32) Kp = g[i].K;
    }
    const auto on_amx = [&](const Lin& l) { return l.kind == LIN_INT8 && l.G == 1; };
    if (B >= AMX_MIN_ROWS && amx_usable() && std::any_of(g, g + n, on_amx)) {
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
        for (int64_t o = lo; l.kind != LIN_INT8 && o < hi; ++o) {
          int64_t b0 = 0;
          if (l.kind == LIN_F32) {
            const float* w = (const float*)l.a + o * K;
            for (; b0 + TILE <= B; b0 += TILE) f32_rows<TILE>(w, K, x, b0, o_base, ld, o);
            for (; b0 < B; ++b0) f32_rows<1>(w, K, x, b0, o_base, ld, o);
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
    for (int64_t b = 0; b < B; ++b) std::copy(embed + tok[b] * C, embed + (tok[b] + 1) * C, h.data() + b * C);
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

// index of the largest value of each row of float32 logits (B, V), the first one on ties;
// torch's argmax takes ~30 us for 32000 values, a tenth of a small model's decode step
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "argmax_rows: float32 (B, V)");
  const auto x = logits.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  auto out = at::empty({B}, x.options().dtype(at::kLong));
  for (int64_t b = 0; b < B; ++b) {
    const float* r = x.data_ptr<float>() + b * V;
    __m256 best = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(r + i));
    float mx = -INFINITY;
    float lanes[8];
    _mm256_storeu_ps(lanes, best);
    for (float v : lanes) mx = std::max(mx, v);
    for (int64_t j = i; j < V; ++j) mx = std::max(mx, r[j]);
    int64_t arg = 0;
    while (arg < V && !(r[arg] == mx || std::isnan(r[arg]))) ++arg;
    out.data_ptr<int64_t>()[b] = arg < V ? arg : 0;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(llamarun_cpu, lib) {
  lib.def("int8_linear(Tensor x, Tensor w, Tensor sw) -> Tensor");
  lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  lib.def("amx_int8_linear(Tensor x, Tensor w, Tensor sw) -> Tensor");
  lib.def("f32_linear(Tensor x, Tensor w) -> Tensor");
  lib.def("argmax_rows(Tensor logits) -> Tensor");
  lib.class_<Decoder>("Decoder")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                       at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, double>())
      .def("step", &Decoder::step);
}

TORCH_LIBRARY_IMPL(llamarun_cpu, CPU, lib) {
  lib.impl("int8_linear", &int8_linear);
  lib.impl("q4_linear", &q4_linear);
  lib.impl("amx_int8_linear", &amx_int8_linear);
  lib.impl("f32_linear", &f32_linear);
  lib.impl("argmax_rows", &argmax_rows);
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(flag in flags for flag in (" avx2", " fma", " f16c"))


STALE_LOCK_S = 600  # a build takes well under this; an older lock was left by a killed build


def _clear_stale_lock(cpp_extension, name: str) -> None:
    """torch waits forever on the build folder's lock file, so one left behind by a build that was
    killed would hang every later run: remove it once it is clearly stale."""
    try:
        build_dir = cpp_extension._get_build_directory(name, False)
        lock = os.path.join(build_dir, "lock")
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
            log.warning("llamarun: removed a stale kernel build lock %s", lock)
    except (OSError, AttributeError, TypeError):
        pass  # no lock (the usual case), or a torch without this helper


def ops():
    """The namespace `torch.ops.llamarun_cpu` once the extension is built and loaded, else None."""
    if "ops" in _state:  # lock-free once decided (also what torch.compile traces)
        return _state["ops"]
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        _state["ops"] = None
        if not _cpu_supported():
            return None
        from torch.utils import cpp_extension

        _clear_stale_lock(cpp_extension, "llamarun_cpu_kernels")
        try:
            cpp_extension.load_inline(
                name="llamarun_cpu_kernels",
                cpp_sources=[CPP_SOURCE],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        # Any build failure (no compiler, odd toolchain, read-only cache) means the torch path.
        except Exception as e:  # noqa: BLE001
            log.warning(
                "llamarun: CPU quantized kernels unavailable (%s); using the slower torch path", e
            )
            return None
        _register_fakes()
        _state["ops"] = torch.ops.llamarun_cpu
        return _state["ops"]


def _register_fakes() -> None:
    # Shapes for torch.compile tracing; the kernels themselves are opaque to it.
    @torch.library.register_fake("llamarun_cpu::int8_linear")
    def _(x, w, sw):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("llamarun_cpu::q4_linear")
    def _(x, qs, d, m):
        return x.new_empty((*x.shape[:-1], qs.shape[0]))

    @torch.library.register_fake("llamarun_cpu::f32_linear")
    def _(x, w):
        return x.new_empty((*x.shape[:-1], w.shape[0]))
