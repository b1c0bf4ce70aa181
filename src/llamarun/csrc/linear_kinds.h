// The kinds of linear a Decoder takes, one code per linear (its `kinds` argument).
#pragma once

#include <cstdint>

namespace llamarun {

enum LinKind : int64_t { LIN_NONE = 0, LIN_F32 = 1, LIN_INT8 = 2, LIN_Q4 = 3, LIN_SKIP = 4 };


}  // namespace llamarun
