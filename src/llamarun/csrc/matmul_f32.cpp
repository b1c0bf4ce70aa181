// The f32_linear op: float32 weights (matmul_f32.h) against all activation rows.
#include "matmul_f32.h"

#include "ops.h"

namespace llamarun {

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w) {
  const auto x2d = flat_input(x);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), "f32_linear: weight must be contiguous float32");
  const int64_t N = w.size(0), K = w.size(1), B = x2d.size(0);
  auto out = at::empty({B, N}, x2d.options());
  const float* wp = w.data_ptr<float>();
  const float* xp = x2d.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_rows(N, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) f32_row(wp + o * K, K, xp, B, op, N, o);
  });
  return reshape_output(out, x);
}

}  // namespace llamarun
