// AMX tile products (see amx.h); nothing here where the compiler does not target AMX.
#include "amx.h"

#ifdef LLAMARUN_AMX
namespace llamarun {
namespace {

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

// tiles 0-3: int32 results (row block 0 q1, q2, row block 1 q1, q2); 4, 5: weights; 6, 7: q1, q2
void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

}  // namespace

void amx_quantize(const float* x, int64_t B, int64_t K, int64_t Kp64, int8_t* xp, float* sx) {
  const int64_t nt = (B + 15) / 16, nc = Kp64 / AMX_K;
  std::vector<int8_t> q(2 * 16 * Kp64);  // one batch tile's rows, row-major, per level
  for (int64_t t = 0; t < nt; ++t) {
    std::fill(q.begin(), q.end(), 0);
    for (int64_t n = 0; n < 16 && 16 * t + n < B; ++n) {
      const int64_t b = 16 * t + n;
      const float* xr = x + b * K;
      __m512 vmax = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
      float amax = _mm512_reduce_max_ps(vmax);
      for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float d1 = amax / 127.f, id1 = d1 > 0.f ? 1.f / d1 : 0.f;
      sx[b] = d1 / 256.f;
      int8_t* q1 = q.data() + n * Kp64;
      int8_t* q2 = q.data() + (16 + n) * Kp64;
      constexpr int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      const __m512 vd1 = _mm512_set1_ps(d1), vid1 = _mm512_set1_ps(id1), vid2 = _mm512_set1_ps(id1 * 256.f);
      for (k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, xr + k);
        const __m512 a = _mm512_roundscale_ps(_mm512_mul_ps(v, vid1), round);
        __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_fnmadd_ps(a, vd1, v), vid2), round);
        r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
        _mm_mask_storeu_epi8(q1 + k, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(a)));
        _mm_mask_storeu_epi8(q2 + k, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
      }
    }
    // VNNI order: tile row r of chunk c holds, for each batch row n, k = 64c + 4r .. 64c + 4r + 3
    for (int lv = 0; lv < 2; ++lv) {
      const int32_t* src = (const int32_t*)(q.data() + lv * 16 * Kp64);
      int32_t* dst = (int32_t*)(xp + ((t * 2 + lv) * nc) * 1024);
      for (int64_t c = 0; c < nc; ++c)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t n = 0; n < 16; ++n) dst[(c * 16 + r) * 16 + n] = src[n * (Kp64 / 4) + c * 16 + r];
    }
  }
}

namespace {

// out[b * ld + o] for weight rows [o0, o0 + 16 * R) and all B rows; w points at row o0, stride ws
template <int R>
inline void amx_rows(const int8_t* w, int64_t ws, const float* sw, int64_t nc, const int8_t* xp, const float* sx,
                     int64_t B, float* out, int64_t ld, int64_t o0, int64_t N) {
  alignas(64) int32_t c[4][16 * 16];
  for (int64_t t = 0; t * 16 < B; ++t) {
    const int8_t* x1 = xp + (t * 2) * nc * 1024;
    const int8_t* x2 = x1 + nc * 1024;
    _tile_zero(0);
    _tile_zero(1);
    if (R == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t ck = 0; ck < nc; ++ck) {
      if (t == 0)  // the tile loads read 16 * R rows side by side: fetch the next rows ahead, in order
        for (int i = 0; i < 16 * R; ++i) _mm_prefetch((const char*)w + 16 * R * ws + (ck * 16 * R + i) * 64, _MM_HINT_T1);
      _tile_loadd(6, x1 + ck * 1024, 64);
      _tile_loadd(7, x2 + ck * 1024, 64);
      _tile_loadd(4, w + ck * AMX_K, ws);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      if (R == 2) {
        _tile_loadd(5, w + 16 * ws + ck * AMX_K, ws);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    if (R == 2) {
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
    }
    // tile row i (weight row o) holds batch rows 16t.. side by side: scale them as one vector and
    // scatter it down column o of out (a scalar loop here cost a batch of 16 about 3 ms a step)
    const int64_t nbt = std::min<int64_t>(16, B - 16 * t);
    const __mmask16 live = (__mmask16)((1u << nbt) - 1);
    const __m512 vsx = _mm512_maskz_loadu_ps(live, sx + 16 * t);
    const __m512i down = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)ld));
    for (int rb = 0; rb < R; ++rb)
      for (int64_t i = 0; i < 16 && o0 + 16 * rb + i < N; ++i) {
        const int64_t o = o0 + 16 * rb + i;
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 * rb] + i * 16));
        const __m512 q2 = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 * rb + 1] + i * 16));
        const __m512 v = _mm512_mul_ps(_mm512_fmadd_ps(q1, _mm512_set1_ps(256.f), q2), _mm512_mul_ps(vsx, _mm512_set1_ps(sw[o])));
        _mm512_mask_i32scatter_ps(out + 16 * t * ld + o, live, down, v, 4);
      }
  }
}

}  // namespace

void amx_int8(const std::vector<AmxJob>& jobs, const AmxX& ax) {
  const int64_t Kp64 = ax.Kp64, nc = Kp64 / AMX_K, B = ax.B;
  std::vector<int64_t> full(jobs.size()), first(jobs.size() + 1, 0);  // blocks read in place; items
  for (size_t i = 0; i < jobs.size(); ++i) {
    const AmxJob& j = jobs[i];
    TORCH_CHECK(j.Kp <= Kp64 && Kp64 - j.Kp < AMX_K && 16 * j.ld < (int64_t(1) << 31), "amx_int8: shapes");
    full[i] = Kp64 == j.Kp ? j.N / 16 : (j.N - 1) / 16;
    first[i + 1] = first[i] + (full[i] + 1) / 2 + (16 * full[i] < j.N ? 1 : 0);
  }
  const int8_t* xp = ax.xp.data();
  const float* sx = ax.sx.data();
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    amx_configure();
    std::vector<int8_t> buf;
    size_t i = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first[i + 1]) ++i;
      const AmxJob& j = jobs[i];
      const int64_t p = item - first[i], npairs = (full[i] + 1) / 2;
      if (p < npairs) {
        const int64_t o0 = 32 * p;
        if (2 * p + 1 < full[i]) amx_rows<2>(j.w + o0 * j.Kp, j.Kp, j.sw, nc, xp, sx, B, j.out, j.ld, o0, j.N);
        else amx_rows<1>(j.w + o0 * j.Kp, j.Kp, j.sw, nc, xp, sx, B, j.out, j.ld, o0, j.N);
      } else {
        const int64_t o0 = 16 * full[i];
        buf.assign(16 * Kp64, 0);
        for (int64_t r = 0; o0 + r < j.N; ++r) std::memcpy(buf.data() + r * Kp64, j.w + (o0 + r) * j.Kp, j.Kp);
        amx_rows<1>(buf.data(), Kp64, j.sw, nc, xp, sx, B, j.out, j.ld, o0, j.N);
      }
    }
    _tile_release();
  });
}

}  // namespace llamarun
#endif  // LLAMARUN_AMX
