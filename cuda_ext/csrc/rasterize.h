// Declarations of the compiled rasterizer entry points (CPU always, CUDA with WITH_CUDA).
// Forward returns {features [V,H,W,C], alphas [V,H,W,1], last_ids [V,H,W] (dense: last used
// isect index, start-1 if none), sel_ids [V,H,W,K] (quantile: selected isect indices, -1
// padded), sel_count [V,H,W] (quantile: selected count; dense: number of blended
// Gaussians, reported by benchmarks)}. Backward returns {d_means2d, d_conics, d_features,
// d_opacities, d_backgrounds (undefined without backgrounds), d_means2d_abs (if absgrad)}.
// Inputs are validated in Python (qrender_ns/render/rasterize.py): contiguous, same dtype,
// int32 offsets/ids, num_quantiles 0 (dense) or 1..kMaxQuantiles.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace qrender {

#define QRENDER_FORWARD_ARGS                                                                 \
  const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &features,           \
      const at::Tensor &opacities, const c10::optional<at::Tensor> &backgrounds,              \
      int64_t width, int64_t height, int64_t tile_size, const at::Tensor &isect_offsets,     \
      const at::Tensor &flatten_ids, int64_t num_quantiles

#define QRENDER_BACKWARD_ARGS                                                                \
  QRENDER_FORWARD_ARGS, const at::Tensor &out_feat, const at::Tensor &out_alpha,             \
      const at::Tensor &last_ids, const at::Tensor &sel_ids, const at::Tensor &sel_count,    \
      const at::Tensor &grad_feat, const at::Tensor &grad_alpha, bool absgrad

// Sampled pixels: pixel_ids int64 [P], flat (camera, y, x) indices into V*H*W; every
// per-pixel tensor above is [P, ...] instead of [V, H, W, ...]. Same tiles, pixel centres and
// quantile selection as the whole image.
//
// Query space: units [Q, C] unit text embeddings T, proj [N, Q+1] or [V, N, Q+1] =
// [features . T^T, |features|], bg_proj [V, Q+1] = [backgrounds . T^T, |backgrounds|]; returns {scores [V,H,W,Q] = cos(F(p), t_q), alphas
// [V,H,W,1]} without a feature map (forward only).
#define QRENDER_DECLARE(SUFFIX)                                                              \
  std::vector<at::Tensor> rasterize_forward_##SUFFIX(QRENDER_FORWARD_ARGS);                 \
  std::vector<at::Tensor> rasterize_backward_##SUFFIX(QRENDER_BACKWARD_ARGS);               \
  std::vector<at::Tensor> rasterize_pixels_forward_##SUFFIX(QRENDER_FORWARD_ARGS,           \
                                                            const at::Tensor &pixel_ids);   \
  std::vector<at::Tensor> rasterize_pixels_backward_##SUFFIX(QRENDER_BACKWARD_ARGS,         \
                                                             const at::Tensor &pixel_ids);  \
  std::vector<at::Tensor> rasterize_query_##SUFFIX(QRENDER_FORWARD_ARGS,                    \
                                                   const at::Tensor &units,                 \
                                                   const at::Tensor &proj,                  \
                                                   const c10::optional<at::Tensor> &bg_proj);

QRENDER_DECLARE(cpu)

// The proj of the query space on the CPU in one pass over rows [..., C]: [..., Q + 1] =
// [rows . units^T, |rows|] (each row read once, while a matmul and a norm read them twice).
at::Tensor project_rows_cpu(const at::Tensor &rows, const at::Tensor &units);
void row_sparse_adam_cpu(at::Tensor param, const at::Tensor &rows, const at::Tensor &grad, at::Tensor exp_avg,
                         at::Tensor exp_avg_sq, at::Tensor row_step, double lr, double beta1, double beta2,
                         double eps, bool stochastic, int64_t seed);
// The fused blend of a row-sparse sampled-pixel render and its backward (cpu/row_blend_cpu.cpp).
at::Tensor row_blend_forward_cpu(const at::Tensor &table, const at::Tensor &touched, const at::Tensor &slot,
                                 const at::Tensor &weights);
std::vector<at::Tensor> row_blend_backward_cpu(const at::Tensor &table, const at::Tensor &touched,
                                               const at::Tensor &slot, const at::Tensor &weights,
                                               const at::Tensor &grad_out, bool need_weights);

#ifdef WITH_CUDA
QRENDER_DECLARE(cuda)
#endif

}  // namespace qrender
