// GGML's quantized blocks (ggml-common.h layouts), unpacked with AVX2 for the kernels of
// matmul_gguf.cpp, in one of two forms.
// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and IQ4_XS unpack one block into 16-bit weights (met by
// 16-bit activations, X16):
//   W        int16 weights in element order, handed on per group of 32 (W32): |W| <= 4096, so
//            a product with a 16-bit activation and four of them summed stay inside int32;
//   scale[]  the float scale of each group of 32: d, or d * sc for IQ4_XS's sub-blocks of 32;
//            w = scale * W + m;
//   m[]      for the types with minimums, the float offset of each group of MG weights (Q4_1's m),
//            added through the activations' group sums.
//   The signed offsets (Q4_0's -8) are subtracted here, in integers, exactly.
// The K-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (BYTES8) unpack into bytes instead (met by two
// 8-bit activation levels, X8), in two steps, scales(b, s, m) then weights(b, fn):
//   U        the 32 weights of a group as unsigned bytes q in element order, w = d * sc * (q - OFF)
//            + m, the offset (Q3_K's 4, Q6_K's 32) taken through the activations' sums in the product;
//   s        (KScales) the block's float d and its integer sub-scales sc, per 32 weights or per 16
//            (S16: Q2_K, Q3_K, Q6_K, whose sub-scales differ inside a group); d * sc is exact in
//            float, so that (d * sc) * (q - OFF) is one rounding, as gguf-py's;
//   m[]      the minimums (-dmin * mn of Q2_K, Q4_K, Q5_K), one per MG weights.
//   Their integer sub-scales meet the products in vpmaddwd, summed over the block in int32
//   (matmul_gguf.cpp's row_times8): one float step per block of 256 instead of per group of 32;
//   Q2_K left a 16-bit form (sub-scales multiplied into the weights) for this one, 2x as fast.
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

// 16 + 16 bytes of values 0..255 (weights 0..15, 16..31) -> int16 q - offset
inline W32 widen(__m128i lo, __m128i hi, int16_t offset = 0) {
  const __m256i o = _mm256_set1_epi16(offset);
  return {_mm256_sub_epi16(_mm256_cvtepu8_epi16(lo), o), _mm256_sub_epi16(_mm256_cvtepu8_epi16(hi), o)};
}
inline W32 widen(__m256i q, int16_t offset = 0) {
  return widen(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1), offset);
}
// 16 + 16 signed bytes -> int16
inline W32 widen_signed(__m128i lo, __m128i hi) { return {_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi)}; }

// the 32 nibbles of 16 bytes: low nibbles (weights 0..15) and high ones (16..31), as bytes
struct Nibbles {
  __m128i lo, hi;
};
inline Nibbles nibbles(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(0x0F);
  return {_mm_and_si128(q, m), _mm_and_si128(_mm_srli_epi16(q, 4), m)};
}

// 16 bytes of nibble pairs straight into int16 lanes, minus offset: .lo the 16 low nibbles, .hi
// the 16 high ones (for Q4_0/Q4_1 weights 0..15 and 16..31), with one widening instead of the two
// of nibbles() + widen() (7 instructions a group, this 5)
inline W32 nibbles16(const uint8_t* p, int16_t offset = 0) {
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p)), o = _mm256_set1_epi16(offset);
  return {_mm256_sub_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0F)), o), _mm256_sub_epi16(_mm256_srli_epi16(v, 4), o)};
}

// dst[0..32) = scale * W, plus m[i / MG] for weight i when MG > 0 (m: the group's minimums, one
// per MG weights): a product then a sum, two roundings as gguf-py's and torch's dequantization
// (the empty asm keeps the compiler from fusing them into one FMA)
template <int MG>
inline void store_dequantized(const W32& w, float scale, const float* m, float* dst) {
  const __m256i halves[2] = {w.lo, w.hi};
  for (int c = 0; c < 4; ++c) {  // weights 8c .. 8c + 7
    const __m128i h = c % 2 ? _mm256_extracti128_si256(halves[c / 2], 1) : _mm256_castsi256_si128(halves[c / 2]);
    __m256 v = _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(h)));
    if constexpr (MG > 0) {
      __asm__("" : "+x"(v));
      v = _mm256_add_ps(v, _mm256_set1_ps(m[8 * c / MG]));
    }
    _mm256_storeu_ps(dst + 8 * c, v);
  }
}

// the scale of weights 16h .. 16h + 15 of a byte-form block (a scale per 32 serves both halves)
template <class T>
inline float half_scale(const float* scale, int h) {
  return T::S16 ? scale[h] : scale[h / 2];
}

// dst[0..32) = group g (bytes u) of a byte-form block in float: scale * (q - OFF), plus m[i / MG]
// for weight i when MG > 0, rounded as store_dequantized's
template <class T>
inline void store_dequantized_bytes(__m256i u, const float* scale, int g, const float* m, float* dst) {
  const __m128i halves[2] = {_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)};
  for (int c = 0; c < 4; ++c) {  // weights 8c .. 8c + 7
    const __m128i h = c % 2 ? _mm_srli_si128(halves[c / 2], 8) : halves[c / 2];
    __m256i q = _mm256_cvtepu8_epi32(h);
    if constexpr (T::OFF != 0) q = _mm256_sub_epi32(q, _mm256_set1_epi32(T::OFF));
    __m256 v = _mm256_mul_ps(_mm256_set1_ps(half_scale<T>(scale, 2 * g + c / 2)), _mm256_cvtepi32_ps(q));
    if constexpr (T::MG > 0) {
      __asm__("" : "+x"(v));
      v = _mm256_add_ps(v, _mm256_set1_ps(m[(32 * g + 8 * c) / T::MG]));
    }
    _mm256_storeu_ps(dst + 8 * c, v);
  }
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

// u + `value` (a power of 2) in the bytes where bit `bit` of v is set (u's bytes are clear there)
inline __m256i add_bit(__m256i u, __m256i v, int bit, char value) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_mask_add_epi8(u, _mm256_test_epi8_mask(v, _mm256_set1_epi8((char)(1 << bit))), u, _mm256_set1_epi8(value));
#else
  // bit `bit` of each byte moved to value's bit k by one 16-bit shift (what crosses from the
  // neighbouring byte lands on other bits, masked off): two instructions, where a compare of the
  // bit took three
  const int k = __builtin_ctz((unsigned)(uint8_t)value);
  const __m256i t = bit > k ? _mm256_srli_epi16(v, bit - k) : bit < k ? _mm256_slli_epi16(v, k - bit) : v;
  return _mm256_or_si256(u, _mm256_and_si256(t, _mm256_set1_epi8(value)));
#endif
}

inline __m128i iq4_lookup(__m128i idx) {
  return _mm_shuffle_epi8(_mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113), idx);
}

// Q4_K/Q5_K: the eight 6-bit scales and mins of 12 bytes, as bytes 0..7 of sc and mn: four at a
// time with 32-bit masks (bytes 0..3: the low 6 bits of s[0..3] / s[4..7]; bytes 4..7: a nibble
// of s[8..11] and the top 2 bits of s[0..3] / s[4..7])
inline void k_scales(const uint8_t* s, uint64_t* sc, uint64_t* mn) {
  uint32_t a, b, c;
  std::memcpy(&a, s, 4), std::memcpy(&b, s + 4, 4), std::memcpy(&c, s + 8, 4);
  const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0xc0c0c0c0;
  *sc = (a & low6) | (uint64_t)((c & low4) | ((a & top2) >> 2)) << 32;
  *mn = (b & low6) | (uint64_t)(((c >> 4) & low4) | ((b & top2) >> 2)) << 32;
}

// eight bytes -> eight floats times f
inline __m256 bytes_times(uint64_t bytes, float f) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((int64_t)bytes))), _mm256_set1_ps(f));
}

// A byte-form block's scales: w = d * sc[i] * (q - OFF) + m for the weights of sub-block i (16
// weights for S16, else 32)
struct KScales {
  float d;
  __m128i sc;  // int8 lanes, in a register: a store of 8 bytes read back as 16 stalled the loads
               // behind it (a quarter of a Q5_K product's time)
  // scale[0..n) = f * sc, exact in float for f = d (an 11-bit d times an 8-bit sc) and for d
  // times a power of 2
  void floats(float* scale, int n) const { floats(scale, n, d); }
  void floats(float* scale, int n, float f) const {
    const __m128i v = sc;
    const __m256 dv = _mm256_set1_ps(f);
    for (int i = 0; i < n; i += 8)
      _mm256_storeu_ps(scale + i, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(i ? _mm_srli_si128(v, 8) : v))));
  }
};

// One struct per type: QK weights per block, BYTES per block, MG weights per minimum (0: none);
// BYTES8, OFF and S16 for the byte-form types. unpack(b, scale, m, fn) sets the block's scales
// and its minimums m, then calls fn(g, W32) for each group g; a BYTES8 type's scales(b, s, m)
// sets s and m, and weights(b, fn) calls fn(g, U).
struct Q8_0 {
  static constexpr int QK = 32, BYTES = 34, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* scale, float*, Fn&& fn) {
    *scale = fp16(b);
    fn(0, widen_signed(_mm_loadu_si128((const __m128i*)(b + 2)), _mm_loadu_si128((const __m128i*)(b + 18))));
  }
};

struct Q4_0 {
  static constexpr int QK = 32, BYTES = 18, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* scale, float*, Fn&& fn) {
    *scale = fp16(b);
    fn(0, nibbles16(b + 2, 8));
  }
};

struct Q4_1 {
  static constexpr int QK = 32, BYTES = 20, MG = 32;
  template <class Fn> static void unpack(const uint8_t* b, float* scale, float* m, Fn&& fn) {
    *scale = fp16(b), *m = fp16(b + 2);
    fn(0, nibbles16(b + 4));
  }
};

// Q5_0/Q5_1: the 5th bits (32 of them, little-endian at p) as 0x10 bytes, with the nibbles
inline W32 five_bits(const uint8_t* p, const uint8_t* nib, int16_t offset) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  // the 5th bits as two 16-bit masks: one masked add of 16 per half, in place of spreading them
  // into bytes (broadcast, shuffle, two ands and a compare) and widening twice; the same integers,
  // 8-10% off a Q5_0 product of 1-4 rows here
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)nib)), o = _mm256_set1_epi16(offset);
  const __m256i lo = _mm256_sub_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0F)), o);
  const __m256i hi = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), o), sixteen = _mm256_set1_epi16(16);
  return {_mm256_mask_add_epi16(lo, (__mmask16)bits, lo, sixteen), _mm256_mask_add_epi16(hi, (__mmask16)(bits >> 16), hi, sixteen)};
#else
  const Nibbles q = nibbles(nib);
  const __m256i h = bit16_of(p);
  return widen(_mm_or_si128(q.lo, _mm256_castsi256_si128(h)), _mm_or_si128(q.hi, _mm256_extracti128_si256(h, 1)),
               offset);
#endif
}

struct Q5_0 {
  static constexpr int QK = 32, BYTES = 22, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* scale, float*, Fn&& fn) {
    *scale = fp16(b);
    fn(0, five_bits(b + 2, b + 6, 16));
  }
};

struct Q5_1 {
  static constexpr int QK = 32, BYTES = 24, MG = 32;
  template <class Fn> static void unpack(const uint8_t* b, float* scale, float* m, Fn&& fn) {
    *scale = fp16(b), *m = fp16(b + 2);
    fn(0, five_bits(b + 4, b + 8, 0));
  }
};

struct IQ4_NL {
  static constexpr int QK = 32, BYTES = 18, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* scale, float*, Fn&& fn) {
    *scale = fp16(b);
    const Nibbles q = nibbles(b + 2);
    fn(0, widen_signed(iq4_lookup(q.lo), iq4_lookup(q.hi)));
  }
};

// K-quants: 256 weights, sub-blocks of 32 (Q4_K, Q5_K, IQ4_XS: their scales go into the float
// scale of each group) or 16 (Q2_K, Q3_K, Q6_K: a scale per 16)
struct Q2_K {
  static constexpr int QK = 256, BYTES = 84, MG = 16, OFF = 0;
  static constexpr bool BYTES8 = true, S16 = true;
  static void scales(const uint8_t* b, KScales& s, float* m) {
    s.d = fp16(b + 80);
    const float dmin = fp16(b + 82);
    const __m128i v = _mm_loadu_si128((const __m128i*)b), m4 = _mm_set1_epi8(15);
    s.sc = _mm_and_si128(v, m4);
    const __m128i mn = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    _mm256_storeu_ps(m, bytes_times((uint64_t)_mm_cvtsi128_si64(mn), -dmin));
    _mm256_storeu_ps(m + 8, bytes_times((uint64_t)_mm_extract_epi64(mn, 1), -dmin));
  }
  template <class Fn> static void weights(const uint8_t* b, Fn&& fn) {
    for (int n = 0; n < 2; ++n) {  // weight 128n + 32j + l is bits 2j..2j+1 of qs[32n + l]
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * n));
      for (int j = 0; j < 4; ++j) fn(4 * n + j, _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), _mm256_set1_epi8(3)));
    }
  }
};

// Q3_K's sixteen 6-bit scales (12 bytes at sb), sc - 32: sc i's low 4 bits are nibble i / 8 of
// sb[i % 8], its top 2 bits bits 2 (i / 4).. of sb[8 + i % 4]; all 16 at once in one vector (the
// scalar loop's bit extraction had cost more than the block's products: a 768-wide Q3_K product
// ran at half the weights per second of the other K-quants)
inline __m128i q3_scales(const uint8_t* sb) {
  uint64_t lo8;
  uint32_t hi4;
  std::memcpy(&lo8, sb, 8), std::memcpy(&hi4, sb + 8, 4);
  const __m128i v = _mm_cvtsi64_si128((int64_t)lo8), m4 = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
  const uint32_t m2 = 0x03030303;
  const __m128i high = _mm_setr_epi32((int)(hi4 & m2), (int)((hi4 >> 2) & m2), (int)((hi4 >> 4) & m2), (int)((hi4 >> 6) & m2));
  return _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(high, 4)), _mm_set1_epi8(32));
}

struct Q3_K {
  static constexpr int QK = 256, BYTES = 110, MG = 0, OFF = 4;
  static constexpr bool BYTES8 = true, S16 = true;
  static void scales(const uint8_t* b, KScales& s, float*) { s.sc = q3_scales(b + 96), s.d = fp16(b + 108); }
  template <class Fn> static void weights(const uint8_t* b, Fn&& fn) {
    const __m256i hmask = _mm256_loadu_si256((const __m256i*)b);
    for (int n = 0; n < 2; ++n) {  // weight 128n + 32j + l: bits 2j.. of qs[32n + l], bit 4n + j of hmask[l]
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 32 + 32 * n));
      for (int j = 0; j < 4; ++j) {
        const int g = 4 * n + j;
        // the high bit *clear* means minus 4: q + 4 * bit is 0..7, offset 4
        fn(g, add_bit(_mm256_and_si256(_mm256_srli_epi16(q, 2 * j), _mm256_set1_epi8(3)), hmask, g, 4));
      }
    }
  }
};

// Q4_K and Q5_K: 8 sub-blocks of 32, w = d * sc * q - dmin * mn (6-bit sc and mn), q of 4 or 5 bits
struct Q4_K {
  static constexpr int QK = 256, BYTES = 144, MG = 32, OFF = 0;
  static constexpr bool BYTES8 = true, S16 = false;
  static void scales(const uint8_t* b, KScales& s, float* m) {
    uint64_t sc, mn;
    k_scales(b + 4, &sc, &mn);
    s.sc = _mm_cvtsi64_si128((int64_t)sc), s.d = fp16(b);
    _mm256_storeu_ps(m, bytes_times(mn, -fp16(b + 2)));
  }
  template <class Fn> static void weights(const uint8_t* b, Fn&& fn) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {  // sub-block 2j: the low nibbles of qs[32j..32j + 31], 2j + 1: the high ones
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * j));
      fn(2 * j, _mm256_and_si256(q, m4));
      fn(2 * j + 1, _mm256_and_si256(_mm256_srli_epi16(q, 4), m4));
    }
  }
};

struct Q5_K {
  static constexpr int QK = 256, BYTES = 176, MG = 32, OFF = 0;
  static constexpr bool BYTES8 = true, S16 = false;
  static void scales(const uint8_t* b, KScales& s, float* m) { Q4_K::scales(b, s, m); }  // the same 16 bytes
  template <class Fn> static void weights(const uint8_t* b, Fn&& fn) {
    const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 16)), m4 = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {  // as Q4_K; the 5th bit of sub-block g's weight l is bit g of qh[l]
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 48 + 32 * j));
      fn(2 * j, add_bit(_mm256_and_si256(q, m4), qh, 2 * j, 16));
      fn(2 * j + 1, add_bit(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), qh, 2 * j + 1, 16));
    }
  }
};

struct Q6_K {
  static constexpr int QK = 256, BYTES = 210, MG = 0, OFF = 32;
  static constexpr bool BYTES8 = true, S16 = true;
  static void scales(const uint8_t* b, KScales& s, float*) {
    s.sc = _mm_loadu_si128((const __m128i*)(b + 192)), s.d = fp16(b + 208);
  }
  template <class Fn> static void weights(const uint8_t* b, Fn&& fn) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    for (int n = 0; n < 2; ++n) {  // weight 128n + r: nibble r / 64 of ql[64n + r % 64], bits 2 (r / 32).. of qh[32n + r % 32]
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(b + 64 * n));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(b + 64 * n + 32));
      const __m256i h = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * n));
      const __m256i low[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                              _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
      for (int j = 0; j < 4; ++j) {
        // bits 2j, 2j + 1 of each qh byte to bits 4, 5 (16-bit shifts: what crosses bytes is masked off)
        const __m256i t = j < 2 ? _mm256_slli_epi16(h, 4 - 2 * j) : j == 2 ? h : _mm256_srli_epi16(h, 2);
        fn(4 * n + j, _mm256_or_si256(low[j], _mm256_and_si256(t, m2)));
      }
    }
  }
};

struct IQ4_XS {
  static constexpr int QK = 256, BYTES = 136, MG = 0;
  template <class Fn> static void unpack(const uint8_t* b, float* scale, float*, Fn&& fn) {
    const float d = fp16(b);
    const int high = b[2] | (b[3] << 8);
    for (int g = 0; g < 8; ++g)
      scale[g] = d * (float)((((b[4 + g / 2] >> (4 * (g % 2))) & 15) | (((high >> (2 * g)) & 3) << 4)) - 32);
    for (int g = 0; g < 8; ++g) {
      const Nibbles q = nibbles(b + 8 + 16 * g);
      fn(g, widen_signed(iq4_lookup(q.lo), iq4_lookup(q.hi)));
    }
  }
};

// whether T unpacks into bytes (the 8-bit activation levels' kernel) rather than W32
template <class T>
constexpr bool bytes8() {
  if constexpr (requires { T::BYTES8; }) return T::BYTES8;
  else return false;
}

// a block of any type with float scales: for a byte-form type scale[i] = d * sc[i] (16 or 8
// of them), then its groups as T::weights hands them on
template <class T, class Fn>
inline void unpack(const uint8_t* b, float* scale, float* m, Fn&& fn) {
  if constexpr (bytes8<T>()) {
    KScales s;
    T::scales(b, s, m);
    s.floats(scale, T::S16 ? 16 : 8);
    T::weights(b, fn);
  } else {
    T::unpack(b, scale, m, fn);
  }
}

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
