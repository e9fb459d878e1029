// Recycled pages for the CPU kernel's large outputs (a 640x480x512 float map is 630 MB).
//
// A fresh buffer of that size is mapped by the OS page by page on first write: on our 2-core
// VM the faults and the kernel's page zeroing cost 84 ms of a 284 ms quantile render, more
// than the blend itself. Freed maps are therefore kept (up to a byte budget) and handed out
// again for the next map of the same size: a viewer or an evaluation loop that renders, reads
// and drops maps pays the faults once. Like torch's CUDA caching allocator, memory stays
// reserved after the tensor dies, until release_recycled_maps() or a budget of 0.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace qrender {

// Outputs of at least this many bytes are recycled; smaller ones come from at::empty (the C
// allocator keeps those in its heap anyway).
constexpr int64_t kRecycledMinBytes = int64_t(32) << 20;

// at::empty(shape, opts) for CPU outputs, with the pages of a freed map of the same byte size
// when one is idle. Contents are undefined (the caller writes every element).
at::Tensor empty_recycled(at::IntArrayRef shape, const at::TensorOptions& opts);

// Returns the idle maps to the OS; returns the number of bytes released.
int64_t release_recycled_maps();

// Bytes held idle for reuse now, and the budget (QSPLAT_MAP_CACHE_MB, default 1024).
int64_t recycled_idle_bytes();
int64_t recycled_budget_bytes();

}  // namespace qrender
