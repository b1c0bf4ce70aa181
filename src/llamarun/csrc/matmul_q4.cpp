// The q4_linear op: 4-bit weights (matmul_q4.h) against all activation rows.
#include "matmul_q4.h"

#include "gguf_blocks.h"
#include "ops.h"
#include "quantize_act.h"

namespace llamarun {

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

void q4_rows_into(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t start, const at::Tensor& out) {
  const int64_t N = qs.size(0), Kp = qs.size(1) * 2, nb = Kp / QK, n = out.size(0);
  TORCH_CHECK(qs.device().is_cpu() && d.device().is_cpu() && m.device().is_cpu() && qs.scalar_type() == at::kByte &&
                  qs.is_contiguous() && d.is_contiguous() && m.is_contiguous() && d.scalar_type() == at::kHalf &&
                  m.scalar_type() == at::kHalf && Kp % QK == 0 && d.size(0) == N && m.size(0) == N &&
                  d.size(1) == nb && m.size(1) == nb,
              "q4_rows_into: bad weight layout");
  TORCH_CHECK(0 <= start && start + n <= N, "q4_rows_into: rows ", start, "..", start + n, " out of range");
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const at::Half *dp = d.data_ptr<at::Half>(), *mp = m.data_ptr<at::Half>();
  rows_into(out, Kp, 16, "q4_rows_into", [&](int64_t i, float* dst) {
    const int64_t o = start + i;
    for (int64_t g = 0; g < nb; ++g) {  // q * d then + m, as the torch dequantization
      const float mv = (float)mp[o * nb + g];
      store_dequantized<QK>(nibbles16(qp + o * (Kp / 2) + g * 16), (float)dp[o * nb + g], &mv, dst + g * QK);
    }
  });
}

}  // namespace llamarun
