// Shared constants and the per-pixel alpha of a projected Gaussian (gsplat 1.4 conventions).
// Semantics: docs/quantile_rendering.md. Included by the CPU and the CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define QR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QR_HOST_DEVICE inline
#endif

// Hot CPU loops run through clones built for AVX2 + FMA and for baseline x86-64, picked once at
// load time by the CPU (GCC target_clones): one build is portable and still 8-wide.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define QR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define QR_CLONES
#endif
// Loops whose results must equal a reference's bit for bit: no a * b + c contracted to an FMA.
#define QR_NO_CONTRACT __attribute__((optimize("fp-contract=off")))

#ifndef __CUDACC__
// Asks for the cache lines of [p, p + bytes) ahead of use: the row-sparse loops read rows of gigabyte tables in
// an order the hardware prefetcher cannot guess, so the next row's lines are requested while this one computes.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}
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

#ifndef __CUDACC__
// exp(x) for x <= 0 from +, -, * and bit operations only (Cephes' range reduction and
// polynomial), written once for scalars and for GCC vectors: the CPU kernel's 8-pixel walk and
// its per-pixel paths then compute bit-identical alphas (same quantile picks), which libm's exp
// could not promise. x is clamped at the smallest normal power of two (-87 / -708): alphas
// below 1/255 are skipped anyway. Within 1 ulp of libm in float and in double (checked on a
// grid of 2e7 points over [-87, 0] and [-708, 0]).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // always inlined: no vector crosses a call
template <typename V, typename I, typename S, typename B>
inline __attribute__((always_inline)) V exp_nonpositive(V x) {
  constexpr bool is_float = sizeof(S) == 4;
  const S lowest = is_float ? S(-87) : S(-708);
  x = x < lowest ? V{} + lowest : x;
  // n = round(x / ln 2) by the magic-number trick; its integer is the sum's low mantissa bits
  const S magic = is_float ? S(12582912.0) : S(6755399441055744.0);  // 1.5 * 2^(mantissa bits)
  const V shifted = x * S(1.44269504088896341) + magic;
  const V n = shifted - magic;
  I n_int, magic_bits;
  std::memcpy(&n_int, &shifted, sizeof n_int);
  const V magic_v = V{} + magic;
  std::memcpy(&magic_bits, &magic_v, sizeof magic_bits);
  n_int -= magic_bits;
  V y;
  if constexpr (is_float) {
    const V r = x - n * S(0.693359375) - n * S(-2.12194440e-4);
    y = V{} + S(1.9875691500E-4);
    y = y * r + S(1.3981999507E-3);
    y = y * r + S(8.3334519073E-3);
    y = y * r + S(4.1665795894E-2);
    y = y * r + S(1.6666665459E-1);
    y = y * r + S(5.0000001201E-1);
    y = y * (r * r) + r + S(1);
  } else {
    const V r = x - n * S(6.93145751953125E-1) - n * S(1.42860682030941723212E-6);
    y = V{} + S(1.0 / 6227020800.0);  // Taylor to r^13: |r| <= 0.347, error < 1e-17
    const S inv_factorial[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                 1.0 / 362880.0,    1.0 / 40320.0,    1.0 / 5040.0,
                                 1.0 / 720.0,       1.0 / 120.0,      1.0 / 24.0,
                                 1.0 / 6.0,         0.5,              1.0,
                                 1.0};
    for (int k = 0; k < 13; ++k) y = y * r + inv_factorial[k];
  }
  const I exponent = (n_int + B(is_float ? 127 : 1023)) << B(is_float ? 23 : 52);
  V scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  return y * scale;
}
#pragma GCC diagnostic pop

inline float exp_nonpositive(float x) { return exp_nonpositive<float, int32_t, float, int32_t>(x); }
inline double exp_nonpositive(double x) {
  return exp_nonpositive<double, int64_t, double, int64_t>(x);
}
#endif

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
  r.vis = exp_nonpositive(-sigma);  // sigma < 0 is never used
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
