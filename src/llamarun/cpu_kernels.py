"""Weight-only quantized matrix products for x86 CPUs, as a C++ extension built on first use.

Why: on AVX-512 machines torch's own `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` and even
MKL's float GEMV run far below memory bandwidth at batch 1 (issue 5). These kernels follow
llama.cpp's approach: activations are quantized per block of 32 (two int8 levels, ~15 bits), then
int8 x int8 (or 4-bit x int8) dot products run with VNNI `vpdpbusd` (AVX2 `vpmaddubsw` without
VNNI), one pass over each weight row shared by every batch row. Threads: torch's intra-op pool.

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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Activations in two int8 levels per block of 32: x ~ d * (256 * q1 + q2) with |q1|, |q2| <= 127,
// q2 quantizing what q1 leaves (about 15 bits in all; one level alone, as llama.cpp does, turns
// SmolLM2's answers to gibberish). xq (B, Kp/32, 64): q1 then q2 of each block; dx (B, Kp/32) = d;
// xs (B, Kp/32) = the block's exact float sum. Columns K..Kp are zero padding.
void quantize_rows(const float* x, int64_t B, int64_t K, int64_t Kp, int8_t* xq, float* dx, float* xs) {
  const int64_t nb = Kp / QK;
  auto rows = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nb, blk = i % nb;
      const float* src = x + b * K + blk * QK;
      const int64_t n = std::min<int64_t>(QK, K - blk * QK);
      float buf[QK] = {0};
      for (int64_t j = 0; j < n; ++j) buf[j] = src[j];
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < QK; ++j) {
        amax = std::max(amax, std::fabs(buf[j]));
        sum += buf[j];
      }
      const float d1 = amax / 127.f, id1 = d1 ? 1.f / d1 : 0.f, id2 = id1 * 256.f;
      int8_t* dst = xq + (b * nb + blk) * 2 * QK;
      for (int j = 0; j < QK; ++j) {
        const float q1 = std::nearbyint(buf[j] * id1);
        const float q2 = std::nearbyint((buf[j] - q1 * d1) * id2);
        dst[j] = (int8_t)q1;
        dst[QK + j] = (int8_t)std::max(-127.f, std::min(127.f, q2));
      }
      dx[b * nb + blk] = d1 / 256.f;
      xs[b * nb + blk] = sum;
    }
  };
  if (B * nb < 512) rows(0, B * nb);
  else parallel_rows(B * nb, rows);
}

struct QuantizedX {
  at::Tensor xq, dx, xs;
  int64_t B, Kp;
};

QuantizedX quantize_x(const at::Tensor& x2d, int64_t Kp) {
  const int64_t B = x2d.size(0), K = x2d.size(1);
  auto xq = at::empty({B, 2 * Kp}, x2d.options().dtype(at::kChar));
  auto dx = at::empty({B, Kp / QK}, x2d.options());
  auto xs = at::empty({B, Kp / QK}, x2d.options());
  quantize_rows(x2d.data_ptr<float>(), B, K, Kp, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), xs.data_ptr<float>());
  return {xq, dx, xs, B, Kp};
}

// Independent accumulators per batch row: one row alone would wait on the fmadd latency chain.
template <int NB> constexpr int lanes() { return NB == 1 ? 4 : 1; }

// ---- int8 weights: w (N, Kp) int8, sw (N, G) float with G = 1 (per row) or Kp/32 (per block)
template <int NB>
inline void int8_rows(const int8_t* w, const float* sw, int64_t G, int64_t Kp, const int8_t* xq,
                      const float* dx, int64_t b0, float* out, int64_t N, int64_t o) {
  constexpr int U = lanes<NB>();
  const int64_t nb = Kp / QK;
  __m256 acc[NB][U];
  for (int j = 0; j < NB; ++j)
    for (int u = 0; u < U; ++u) acc[j][u] = _mm256_setzero_ps();
  int64_t blk = 0;
  for (; blk < nb; blk += 8) {
    const int n = (int)std::min<int64_t>(8, nb - blk);
    float ds[NB][8];
    for (int j = 0; j < NB; ++j)
      for (int i = 0; i < n; ++i) ds[j][i] = dx[(b0 + j) * nb + blk + i] * (G == 1 ? sw[0] : sw[blk + i]);
    for (int i = 0; i < n; ++i) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + (blk + i) * QK));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      for (int j = 0; j < NB; ++j) {
        const int8_t* xb = xq + ((b0 + j) * nb + blk + i) * 2 * QK;
        const __m256i x1 = _mm256_loadu_si256((const __m256i*)xb), x2 = _mm256_loadu_si256((const __m256i*)(xb + QK));
        const __m256i s = dot2_u8s8(aw, _mm256_sign_epi8(x1, wv), _mm256_sign_epi8(x2, wv));
        acc[j][i % U] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(ds[j][i]), acc[j][i % U]);
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    __m256 a = acc[j][0];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[j][u]);
    out[(b0 + j) * N + o] = hsum(a);
  }
}

// ---- 4-bit weights in GGUF Q4 nibble order: qs (N, Kp/2) uint8, per group of 32 byte i holds
// element i (low nibble) and element i+16 (high nibble); w = d * q + m with d, m (N, Kp/32) fp16.
template <int NB>
inline void q4_rows(const uint8_t* qs, const at::Half* d, const at::Half* m, int64_t Kp, const int8_t* xq,
                    const float* dx, const float* xs, int64_t b0, float* out, int64_t N, int64_t o) {
  constexpr int U = lanes<NB>();
  const int64_t nb = Kp / QK;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc[NB][U], macc[NB];
  for (int j = 0; j < NB; ++j) {
    macc[j] = _mm256_setzero_ps();
    for (int u = 0; u < U; ++u) acc[j][u] = _mm256_setzero_ps();
  }
  int64_t blk = 0;
  for (; blk + 8 <= nb; blk += 8) {  // 8 groups: their scales as one vector
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + blk)));
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(m + blk)));
    float ds[NB][8];
    for (int j = 0; j < NB; ++j) {
      _mm256_storeu_ps(ds[j], _mm256_mul_ps(dv, _mm256_loadu_ps(dx + (b0 + j) * nb + blk)));
      macc[j] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xs + (b0 + j) * nb + blk), macc[j]);
    }
    for (int i = 0; i < 8; ++i) {
      const __m128i q = _mm_loadu_si128((const __m128i*)(qs + (blk + i) * 16));
      const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low4), _mm_and_si128(q, low4));
      for (int j = 0; j < NB; ++j) {
        const int8_t* xb = xq + ((b0 + j) * nb + blk + i) * 2 * QK;
        const __m256i s = dot2_u8s8(wv, _mm256_loadu_si256((const __m256i*)xb), _mm256_loadu_si256((const __m256i*)(xb + QK)));
        acc[j][i % U] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(ds[j][i]), acc[j][i % U]);
      }
    }
  }
  float tail[NB];
  for (int j = 0; j < NB; ++j) tail[j] = 0.f;
  for (; blk < nb; ++blk) {
    const float dw = (float)d[blk], mw = (float)m[blk];
    const __m128i q = _mm_loadu_si128((const __m128i*)(qs + blk * 16));
    const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low4), _mm_and_si128(q, low4));
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


at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sw) {
  const auto x2d = flat_input(x);
  const int64_t N = w.size(0), Kp = w.size(1), G = sw.size(1);
  TORCH_CHECK(Kp % QK == 0 && (G == 1 || G == Kp / QK), "int8_linear: bad weight layout");
  const auto qx = quantize_x(x2d, Kp);
  auto out = at::empty({qx.B, N}, x2d.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = sw.data_ptr<float>();
  const int8_t* xq = qx.xq.data_ptr<int8_t>();
  const float* dx = qx.dx.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t B = qx.B;
  parallel_rows(N, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int8_t* wr = wp + o * Kp;
      const float* sr = sp + o * G;
      int64_t b0 = 0;
      for (; b0 + TILE <= B; b0 += TILE) int8_rows<TILE>(wr, sr, G, Kp, xq, dx, b0, op, N, o);
      for (; b0 < B; ++b0) int8_rows<1>(wr, sr, G, Kp, xq, dx, b0, op, N, o);
    }
  });
  return reshape_output(out, x);
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
  const auto x2d = flat_input(x);
  const int64_t N = qs.size(0), Kp = qs.size(1) * 2;
  TORCH_CHECK(Kp % QK == 0 && d.size(1) == Kp / QK && m.size(1) == Kp / QK, "q4_linear: bad weight layout");
  const auto qx = quantize_x(x2d, Kp);
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

}  // namespace

TORCH_LIBRARY(llamarun_cpu, lib) {
  lib.def("int8_linear(Tensor x, Tensor w, Tensor sw) -> Tensor");
  lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  lib.def("f32_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamarun_cpu, CPU, lib) {
  lib.impl("int8_linear", &int8_linear);
  lib.impl("q4_linear", &q4_linear);
  lib.impl("f32_linear", &f32_linear);
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
