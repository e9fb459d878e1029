// Python bindings of the rasterizer kernels. Built as `qrender_cpu` (CPU only) or, with
// WITH_CUDA defined, as `qrender_cuda` (CPU + CUDA entry points).
#include <torch/extension.h>

#include "common.h"
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
#ifdef WITH_CUDA
  QRENDER_BIND(cuda)
#endif
}
