// ---- AMX (Intel Sapphire Rapids and later): int8 tile products for batches of activation rows.
// Per-channel int8 weights (G = 1) are read as they are stored: 16 weight rows x 64 bytes are one
// A tile (stride Kp), so nothing is repacked. Activations are quantized per row in two int8
// levels, x ~ sx * (256 * q1 + q2) (sx = max|x| / 127 / 256, about 15 bits as quantize_rows), laid
// out as B tiles in the VNNI order (16 rows of 4 consecutive k x 16 batch rows). One tdpbssd does
// 16x16x64 multiply-adds, so a batch of 16 costs about what its weight reads cost (the AVX path
// of matmul_int8.cpp reads each weight once per pass too, but its multiply-adds are 16x fewer per
// cycle; 110M shape on 2 cores: a step of 16 rows at position 5 takes ~14 ms, one row ~9 ms). A
// single row stays on the AVX loop, which measured ~10% faster there (medians of alternating runs).
// Opt-in (load(amx=True)): activations quantized per row, not per block of 32, so a row's result
// depends on which rows share its batch, and with temperature 0 a request could answer
// differently beside others than alone (batch invariance, issue 12).
// The tile code is in amx.cpp, compiled where the compiler targets AMX; elsewhere the inline stubs
// below (amx_usable() false) let the callers drop the AMX branches, as in one file.
#pragma once

#include "common.h"

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512F__) && defined(__linux__)
#define LLAMARUN_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace llamarun {

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
inline bool amx_usable() {
  static const bool ok = [] {  // the kernel must grant this process the tile state first
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

constexpr int64_t AMX_K = 64;  // bytes of k per tile row

// x (B, K) float -> xp: per batch tile of 16 rows, per level, (Kp64/64) B tiles of 1 KB;
// sx (B) the row scales. Rows B..16*ceil(B/16) and columns K..Kp64 are zero.
void amx_quantize(const float* x, int64_t B, int64_t K, int64_t Kp64, int8_t* xp, float* sx);

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
void amx_int8(const std::vector<AmxJob>& jobs, const AmxX& ax);
#else
inline bool amx_usable() { return false; }
struct AmxX {
  AmxX(const float*, int64_t, int64_t) {}
};
inline void amx_int8(const std::vector<AmxJob>&, const AmxX&) {}
#endif

}  // namespace llamarun
