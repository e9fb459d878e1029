// bfloat16 rows <-> float32 rows, vectorised (defined in sparse_adam_cpu.cpp; used by the row-sparse Adam step
// and the fused row blend).
#pragma once

#include <cstdint>

namespace qrender {

// out[i] = float(in[i]) (exact)
void widen_bf16(float* __restrict out, const uint16_t* __restrict in, int64_t c);
// out[i] = bfloat16(in[i]), round to nearest even as c10::BFloat16 (NaN -> 0x7fc0)
void narrow_bf16_rne(uint16_t* __restrict out, const float* __restrict in, int64_t c);

}  // namespace qrender
