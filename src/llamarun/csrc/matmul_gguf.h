// GGUF block weights, computed on in their own bytes (matmul_gguf.cpp): the gguf_linear op and
// the Decoder's GGUF linears share these.
#pragma once

#include "common.h"

namespace llamarun {

// Activations in 16 bits per group of 32: x ~ dx * X with X = round(x / dx), dx = max|x| / 32767
// (about the precision of quantize_rows' two int8 levels; 8 bits, as llama.cpp's Q8_0/Q8_K,
// moved SmolLM2 Q4_K_M's perplexity by +0.35% (per 32) and +0.83% (per 256) and changed its
// greedy answers). xs32 (B, K/32) = dx * the sum of X over each group of 32 (what the minimums of
// Q4_1 and Q5_1 multiply).
struct X16 {
  std::vector<int16_t> X;  // (B, K)
  std::vector<float> dx;  // (B, K/32)
  std::vector<float> xs32;  // (B, K/32)
  int64_t B = 0, K = 0, ng = 0;
  void quantize(const float* x, int64_t rows, int64_t width);
  const int16_t* at(int64_t row, int64_t g) const { return X.data() + (row * ng + g) * QK; }
  const float* dx_at(int64_t row, int64_t g) const { return dx.data() + row * ng + g; }
};

// Activations in two int8 levels (quantize_rows' plain layout), for the types that unpack into
// bytes (gguf_blocks.h, BYTES8): x ~ dx * (256 q1 + q2), about the precision of X16, met by the
// weights' bytes. One dx per SG = 256 weights, a K-quant block, whose groups' products add up in
// integers with the sub-scales multiplied in, one conversion to float per block. xs16 / xs32 (B,
// K/16 | K/32) = dx * the sum of 256 q1 + q2 over each group of 16 / 32 (what the minimums and
// offsets multiply).
struct X8 {
  static constexpr int64_t SG = 256;
  std::vector<int8_t> xq;  // (B, K/32, 64): q1 then q2 of each group of 32
  std::vector<float> dx;  // (B, K/SG)
  std::vector<float> xs16, xs32;  // (B, K/16), (B, K/32)
  int64_t B = 0, K = 0, ng = 0;
  void quantize(const float* x, int64_t rows, int64_t width);
  // row `row`'s group of 32 g, and the dx of its scale group s
  const int8_t* at(int64_t row, int64_t g) const { return xq.data() + (row * ng + g) * 2 * QK; }
  const float* dx_at(int64_t row, int64_t s) const { return dx.data() + row * (K / SG) + s; }
};

// whether weights of `type` meet X8 (else X16) activations
bool gguf_takes_x8(int64_t type);

// out[b * ld + o] for weight rows o in [lo, hi) of a `type` matrix (N rows of row_bytes) times the
// B activation rows of x. Each output is one thread's: its weight row is unpacked once per 8
// activation rows, and the same additions in the same order give it whatever B is (batch invariance).
// x16 or x8 (gguf_takes_x8): the activations quantized for the type, the other may be empty.
void gguf_range(int64_t type, const uint8_t* w, int64_t row_bytes, const X16& x16, const X8& x8, float* out, int64_t ld,
                int64_t lo, int64_t hi);

// float32 rows of a `type` matrix: dst (n, K) = rows ids[0..n) of w (0..n-1 when ids is null)
void gguf_dequantize_rows(int64_t type, const uint8_t* w, int64_t row_bytes, int64_t K, const int64_t* ids, int64_t n,
                          float* dst);

}  // namespace llamarun
