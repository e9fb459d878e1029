// Shared constants and the per-pixel alpha of a projected Gaussian (gsplat 1.4 conventions).
// Semantics: docs/quantile_rendering.md. Included by the CPU and the CUDA kernels.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define QR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QR_HOST_DEVICE inline
#endif

namespace qrender {

constexpr float kAlphaMax = 0.999f;
constexpr float kAlphaMin = 1.f / 255.f;
constexpr float kTransEps = 1e-4f;
constexpr int kMaxQuantiles = 128;

// Boundary k (1-based) of K quantile levels, in the working precision, as the reference does.
template <typename scalar_t>
QR_HOST_DEVICE scalar_t quantile_boundary(int k, int num_quantiles) {
  return scalar_t(1) - scalar_t(k) / scalar_t(num_quantiles + 1);
}

// Everything backward needs about one Gaussian at one pixel.
template <typename scalar_t>
struct PixelAlpha {
  scalar_t alpha;  // clamped alpha actually used
  scalar_t vis;    // exp(-sigma)
  scalar_t dx, dy;
  bool used;       // false: skipped (sigma < 0 or alpha < 1/255)
  bool clamped;    // o * exp(-sigma) > 0.999: no gradient
};

template <typename scalar_t>
QR_HOST_DEVICE PixelAlpha<scalar_t> pixel_alpha(const scalar_t* mean, const scalar_t* conic,
                                                 scalar_t opacity, scalar_t px, scalar_t py) {
  PixelAlpha<scalar_t> r;
  r.dx = mean[0] - px;
  r.dy = mean[1] - py;
  const scalar_t sigma = scalar_t(0.5) * (conic[0] * r.dx * r.dx + conic[2] * r.dy * r.dy) +
                         conic[1] * r.dx * r.dy;
#ifdef __CUDACC__
  r.vis = exp(-sigma);
#else
  r.vis = std::exp(-sigma);
#endif
  const scalar_t raw = opacity * r.vis;
  r.clamped = raw > scalar_t(kAlphaMax);
  r.alpha = r.clamped ? scalar_t(kAlphaMax) : raw;
  r.used = !(sigma < scalar_t(0)) && !(r.alpha < scalar_t(kAlphaMin));
  return r;
}

// dL/dalpha -> dL/d(mean2d, conic, opacity) for one Gaussian at one pixel.
template <typename scalar_t>
QR_HOST_DEVICE void alpha_backward(const PixelAlpha<scalar_t>& a, const scalar_t* conic,
                                   scalar_t opacity, scalar_t v_alpha, scalar_t* v_mean,
                                   scalar_t* v_conic, scalar_t* v_opacity) {
  if (a.clamped) {
    v_mean[0] = v_mean[1] = v_conic[0] = v_conic[1] = v_conic[2] = *v_opacity = scalar_t(0);
    return;
  }
  const scalar_t v_sigma = -opacity * a.vis * v_alpha;
  v_conic[0] = scalar_t(0.5) * v_sigma * a.dx * a.dx;
  v_conic[1] = v_sigma * a.dx * a.dy;
  v_conic[2] = scalar_t(0.5) * v_sigma * a.dy * a.dy;
  v_mean[0] = v_sigma * (conic[0] * a.dx + conic[1] * a.dy);
  v_mean[1] = v_sigma * (conic[1] * a.dx + conic[2] * a.dy);
  *v_opacity = a.vis * v_alpha;
}

}  // namespace qrender
