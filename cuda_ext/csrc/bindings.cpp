// Python bindings of the rasterizer kernels. Built as `qrender_cpu` (CPU only) or, with
// WITH_CUDA defined, as `qrender_cuda` (CPU + CUDA entry points).
#include <torch/extension.h>

#include "common.h"
#include "cpu/map_pool.h"
#include "rasterize.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("MAX_QUANTILES") = qrender::kMaxQuantiles;
#define QRENDER_BIND(SUFFIX)                                                        \
  m.def("rasterize_forward_" #SUFFIX, &qrender::rasterize_forward_##SUFFIX);               \
  m.def("rasterize_backward_" #SUFFIX, &qrender::rasterize_backward_##SUFFIX);             \
  m.def("rasterize_pixels_forward_" #SUFFIX, &qrender::rasterize_pixels_forward_##SUFFIX); \
  m.def("rasterize_pixels_backward_" #SUFFIX, &qrender::rasterize_pixels_backward_##SUFFIX); \
  m.def("rasterize_query_" #SUFFIX, &qrender::rasterize_query_##SUFFIX);
  QRENDER_BIND(cpu)
  m.def("project_rows_cpu", &qrender::project_rows_cpu,
        "[rows . units^T, |rows|] of rows [..., C] and units [Q, C], in one pass over the rows");
  m.def("row_sparse_adam_cpu", &qrender::row_sparse_adam_cpu,
        "Adam step of the touched rows only (qrender_ns/method/sparse_adam.py), in place");
  m.def("row_blend_forward_cpu", &qrender::row_blend_forward_cpu,
        "sum_k w[p, k] table[touched[slot[p, k]]] in float32, rows read in the table's dtype");
  m.def("row_blend_backward_cpu", &qrender::row_blend_backward_cpu,
        "(gradient of the touched rows in the table's dtype, gradient of the weights)");
  m.def("release_recycled_maps", &qrender::release_recycled_maps,
        "Return the CPU kernel's idle output maps to the OS; returns the bytes released");
  m.def("recycled_idle_bytes", &qrender::recycled_idle_bytes);
  m.def("recycled_budget_bytes", &qrender::recycled_budget_bytes);
#ifdef WITH_CUDA
  QRENDER_BIND(cuda)
#endif
}
