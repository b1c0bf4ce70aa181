// Activation quantization for the int8 and 4-bit products (AVX2), shared by the op entry points
// and the Decoder.
#pragma once

#include "common.h"

namespace llamarun {

// Activations in two int8 levels per block of 32: x ~ d * (256 * q1 + q2) with |q1|, |q2| <= 127,
// q2 quantizing what q1 leaves (about 15 bits in all; one level alone, as llama.cpp does, turns
// SmolLM2's answers to gibberish). xq (B, Kp/32, 64): q1 then q2 of each block; dx (B, Kp/32) = d;
// xs (B, Kp/32) = the block's exact float sum. Columns K..Kp are zero padding.
// `paired` lays blocks out for 4-bit weights (q4_rows): blocks 2p and 2p+1 (A, B) share 128 bytes,
// per level [A0..15 B0..15][A16..31 B16..31], the order of their nibbles in one 32-byte load; an
// unpaired last block keeps the plain order.
// xcb (B, Kp/32) = 128 * the block's dequantized sum (what int8_tile's weight offset adds);
// xs16 (B, Kp/16) and xs32 (B, Kp/32), where given: d * the exact sum of 256 q1 + q2 over each 16
// and 32 (what the GGUF kernels' minimums and offsets multiply). xs and xcb may be null (the GGUF
// kernels take neither). scale_group (a multiple of 32 dividing Kp): the weights that share one
// scale, d1 = max|x| over the group / 127 for all its blocks of 32; dx (B, Kp/scale_group).
void quantize_rows(const float* x, int64_t B, int64_t K, int64_t Kp, int8_t* xq, float* dx, float* xs,
                   float* xcb, bool paired = false, float* xs16 = nullptr, float* xs32 = nullptr,
                   int64_t scale_group = QK);

struct QuantizedX {
  at::Tensor xq, dx, xs, xcb;
  int64_t B, Kp;
};

QuantizedX quantize_x(const at::Tensor& x2d, int64_t Kp, bool paired = false);

// xc[b] = the sum of row b's xcb over its nb blocks
void row_sums(const float* xcb, int64_t B, int64_t nb, float* xc);

}  // namespace llamarun
