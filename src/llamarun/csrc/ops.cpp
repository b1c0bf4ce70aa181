// The llamarun_cpu torch library: every op and class the Python side (cpu_kernels.py) sees.
#include <torch/library.h>

#include <string>
#include <vector>

#include "amx.h"
#include "linear_kinds.h"
#include "ops.h"

namespace {

// the names of the Decoder's linear kinds in code order (cpu_kernels.linear_kinds)
std::vector<std::string> linear_kinds() {
  using llamarun::kLinKindNames;
  return std::vector<std::string>(std::begin(kLinKindNames), std::end(kLinKindNames));
}

// the instruction sets these kernels were compiled for (cpu_kernels.describe), as the code tests them
std::string isa() {
  std::string s = "AVX2";
#ifdef __AVX512F__
  s += ", AVX-512";
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  s += ", VNNI";
#endif
#ifdef LLAMARUN_AMX
  s += llamarun::amx_usable() ? ", AMX" : ", AMX (not granted by the OS)";
#endif
  return s;
}

}  // namespace

TORCH_LIBRARY(llamarun_cpu, lib) {
  lib.def("int8_linear(Tensor x, Tensor w, Tensor sw, bool amx=False) -> Tensor");
  lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  lib.def("q4_rows_into(Tensor qs, Tensor d, Tensor m, int start, Tensor(a!) out) -> ()");
  lib.def("amx_int8_linear(Tensor x, Tensor w, Tensor sw) -> Tensor");
  lib.def("f32_linear(Tensor x, Tensor w) -> Tensor");
  lib.def("gguf_linear(Tensor x, Tensor w, int type, int K) -> Tensor");
  lib.def("gguf_rows(Tensor w, int type, int K, Tensor ids) -> Tensor");
  lib.def("gguf_rows_into(Tensor w, int type, int K, int start, Tensor(a!) out) -> ()");
  lib.def("gguf_prompt_linear(Tensor x, Tensor w, int type, int K, int levels) -> Tensor");
  lib.def("int8_prompt_linear(Tensor x, Tensor w, Tensor sw, int levels) -> Tensor");
  lib.def("q4_prompt_linear(Tensor x, Tensor qs, Tensor d, Tensor m, int levels) -> Tensor");
  lib.def("gguf_prompt_available() -> bool", &llamarun::gguf_prompt_available);
  lib.def("argmax_rows(Tensor logits) -> Tensor");
  lib.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  lib.def("linear_kinds() -> str[]", &linear_kinds);
  lib.def("isa() -> str", &isa);
  llamarun::register_decoder(lib);
}

TORCH_LIBRARY_IMPL(llamarun_cpu, CPU, lib) {
  lib.impl("int8_linear", &llamarun::int8_linear);
  lib.impl("q4_linear", &llamarun::q4_linear);
  lib.impl("q4_rows_into", &llamarun::q4_rows_into);
  lib.impl("amx_int8_linear", &llamarun::amx_int8_linear);
  lib.impl("f32_linear", &llamarun::f32_linear);
  lib.impl("gguf_linear", &llamarun::gguf_linear);
  lib.impl("gguf_rows", &llamarun::gguf_rows);
  lib.impl("gguf_rows_into", &llamarun::gguf_rows_into);
  lib.impl("gguf_prompt_linear", &llamarun::gguf_prompt_linear);
  lib.impl("int8_prompt_linear", &llamarun::int8_prompt_linear);
  lib.impl("q4_prompt_linear", &llamarun::q4_prompt_linear);
  lib.impl("argmax_rows", &llamarun::argmax_rows);
  lib.impl("silu_mul", &llamarun::silu_mul_rows);
}
