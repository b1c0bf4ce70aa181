// The kinds of linear a Decoder takes, one code per linear (its `kinds` argument). Defined here
// only: cpu_kernels.linear_kinds() reads the names and codes through the linear_kinds op.
#pragma once

#include <cstdint>

namespace llamarun {

enum LinKind : int64_t { LIN_NONE = 0, LIN_F32 = 1, LIN_INT8 = 2, LIN_Q4 = 3, LIN_GGUF = 4, LIN_SKIP = 5 };

// the names of the kinds Python passes, indexed by code (LIN_SKIP is the Decoder's own mark of a
// linear whose columns are already done, never passed)
constexpr const char* kLinKindNames[LIN_SKIP] = {"NONE", "F32", "INT8", "Q4", "GGUF"};
static_assert(kLinKindNames[LIN_SKIP - 1] != nullptr, "a name for every kind");

}  // namespace llamarun
