// GGML's quantized blocks (ggml-common.h layouts), unpacked with AVX2 for the kernels of
// matmul_gguf.cpp. Every type unpacks one block into the same form:
//   W      int16 weights in element order, handed on per group of 32 (W32), the block's integer sub-scales already multiplied in
//          (Q4_K: sc * q; Q6_K: sc * (q - 32); Q8_0: q): |W| <= 4096, so a product with a 16-bit
//          activation and four of them summed stay inside int32;
//   s      the block's float scale (the fp16 d): w = s * W + m;
//   m[]    for the types with minimums, the float offset of each group of MG weights (-dmin * min
//          of a K-quant sub-block, Q4_1's m), added through the activations' group sums.
// The signed offsets (Q4_0's -8, Q6_K's -32, Q3_K's -4) are subtracted here, in integers, exactly.
// blocks.py is the same arithmetic in torch (checked against gguf-py); these are checked against it.
#pragma once

#include "common.h"

namespace llamarun {

// ggml's type ids (GGMLQuantizationType), as Python passes them
enum GgmlType : int64_t {
  GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8, GGML_Q2_K = 10, GGML_Q3_K = 11,
  GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_IQ4_NL = 20, GGML_IQ4_XS = 23,
};

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// A group of 32 weights as two vectors of 16 int16 (weights 0..15, 16..31), what unpack hands on
struct W32 {
  __m256i lo, hi;
};

// 32 bytes of values 0..255 -> int16 q - offset
inline W32 widen(__m256i q, int16_t offset = 0) {
  const __m256i o = _mm256_set1_epi16(offset);
  return {_mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)), o),
          _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1)), o)};
}
// as widen, times the sub-block scale s0 (weights 0..15) and s1 (16..31)
inline W32 widen_scaled(__m256i q, int16_t offset, int16_t s0, int16_t s1) {
  const W32 w = widen(q, offset);
  return {_mm256_mullo_epi16(w.lo, _mm256_set1_epi16(s0)), _mm256_mullo_epi16(w.hi, _mm256_set1_epi16(s1))};
}
// 32 signed bytes -> int16
inline W32 widen_signed(__m256i q) {
  return {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1))};
}

// the 32 nibbles of 16 bytes as 32 bytes: low nibbles (weights 0..15) then high ones (16..31)
inline __m256i nibbles32(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

// 32 bits (little-endian at p) -> 32 bytes, 0x10 where bit i is set (the 5th bit of Q5_0/Q5_1)
inline __m256i bit16_of(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)bits), _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i mask = _mm256_set1_epi64x(0x8040201008040201);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(0x10));
}

// bytes v where bit `bit` is set -> `value`, else 0
inline __m256i bit_to(__m256i v, int bit, char value) {
  const __m256i b = _mm256_set1_epi8((char)(1 << bit));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, b), b), _mm256_set1_epi8(value));
}

inline __m256i iq4_lookup(__m256i idx) {
  const __m256i table = _mm256_broadcastsi128_si256(
      _mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113));
  return _mm256_shuffle_epi8(table, idx);
}

// Q4_K/Q5_K: eight 6-bit scales and mins from 12 bytes
inline void k_scales(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63, mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// One struct per type: QK weights per block, BYTES per block, MG weights per minimum (0: none).
// unpack(b, s, m, fn) sets the block's scale s and minimums m and calls fn(g, W32) per group of 32.
struct Q8_0 {
  static constexpr int QK = 32, BYTES = 34, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float*, Fn&& fn) {
    *s = fp16(b);
    fn(0, widen_signed(_mm256_loadu_si256((const __m256i*)(b + 2))));
  }
};

struct Q4_0 {
  static constexpr int QK = 32, BYTES = 18, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float*, Fn&& fn) {
    *s = fp16(b);
    fn(0, widen(nibbles32(b + 2), 8));
  }
};

struct Q4_1 {
  static constexpr int QK = 32, BYTES = 20, MG = 32;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float* m, Fn&& fn) {
    *s = fp16(b), *m = fp16(b + 2);
    fn(0, widen(nibbles32(b + 4)));
  }
};

struct Q5_0 {
  static constexpr int QK = 32, BYTES = 22, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float*, Fn&& fn) {
    *s = fp16(b);
    fn(0, widen(_mm256_or_si256(nibbles32(b + 6), bit16_of(b + 2)), 16));
  }
};

struct Q5_1 {
  static constexpr int QK = 32, BYTES = 24, MG = 32;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float* m, Fn&& fn) {
    *s = fp16(b), *m = fp16(b + 2);
    fn(0, widen(_mm256_or_si256(nibbles32(b + 8), bit16_of(b + 4))));
  }
};

struct IQ4_NL {
  static constexpr int QK = 32, BYTES = 18, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float*, Fn&& fn) {
    *s = fp16(b);
    fn(0, widen_signed(iq4_lookup(nibbles32(b + 2))));
  }
};

// K-quants: 256 weights, sub-blocks of 32 (Q4_K, Q5_K, IQ4_XS) or 16 (Q2_K, Q3_K, Q6_K)
struct Q2_K {
  static constexpr int QK = 256, BYTES = 84, MG = 16;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float* m, Fn&& fn) {
    const uint8_t* sc = b;
    *s = fp16(b + 80);
    const float dmin = fp16(b + 82);
    for (int i = 0; i < 16; ++i) m[i] = -dmin * (float)(sc[i] >> 4);
    for (int n = 0; n < 2; ++n) {  // weight 128n + 32j + l is bits 2j..2j+1 of qs[32n + l]
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * n));
      for (int j = 0; j < 4; ++j) {
        const int g = 4 * n + j;
        const __m256i v = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), _mm256_set1_epi8(3));
        fn(g, widen_scaled(v, 0, sc[2 * g] & 15, sc[2 * g + 1] & 15));
      }
    }
  }
};

struct Q3_K {
  static constexpr int QK = 256, BYTES = 110, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float*, Fn&& fn) {
    const uint8_t* sb = b + 96;
    int16_t sc[16];
    for (int i = 0; i < 16; ++i)
      sc[i] = (int16_t)((((i < 8 ? sb[i] : sb[i - 8] >> 4) & 15) | (((sb[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32);
    *s = fp16(b + 108);
    const __m256i hmask = _mm256_loadu_si256((const __m256i*)b);
    for (int n = 0; n < 2; ++n) {  // weight 128n + 32j + l: bits 2j.. of qs[32n + l], bit 4n + j of hmask[l]
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 32 + 32 * n));
      for (int j = 0; j < 4; ++j) {
        const int g = 4 * n + j;
        const __m256i low = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), _mm256_set1_epi8(3));
        // the high bit *clear* means minus 4: q + 4 * bit is 0..7, offset 4
        fn(g, widen_scaled(_mm256_or_si256(low, bit_to(hmask, g, 4)), 4, sc[2 * g], sc[2 * g + 1]));
      }
    }
  }
};

struct Q4_K {
  static constexpr int QK = 256, BYTES = 144, MG = 32;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float* m, Fn&& fn) {
    uint8_t sc[8], mn[8];
    k_scales(b + 4, sc, mn);
    *s = fp16(b);
    const float dmin = fp16(b + 2);
    for (int g = 0; g < 8; ++g) m[g] = -dmin * (float)mn[g];
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {  // sub-block 2j: low nibbles of qs[32j..], 2j + 1: high ones
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * j));
      fn(2 * j, widen_scaled(_mm256_and_si256(q, m4), 0, sc[2 * j], sc[2 * j]));
      fn(2 * j + 1, widen_scaled(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), 0, sc[2 * j + 1], sc[2 * j + 1]));
    }
  }
};

struct Q5_K {
  static constexpr int QK = 256, BYTES = 176, MG = 32;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float* m, Fn&& fn) {
    uint8_t sc[8], mn[8];
    k_scales(b + 4, sc, mn);
    *s = fp16(b);
    const float dmin = fp16(b + 2);
    for (int g = 0; g < 8; ++g) m[g] = -dmin * (float)mn[g];
    const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 16)), m4 = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {  // as Q4_K; the 5th bit of sub-block g's weight l is bit g of qh[l]
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 48 + 32 * j));
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(q, m4), bit_to(qh, 2 * j, 16));
      const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), bit_to(qh, 2 * j + 1, 16));
      fn(2 * j, widen_scaled(lo, 0, sc[2 * j], sc[2 * j]));
      fn(2 * j + 1, widen_scaled(hi, 0, sc[2 * j + 1], sc[2 * j + 1]));
    }
  }
};

struct Q6_K {
  static constexpr int QK = 256, BYTES = 210, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float*, Fn&& fn) {
    const int8_t* sc = (const int8_t*)(b + 192);
    *s = fp16(b + 208);
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    for (int n = 0; n < 2; ++n) {  // weight 128n + r: nibble r / 64 of ql[64n + r % 64], bits 2 (r / 32).. of qh[32n + r % 32]
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(b + 64 * n));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(b + 64 * n + 32));
      const __m256i h = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * n));
      const __m256i low[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                              _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
      for (int j = 0; j < 4; ++j) {
        const __m256i high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * j), m2), 4);
        const int g = 4 * n + j;
        fn(g, widen_scaled(_mm256_or_si256(low[j], high), 32, sc[2 * g], sc[2 * g + 1]));
      }
    }
  }
};

struct IQ4_XS {
  static constexpr int QK = 256, BYTES = 136, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* s, float*, Fn&& fn) {
    *s = fp16(b);
    const int high = b[2] | (b[3] << 8);
    for (int g = 0; g < 8; ++g) {
      const int16_t sc = (int16_t)((((b[4 + g / 2] >> (4 * (g % 2))) & 15) | (((high >> (2 * g)) & 3) << 4)) - 32);
      const W32 w = widen_signed(iq4_lookup(nibbles32(b + 8 + 16 * g)));
      fn(g, W32{_mm256_mullo_epi16(w.lo, _mm256_set1_epi16(sc)), _mm256_mullo_epi16(w.hi, _mm256_set1_epi16(sc))});
    }
  }
};

// fn(T{}) for the block struct of ggml type `type`; false when there is none
template <class Fn>
inline bool with_block_type(int64_t type, Fn&& fn) {
  switch (type) {
    case GGML_Q8_0: fn(Q8_0{}); return true;
    case GGML_Q4_0: fn(Q4_0{}); return true;
    case GGML_Q4_1: fn(Q4_1{}); return true;
    case GGML_Q5_0: fn(Q5_0{}); return true;
    case GGML_Q5_1: fn(Q5_1{}); return true;
    case GGML_IQ4_NL: fn(IQ4_NL{}); return true;
    case GGML_Q2_K: fn(Q2_K{}); return true;
    case GGML_Q3_K: fn(Q3_K{}); return true;
    case GGML_Q4_K: fn(Q4_K{}); return true;
    case GGML_Q5_K: fn(Q5_K{}); return true;
    case GGML_Q6_K: fn(Q6_K{}); return true;
    case GGML_IQ4_XS: fn(IQ4_XS{}); return true;
    default: return false;
  }
}

// bytes one row of K weights takes in `type`, 0 when the type is unknown or K is not whole blocks
inline int64_t block_row_bytes(int64_t type, int64_t K) {
  int64_t n = 0;
  with_block_type(type, [&](auto t) {
    using T = decltype(t);
    if (K % T::QK == 0) n = K / T::QK * T::BYTES;
  });
  return n;
}

}  // namespace llamarun
