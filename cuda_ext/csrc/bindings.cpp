// Python bindings of the rasterizer kernels. Built as `qrender_cpu` (CPU only) or, with
// WITH_CUDA defined, as `qrender_cuda` (CPU + CUDA entry points).
#include <torch/extension.h>

#include "common.h"
#include "rasterize.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("MAX_QUANTILES") = qrender::kMaxQuantiles;
  m.def("rasterize_forward_cpu", &qrender::rasterize_forward_cpu);
  m.def("rasterize_backward_cpu", &qrender::rasterize_backward_cpu);
#ifdef WITH_CUDA
  m.def("rasterize_forward_cuda", &qrender::rasterize_forward_cuda);
  m.def("rasterize_backward_cuda", &qrender::rasterize_backward_cuda);
#endif
}
