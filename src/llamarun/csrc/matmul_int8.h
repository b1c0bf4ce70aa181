// int8 weights on the AVX2/VNNI loop (matmul_int8.cpp), for the int8_linear op and the Decoder.
#pragma once

#include "common.h"

namespace llamarun {

// weight rows [lo, hi) of an int8 matrix against all B activation rows
void int8_range(const int8_t* w, const float* sw, int64_t G, int64_t Kp, const int8_t* xq, const float* dx,
                const float* xcb, const float* xc, int64_t B, float* out, int64_t N, int64_t lo, int64_t hi);

}  // namespace llamarun
