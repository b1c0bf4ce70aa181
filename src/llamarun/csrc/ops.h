// The entry points that ops.cpp registers as the llamarun_cpu torch library.
#pragma once

#include "common.h"

namespace torch {
class Library;
}

namespace llamarun {

// matmul_int8.cpp
// amx: products of 2+ rows on AMX tiles where there are some (faster; not batch-invariant)
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw, bool amx);
at::Tensor amx_int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw);
// matmul_q4.cpp
// rows start .. start + out.size(0) of a 4-bit weight dequantized into out (n, padded width)
void q4_rows_into(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t start, const at::Tensor& out);
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m);
// matmul_f32.cpp
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w);
// matmul_gguf.cpp
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K);
at::Tensor gguf_rows(const at::Tensor& w, int64_t type, int64_t K, const at::Tensor& ids);
// rows start .. start + out.size(0) of w dequantized into out (n, K) float32: a prompt's tiles
// reuse one buffer instead of fresh pages each
void gguf_rows_into(const at::Tensor& w, int64_t type, int64_t K, int64_t start, const at::Tensor& out);
// gemm_gguf.cpp: a prompt's rows times a GGUF matrix in 8-bit integers, activations in `levels`
// (1 or 2) int8 levels; only where gguf_prompt_available() (AVX-512 VNNI)
at::Tensor gguf_prompt_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K, int64_t levels);
bool gguf_prompt_available();
// the same GEMM for llamarun's own int8 (quantize.py Int8Linear) and 4-bit (Int4Linear) layers
at::Tensor int8_prompt_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw, int64_t levels);
at::Tensor q4_prompt_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                            int64_t levels);
// argmax.cpp
at::Tensor argmax_rows(const at::Tensor& logits);
// decoder.cpp: silu(gate) * up row by row (the eager forward's SwiGLU; torch's element-wise loops
// round the tail of a flattened tensor differently from its body, tying a row to its batch)
at::Tensor silu_mul_rows(const at::Tensor& gate, const at::Tensor& up);
// decoder.cpp: adds the Decoder class (the one-call decode step) to lib
void register_decoder(torch::Library& lib);

}  // namespace llamarun
