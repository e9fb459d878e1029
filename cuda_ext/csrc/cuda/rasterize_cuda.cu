// CUDA rasterizer: dense and quantile feature blending, forward and backward.
// One block per (camera, tile), one thread per pixel; the tile's Gaussians are staged in shared
// memory in batches, as gsplat does. Semantics: docs/quantile_rendering.md; the CPU kernel
// (cpu/rasterize_cpu.cpp) is the spec this file must match output for output.
#include <ATen/Dispatch.h>
// c10 rather than ATen/cuda/CUDAContext.h (= at::cuda::getCurrentCUDAStream): the latter
// pulls in cuSPARSE/cuBLAS headers, which minimal CUDA toolkits do not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "../rasterize.h"

namespace qrender {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// Channels held in registers per pass over the Gaussians (dense forward, quantile blending):
// 32 floats or 16 doubles: the accumulator stays in registers without spilling.
template <typename scalar_t>
constexpr int chunk_size() {
  return sizeof(scalar_t) == 8 ? 16 : 32;
}

template <typename scalar_t>
struct Params {
  const scalar_t *means2d, *conics, *features, *opacities, *backgrounds;  // backgrounds may be null
  const int32_t *offsets, *flatten_ids;
  int64_t num_gs, channels, num_isects;
  int width, height, tile_size, tiles_w, tiles_h, num_cams;
  int num_quantiles;  // 0: dense
  bool feat_per_cam;

  __device__ int64_t feature_row(int32_t flat_id) const {
    return feat_per_cam ? int64_t(flat_id) : int64_t(flat_id) % num_gs;
  }
  __device__ const scalar_t* feature(int32_t flat_id) const {
    return features + feature_row(flat_id) * channels;
  }
  __device__ const scalar_t* background(int cam) const {
    return backgrounds ? backgrounds + int64_t(cam) * channels : nullptr;
  }
};

// The pixel of this thread and the isect range of its tile. Blocks are 1-D with the tile's
// tile_size^2 threads rounded up to whole warps (warp shuffles in the backward need full
// warps); the extra threads, and those past the image border, only help load and sync.
template <typename scalar_t>
struct Pixel {
  int64_t pix;  // flat (cam, y, x) index; only meaningful when inside
  int64_t start, end;
  scalar_t px, py;
  int cam;
  bool inside;
};

template <typename scalar_t>
__device__ Pixel<scalar_t> this_pixel(const Params<scalar_t>& p) {
  Pixel<scalar_t> r;
  r.cam = blockIdx.z;
  const int tid = threadIdx.x;
  const int ly = tid / p.tile_size, lx = tid % p.tile_size;
  const int x = blockIdx.x * p.tile_size + lx, y = blockIdx.y * p.tile_size + ly;
  r.inside = ly < p.tile_size && x < p.width && y < p.height;
  r.pix = r.inside ? (int64_t(r.cam) * p.height + y) * p.width + x : 0;
  r.px = scalar_t(x) + scalar_t(0.5);
  r.py = scalar_t(y) + scalar_t(0.5);
  const int64_t tile = (int64_t(r.cam) * p.tiles_h + blockIdx.y) * p.tiles_w + blockIdx.x;
  const int64_t total_tiles = int64_t(p.num_cams) * p.tiles_h * p.tiles_w;
  r.start = p.offsets[tile];
  r.end = tile + 1 < total_tiles ? int64_t(p.offsets[tile + 1]) : p.num_isects;
  return r;
}

// One batch of the tile's Gaussians in (dynamic) shared memory, one slot per thread.
template <typename scalar_t>
struct SharedGaussians {
  scalar_t* mean;   // [n, 2]
  scalar_t* conic;  // [n, 3]
  scalar_t* opac;   // [n]
  int32_t* id;      // [n] flat Gaussian index

  static size_t bytes(int n) { return size_t(n) * (6 * sizeof(scalar_t) + sizeof(int32_t)); }

  __device__ static SharedGaussians carve(int n) {
    // Untyped so that the float and double instantiations can share the declaration.
    extern __shared__ __align__(16) unsigned char smem[];
    SharedGaussians s;
    s.mean = reinterpret_cast<scalar_t*>(smem);
    s.conic = s.mean + 2 * n;
    s.opac = s.conic + 3 * n;
    s.id = reinterpret_cast<int32_t*>(s.opac + n);
    return s;
  }

  // Thread `slot` stages isect entry i (if it exists) for the whole block.
  __device__ void load(const Params<scalar_t>& p, int slot, int64_t i, int64_t end) {
    if (i >= end) return;
    const int32_t g = p.flatten_ids[i];
    id[slot] = g;
    mean[2 * slot] = p.means2d[2 * int64_t(g)];
    mean[2 * slot + 1] = p.means2d[2 * int64_t(g) + 1];
    for (int k = 0; k < 3; ++k) conic[3 * slot + k] = p.conics[3 * int64_t(g) + k];
    opac[slot] = p.opacities[g];
  }

  __device__ PixelAlpha<scalar_t> alpha_at(int slot, scalar_t px, scalar_t py) const {
    return pixel_alpha(mean + 2 * slot, conic + 3 * slot, opac[slot], px, py);
  }
};

// Walks the tile's Gaussians front to back and calls visit(isect index, flat id, alpha) for
// every Gaussian that is used at this pixel (skip rule of pixel_alpha) until visit returns
// true. Must be called by every thread of the block (it syncs); `done` starts true for
// threads without a pixel. The block leaves as soon as all its pixels are done.
template <typename scalar_t, typename Visit>
__device__ void walk_front_to_back(const Params<scalar_t>& p, const Pixel<scalar_t>& px,
                                   bool done, Visit&& visit) {
  const int n_threads = blockDim.x;
  SharedGaussians<scalar_t> s = SharedGaussians<scalar_t>::carve(n_threads);
  for (int64_t b = px.start; b < px.end; b += n_threads) {
    // Also keeps the previous batch (or the previous walk's) alive until everyone is past it.
    if (__syncthreads_count(done) == n_threads) break;
    s.load(p, threadIdx.x, b + threadIdx.x, px.end);
    __syncthreads();
    const int n = static_cast<int>(min(int64_t(n_threads), px.end - b));
    for (int j = 0; j < n && !done; ++j) {
      const PixelAlpha<scalar_t> a = s.alpha_at(j, px.px, px.py);
      if (!a.used) continue;
      done = visit(b + j, s.id[j], a);
    }
  }
}

// acc[k] += w * f[k] for the channels of this chunk that exist (k compile-time: registers).
template <typename scalar_t, int CHUNK>
__device__ __forceinline__ void accumulate_chunk(scalar_t (&acc)[CHUNK], scalar_t w,
                                                 const scalar_t* f, int64_t n) {
#pragma unroll
  for (int k = 0; k < CHUNK; ++k)
    if (k < n) acc[k] += w * f[k];
}

// ------------------------------------------------------------------------------- forward
template <typename scalar_t>
__global__ void forward_dense_kernel(Params<scalar_t> p, scalar_t* __restrict__ out_feat,
                                     scalar_t* __restrict__ out_alpha,
                                     int32_t* __restrict__ last_ids,
                                     int32_t* __restrict__ blended) {
  constexpr int CHUNK = chunk_size<scalar_t>();
  const Pixel<scalar_t> px = this_pixel(p);
  const int64_t C = p.channels;
  const scalar_t* bg = p.background(px.cam);
  // Re-walk the list once per channel chunk: recomputing alphas is cheaper than keeping a
  // C-sized accumulator per thread. trans / last / count come out identical from every walk.
  // At least one walk even for C == 0 so that alpha, last_ids and the count are written.
  for (int64_t c0 = 0; c0 == 0 || c0 < C; c0 += CHUNK) {
    const int64_t n = min(int64_t(CHUNK), C - c0);
    scalar_t acc[CHUNK];
#pragma unroll
    for (int k = 0; k < CHUNK; ++k) acc[k] = scalar_t(0);
    scalar_t trans = 1;
    int64_t last = px.start - 1;
    int count = 0;
    walk_front_to_back(p, px, !px.inside,
                       [&](int64_t i, int32_t g, const PixelAlpha<scalar_t>& a) -> bool {
                         const scalar_t next_trans = trans * (1 - a.alpha);
                         if (next_trans <= scalar_t(kTransEps)) return true;  // gsplat's stop
                         accumulate_chunk(acc, a.alpha * trans, p.feature(g) + c0, n);
                         trans = next_trans;
                         last = i;
                         ++count;
                         return false;
                       });
    if (!px.inside) continue;
    scalar_t* out = out_feat + px.pix * C + c0;
#pragma unroll
    for (int k = 0; k < CHUNK; ++k)
      if (k < n) out[k] = bg ? acc[k] + trans * bg[c0 + k] : acc[k];
    if (c0 == 0) {
      out_alpha[px.pix] = 1 - trans;
      last_ids[px.pix] = static_cast<int32_t>(last);
      blended[px.pix] = count;  // sel_count in dense mode: number of blended Gaussians
    }
  }
}

template <typename scalar_t>
__global__ void forward_quantile_kernel(Params<scalar_t> p, scalar_t* __restrict__ out_feat,
                                        scalar_t* __restrict__ out_alpha,
                                        int32_t* __restrict__ sel_ids,
                                        int32_t* __restrict__ sel_count) {
  constexpr int CHUNK = chunk_size<scalar_t>();
  const Pixel<scalar_t> px = this_pixel(p);
  const int64_t C = p.channels;
  const int K = p.num_quantiles;
  int32_t* sel = sel_ids + px.pix * K;

  // Pass 1, alphas only: pick the <= K quantile Gaussians (isect index to global memory for
  // the backward, flat id and blending weight kept locally for pass 2).
  scalar_t sel_w[kMaxQuantiles];
  int32_t sel_g[kMaxQuantiles];
  scalar_t trans = 1, trans_q = 1;
  int next_level = 1, count = 0;
  walk_front_to_back(p, px, !px.inside,
                     [&](int64_t i, int32_t g, const PixelAlpha<scalar_t>& a) -> bool {
                       const scalar_t next_trans = trans * (1 - a.alpha);
                       if (next_trans < quantile_boundary<scalar_t>(next_level, K)) {
                         sel_w[count] = a.alpha * trans_q;
                         sel_g[count] = g;
                         sel[count] = static_cast<int32_t>(i);
                         ++count;  // <= K: every selection crosses at least one boundary
                         trans_q *= 1 - a.alpha;
                         while (next_level <= K &&
                                next_trans < quantile_boundary<scalar_t>(next_level, K))
                           ++next_level;
                         if (next_level > K) return true;  // last boundary crossed
                       }
                       trans = next_trans;
                       return false;
                     });
  if (!px.inside) return;  // no block-wide syncs below
  sel_count[px.pix] = count;
  for (int j = count; j < K; ++j) sel[j] = -1;

  // Pass 2: blend only the selected feature rows, chunk by chunk, normalised by 1 - T_Q.
  scalar_t* out = out_feat + px.pix * C;
  if (count == 0) {
    const scalar_t* bg = p.background(px.cam);
    for (int64_t c = 0; c < C; ++c) out[c] = bg ? bg[c] : scalar_t(0);
    out_alpha[px.pix] = 0;
    return;
  }
  const scalar_t norm = 1 - trans_q;
  for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
    const int64_t n = min(int64_t(CHUNK), C - c0);
    scalar_t acc[CHUNK];
#pragma unroll
    for (int k = 0; k < CHUNK; ++k) acc[k] = scalar_t(0);
    for (int j = 0; j < count; ++j) accumulate_chunk(acc, sel_w[j], p.feature(sel_g[j]) + c0, n);
#pragma unroll
    for (int k = 0; k < CHUNK; ++k)
      if (k < n) out[c0 + k] = acc[k] / norm;
  }
  out_alpha[px.pix] = norm;
}

// ------------------------------------------------------------------------------ backward
template <typename scalar_t>
struct Grads {
  // means2d_abs (absgrad) and backgrounds may be null.
  scalar_t *means2d, *means2d_abs, *conics, *features, *opacities, *backgrounds;
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t s = 0;
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

// dst[c] += sum over the warp's lanes of (valid ? w * row[c] : 0), for c < C. All lanes of
// the warp must call it together (same dst). Reduced with shuffles first so that the warp
// issues one coalesced atomic per 32 channels instead of one atomic per lane and channel.
template <typename scalar_t>
__device__ void warp_add_rows(scalar_t* dst, bool valid, scalar_t w, const scalar_t* row,
                              int64_t C) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t c0 = 0; c0 < C; c0 += kWarpSize) {
    const int n = static_cast<int>(min(int64_t(kWarpSize), C - c0));
    scalar_t mine = 0;
    for (int k = 0; k < n; ++k) {
      scalar_t v = 0;
      if (valid) v = w * row[c0 + k];
      v = warp_sum(v);
      if (lane == k) mine = v;
    }
    if (lane < n) atomicAdd(dst + c0 + lane, mine);
  }
}

// Gradients of one Gaussian at one pixel into means2d / conics / opacities (and |means2d|).
// Warp-wide variant: all lanes hold the same Gaussian g, lanes with !valid contribute 0.
template <typename scalar_t>
__device__ void warp_add_geometry(const Grads<scalar_t>& grads, int32_t g, bool valid,
                                  const PixelAlpha<scalar_t>& a, const scalar_t* conic,
                                  scalar_t opacity, scalar_t v_alpha) {
  scalar_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // mean xy, conic abc, opacity, |mean| xy
  if (valid) {
    alpha_backward(a, conic, opacity, v_alpha, v, v + 2, v + 5);
    v[6] = fabs(v[0]);
    v[7] = fabs(v[1]);
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = warp_sum(v[k]);
  if (threadIdx.x % kWarpSize != 0) return;
  const int64_t gi = g;
  atomicAdd(grads.means2d + 2 * gi, v[0]);
  atomicAdd(grads.means2d + 2 * gi + 1, v[1]);
  for (int k = 0; k < 3; ++k) atomicAdd(grads.conics + 3 * gi + k, v[2 + k]);
  atomicAdd(grads.opacities + gi, v[5]);
  if (grads.means2d_abs) {
    atomicAdd(grads.means2d_abs + 2 * gi, v[6]);
    atomicAdd(grads.means2d_abs + 2 * gi + 1, v[7]);
  }
}

// Per-thread variant (quantile mode: every pixel has its own selected Gaussians).
template <typename scalar_t>
__device__ void add_gaussian(const Params<scalar_t>& p, const Grads<scalar_t>& grads, int32_t g,
                             const PixelAlpha<scalar_t>& a, scalar_t v_alpha, scalar_t w,
                             const scalar_t* g_out) {
  const int64_t gi = g, C = p.channels;
  scalar_t* gf = grads.features + p.feature_row(g) * C;
  for (int64_t c = 0; c < C; ++c) atomicAdd(gf + c, w * g_out[c]);
  scalar_t v_mean[2], v_conic[3], v_opac;
  alpha_backward(a, p.conics + 3 * gi, p.opacities[gi], v_alpha, v_mean, v_conic, &v_opac);
  atomicAdd(grads.means2d + 2 * gi, v_mean[0]);
  atomicAdd(grads.means2d + 2 * gi + 1, v_mean[1]);
  if (grads.means2d_abs) {
    atomicAdd(grads.means2d_abs + 2 * gi, fabs(v_mean[0]));
    atomicAdd(grads.means2d_abs + 2 * gi + 1, fabs(v_mean[1]));
  }
  for (int k = 0; k < 3; ++k) atomicAdd(grads.conics + 3 * gi + k, v_conic[k]);
  atomicAdd(grads.opacities + gi, v_opac);
}

template <typename scalar_t>
__global__ void backward_dense_kernel(Params<scalar_t> p, const scalar_t* __restrict__ out_alpha,
                                      const int32_t* __restrict__ last_ids,
                                      const scalar_t* __restrict__ grad_feat,
                                      const scalar_t* __restrict__ grad_alpha,
                                      Grads<scalar_t> grads) {
  const Pixel<scalar_t> px = this_pixel(p);
  const int64_t C = p.channels;
  const scalar_t* bg = p.background(px.cam);
  const scalar_t* g_out = grad_feat + px.pix * C;
  const scalar_t t_final = px.inside ? 1 - out_alpha[px.pix] : scalar_t(0);
  scalar_t v_final = px.inside ? grad_alpha[px.pix] : scalar_t(0);  // dL/d(1 - T_final) - bg.g
  if (bg) {
    if (px.inside) v_final -= dot(bg, g_out, C);
    warp_add_rows(grads.backgrounds + int64_t(px.cam) * C, px.inside, t_final, g_out, C);
  }
  const int64_t my_last = px.inside ? int64_t(last_ids[px.pix]) : px.start - 1;

  // The block only needs the isect entries up to its largest last_id.
  __shared__ int block_last;
  if (threadIdx.x == 0) block_last = static_cast<int>(px.start - 1);
  __syncthreads();
  if (px.inside) atomicMax(&block_last, static_cast<int>(my_last));
  __syncthreads();
  const int64_t last_max = block_last;

  const int n_threads = blockDim.x;
  SharedGaussians<scalar_t> s = SharedGaussians<scalar_t>::carve(n_threads);
  scalar_t trans = t_final, behind = 0;  // behind = sum_{l>i} w_l (f_l . g)
  // Back to front in batches; j runs the same way in every lane, so each warp handles one
  // Gaussian at a time and can reduce its gradients with shuffles before the atomics.
  for (int64_t b_end = last_max + 1; b_end > px.start;) {
    const int64_t b_begin = max(px.start, b_end - n_threads);
    __syncthreads();  // everyone is done with the previous batch
    s.load(p, threadIdx.x, b_begin + threadIdx.x, b_end);
    __syncthreads();
    for (int j = static_cast<int>(b_end - b_begin) - 1; j >= 0; --j) {
      const int64_t i = b_begin + j;
      const PixelAlpha<scalar_t> a = s.alpha_at(j, px.px, px.py);
      const bool valid = i <= my_last && a.used;
      if (!__any_sync(kFullMask, valid)) continue;
      const int32_t g = s.id[j];
      const scalar_t* f = p.feature(g);
      scalar_t w = 0, v_alpha = 0;
      if (valid) {
        const scalar_t ra = 1 / (1 - a.alpha);
        trans *= ra;  // transmittance before Gaussian i
        w = a.alpha * trans;
        const scalar_t fg = dot(f, g_out, C);
        v_alpha = trans * fg - behind * ra + t_final * ra * v_final;
        behind += w * fg;
      }
      warp_add_rows(grads.features + p.feature_row(g) * C, valid, w, g_out, C);
      warp_add_geometry(grads, g, valid, a, s.conic + 3 * j, s.opac[j], v_alpha);
    }
    b_end = b_begin;
  }
}

template <typename scalar_t>
__global__ void backward_quantile_kernel(Params<scalar_t> p, const scalar_t* __restrict__ out_feat,
                                         const int32_t* __restrict__ sel_ids,
                                         const int32_t* __restrict__ sel_count,
                                         const scalar_t* __restrict__ grad_feat,
                                         const scalar_t* __restrict__ grad_alpha,
                                         Grads<scalar_t> grads) {
  const Pixel<scalar_t> px = this_pixel(p);
  const int64_t C = p.channels;
  const int K = p.num_quantiles;
  const scalar_t* g_out = grad_feat + px.pix * C;
  const int count = px.inside ? sel_count[px.pix] : 0;
  // Empty pixels showed the background: pass g to it (warp-reduced, all lanes take part).
  if (grads.backgrounds)
    warp_add_rows(grads.backgrounds + int64_t(px.cam) * C, px.inside && count == 0,
                  scalar_t(1), g_out, C);
  if (!px.inside || count == 0) return;

  // Selected-subset transmittance before each selected Gaussian, front to back.
  const int32_t* sel = sel_ids + px.pix * K;
  scalar_t sel_trans[kMaxQuantiles];
  scalar_t trans_q = 1;
  for (int j = 0; j < count; ++j) {
    const int64_t g = p.flatten_ids[sel[j]];
    const scalar_t alpha =
        pixel_alpha(p.means2d + 2 * g, p.conics + 3 * g, p.opacities[g], px.px, px.py).alpha;
    sel_trans[j] = trans_q;
    trans_q *= 1 - alpha;
  }
  const scalar_t norm = 1 - trans_q;
  const scalar_t v_norm = grad_alpha[px.pix] - dot(g_out, out_feat + px.pix * C, C) / norm;
  scalar_t behind = 0;
  for (int j = count - 1; j >= 0; --j) {
    const int32_t g = p.flatten_ids[sel[j]];
    const int64_t gi = g;
    const PixelAlpha<scalar_t> a =
        pixel_alpha(p.means2d + 2 * gi, p.conics + 3 * gi, p.opacities[gi], px.px, px.py);
    const scalar_t ra = 1 / (1 - a.alpha);
    const scalar_t w = a.alpha * sel_trans[j];
    const scalar_t fg = dot(p.feature(g), g_out, C);
    const scalar_t v_alpha = (sel_trans[j] * fg - behind * ra) / norm + trans_q * ra * v_norm;
    behind += w * fg;
    add_gaussian(p, grads, g, a, v_alpha, w / norm, g_out);
  }
}

// ------------------------------------------------------------------------ sampled pixels
// One thread per sampled pixel (pixel_ids: flat (camera, y, x)); the tile list is read from
// global memory (a tile holds a few samples, staging it in shared memory would not pay).
// Same tile, pixel centre, skip rule and selection as the whole-image kernels above.
template <typename scalar_t>
__device__ Pixel<scalar_t> sampled_pixel(const Params<scalar_t>& p, int64_t pid) {
  Pixel<scalar_t> r;
  const int64_t hw = int64_t(p.height) * p.width;
  r.cam = static_cast<int>(pid / hw);
  const int y = static_cast<int>((pid % hw) / p.width), x = static_cast<int>(pid % p.width);
  r.inside = true;
  r.pix = pid;
  r.px = scalar_t(x) + scalar_t(0.5);
  r.py = scalar_t(y) + scalar_t(0.5);
  const int64_t tile =
      (int64_t(r.cam) * p.tiles_h + y / p.tile_size) * p.tiles_w + x / p.tile_size;
  const int64_t total_tiles = int64_t(p.num_cams) * p.tiles_h * p.tiles_w;
  r.start = p.offsets[tile];
  r.end = tile + 1 < total_tiles ? int64_t(p.offsets[tile + 1]) : p.num_isects;
  return r;
}

template <typename scalar_t>
__device__ __forceinline__ PixelAlpha<scalar_t> direct_alpha(const Params<scalar_t>& p, int32_t g,
                                                             const Pixel<scalar_t>& px) {
  const int64_t gi = g;
  return pixel_alpha(p.means2d + 2 * gi, p.conics + 3 * gi, p.opacities[gi], px.px, px.py);
}

// Quantile pass 1 over global memory: selected isect indices, flat ids and weights (not yet
// normalised); returns the count and T_Q.
template <typename scalar_t>
__device__ int select_quantiles_direct(const Params<scalar_t>& p, const Pixel<scalar_t>& px,
                                       int32_t* sel, int32_t* sel_g, scalar_t* sel_w,
                                       scalar_t* trans_q_out) {
  const int K = p.num_quantiles;
  scalar_t trans = 1, trans_q = 1;
  int next_level = 1, count = 0;
  for (int64_t i = px.start; i < px.end; ++i) {
    const int32_t g = p.flatten_ids[i];
    const PixelAlpha<scalar_t> a = direct_alpha(p, g, px);
    if (!a.used) continue;
    const scalar_t next_trans = trans * (1 - a.alpha);
    if (next_trans < quantile_boundary<scalar_t>(next_level, K)) {
      sel_w[count] = a.alpha * trans_q;
      sel_g[count] = g;
      sel[count] = static_cast<int32_t>(i);
      ++count;
      trans_q *= 1 - a.alpha;
      while (next_level <= K && next_trans < quantile_boundary<scalar_t>(next_level, K))
        ++next_level;
      if (next_level > K) break;
    }
    trans = next_trans;
  }
  for (int j = count; j < K; ++j) sel[j] = -1;
  *trans_q_out = trans_q;
  return count;
}

template <typename scalar_t>
__global__ void forward_pixels_kernel(Params<scalar_t> p, const int64_t* __restrict__ pixel_ids,
                                      int64_t num_pixels, scalar_t* __restrict__ out_feat,
                                      scalar_t* __restrict__ out_alpha,
                                      int32_t* __restrict__ last_ids,
                                      int32_t* __restrict__ sel_ids,
                                      int32_t* __restrict__ sel_count) {
  constexpr int CHUNK = chunk_size<scalar_t>();
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= num_pixels) return;
  const Pixel<scalar_t> px = sampled_pixel(p, pixel_ids[s]);
  const int64_t C = p.channels;
  const int K = p.num_quantiles;
  const scalar_t* bg = p.background(px.cam);
  scalar_t* out = out_feat + s * C;
  if (K == 0) {
    for (int64_t c0 = 0; c0 == 0 || c0 < C; c0 += CHUNK) {
      const int64_t n = min(int64_t(CHUNK), C - c0);
      scalar_t acc[CHUNK];
#pragma unroll
      for (int k = 0; k < CHUNK; ++k) acc[k] = scalar_t(0);
      scalar_t trans = 1;
      int64_t last = px.start - 1;
      int count = 0;
      for (int64_t i = px.start; i < px.end; ++i) {
        const int32_t g = p.flatten_ids[i];
        const PixelAlpha<scalar_t> a = direct_alpha(p, g, px);
        if (!a.used) continue;
        const scalar_t next_trans = trans * (1 - a.alpha);
        if (next_trans <= scalar_t(kTransEps)) break;
        accumulate_chunk(acc, a.alpha * trans, p.feature(g) + c0, n);
        trans = next_trans;
        last = i;
        ++count;
      }
#pragma unroll
      for (int k = 0; k < CHUNK; ++k)
        if (k < n) out[c0 + k] = bg ? acc[k] + trans * bg[c0 + k] : acc[k];
      if (c0 == 0) {
        out_alpha[s] = 1 - trans;
        last_ids[s] = static_cast<int32_t>(last);
        sel_count[s] = count;
      }
    }
    return;
  }
  scalar_t sel_w[kMaxQuantiles];
  int32_t sel_g[kMaxQuantiles];
  scalar_t trans_q;
  const int count = select_quantiles_direct(p, px, sel_ids + s * K, sel_g, sel_w, &trans_q);
  sel_count[s] = count;
  if (count == 0) {
    for (int64_t c = 0; c < C; ++c) out[c] = bg ? bg[c] : scalar_t(0);
    out_alpha[s] = 0;
    return;
  }
  const scalar_t norm = 1 - trans_q;
  for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
    const int64_t n = min(int64_t(CHUNK), C - c0);
    scalar_t acc[CHUNK];
#pragma unroll
    for (int k = 0; k < CHUNK; ++k) acc[k] = scalar_t(0);
    for (int j = 0; j < count; ++j) accumulate_chunk(acc, sel_w[j], p.feature(sel_g[j]) + c0, n);
#pragma unroll
    for (int k = 0; k < CHUNK; ++k)
      if (k < n) out[c0 + k] = acc[k] / norm;
  }
  out_alpha[s] = norm;
}

template <typename scalar_t>
__global__ void backward_pixels_kernel(Params<scalar_t> p, const int64_t* __restrict__ pixel_ids,
                                       int64_t num_pixels, const scalar_t* __restrict__ out_feat,
                                       const scalar_t* __restrict__ out_alpha,
                                       const int32_t* __restrict__ last_ids,
                                       const int32_t* __restrict__ sel_ids,
                                       const int32_t* __restrict__ sel_count,
                                       const scalar_t* __restrict__ grad_feat,
                                       const scalar_t* __restrict__ grad_alpha,
                                       Grads<scalar_t> grads) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= num_pixels) return;
  const Pixel<scalar_t> px = sampled_pixel(p, pixel_ids[s]);
  const int64_t C = p.channels;
  const int K = p.num_quantiles;
  const scalar_t* bg = p.background(px.cam);
  const scalar_t* g_out = grad_feat + s * C;
  if (K == 0) {
    const scalar_t t_final = 1 - out_alpha[s];
    scalar_t v_final = grad_alpha[s];
    if (bg) {
      v_final -= dot(bg, g_out, C);
      for (int64_t c = 0; c < C; ++c)
        atomicAdd(grads.backgrounds + int64_t(px.cam) * C + c, t_final * g_out[c]);
    }
    scalar_t trans = t_final, behind = 0;
    for (int64_t i = last_ids[s]; i >= px.start; --i) {
      const int32_t g = p.flatten_ids[i];
      const PixelAlpha<scalar_t> a = direct_alpha(p, g, px);
      if (!a.used) continue;
      const scalar_t ra = 1 / (1 - a.alpha);
      trans *= ra;
      const scalar_t w = a.alpha * trans;
      const scalar_t fg = dot(p.feature(g), g_out, C);
      const scalar_t v_alpha = trans * fg - behind * ra + t_final * ra * v_final;
      behind += w * fg;
      add_gaussian(p, grads, g, a, v_alpha, w, g_out);
    }
    return;
  }
  const int count = sel_count[s];
  if (count == 0) {
    if (grads.backgrounds)
      for (int64_t c = 0; c < C; ++c) atomicAdd(grads.backgrounds + int64_t(px.cam) * C + c, g_out[c]);
    return;
  }
  const int32_t* sel = sel_ids + s * K;
  scalar_t sel_trans[kMaxQuantiles];
  scalar_t trans_q = 1;
  for (int j = 0; j < count; ++j) {
    const scalar_t alpha = direct_alpha(p, p.flatten_ids[sel[j]], px).alpha;
    sel_trans[j] = trans_q;
    trans_q *= 1 - alpha;
  }
  const scalar_t norm = 1 - trans_q;
  const scalar_t v_norm = grad_alpha[s] - dot(g_out, out_feat + s * C, C) / norm;
  scalar_t behind = 0;
  for (int j = count - 1; j >= 0; --j) {
    const int32_t g = p.flatten_ids[sel[j]];
    const PixelAlpha<scalar_t> a = direct_alpha(p, g, px);
    const scalar_t ra = 1 / (1 - a.alpha);
    const scalar_t w = a.alpha * sel_trans[j];
    const scalar_t fg = dot(p.feature(g), g_out, C);
    const scalar_t v_alpha = (sel_trans[j] * fg - behind * ra) / norm + trans_q * ra * v_norm;
    behind += w * fg;
    add_gaussian(p, grads, g, a, v_alpha, w / norm, g_out);
  }
}

// ---------------------------------------------------------------------------- query space
// scores[q] = F(p) . t_q / max(|F(p)|, 1e-12) with F(p) . t_q = sum_i w_i proj[g_i, q]
// (+ T bg_proj[q]); |F(p)| from the blended row, chunk by chunk in registers. Where the rows
// cancel (sum_i |w_i| |f_i| > kCancel |F(p)|) the scores are F(p) . t_q from the row. As the CPU.
constexpr double kCancel = 16;

template <typename scalar_t>
struct QueryParams {
  const scalar_t *proj, *bg_proj;  // [N or V*N, Q + 1], [V, Q + 1] (may be null): G, then |f|
  const scalar_t* units;           // [Q, C]
  int64_t num_queries;
  bool per_cam;
  __device__ const scalar_t* row(const Params<scalar_t>& p, int32_t g) const {
    return proj + (per_cam ? int64_t(g) : int64_t(g) % p.num_gs) * (num_queries + 1);
  }
  __device__ const scalar_t* bg_row(int cam) const {
    return bg_proj ? bg_proj + int64_t(cam) * (num_queries + 1) : nullptr;
  }
};

// score[k] += acc . t_k over one channel chunk.
template <typename scalar_t, int CHUNK>
__device__ __forceinline__ void project_chunk(scalar_t* score, const scalar_t (&acc)[CHUNK],
                                              const QueryParams<scalar_t>& q, int64_t C,
                                              int64_t c0, int64_t n) {
  for (int64_t k = 0; k < q.num_queries; ++k) {
    const scalar_t* t = q.units + k * C + c0;
    scalar_t v = 0;
#pragma unroll
    for (int j = 0; j < CHUNK; ++j)
      if (j < n) v += acc[j] * t[j];
    score[k] += v;
  }
}

template <typename scalar_t>
__global__ void query_dense_kernel(Params<scalar_t> p, QueryParams<scalar_t> q,
                                   scalar_t* __restrict__ scores,
                                   scalar_t* __restrict__ out_alpha) {
  constexpr int CHUNK = chunk_size<scalar_t>();
  const Pixel<scalar_t> px = this_pixel(p);
  const int64_t C = p.channels, Q = q.num_queries;
  const scalar_t* bg = p.background(px.cam);
  const scalar_t* bgp = q.bg_row(px.cam);
  scalar_t* score = scores + px.pix * Q;
  if (px.inside)
    for (int64_t k = 0; k < Q; ++k) score[k] = 0;
  scalar_t length2 = 0, trans = 1, mass = 0;
  // direct = 0: scores from the projections (first walk) and |F|; direct = 1 (only where the
  // rows cancel): scores recomputed from the row. Every thread takes part in both walks.
  for (int direct = 0; direct < 2; ++direct) {
    if (direct) {
      const bool need = px.inside && mass > scalar_t(kCancel) * sqrt(length2);
      if (!__syncthreads_or(need)) break;
      if (need)
        for (int64_t k = 0; k < Q; ++k) score[k] = 0;
    }
    const bool need = !direct || (px.inside && mass > scalar_t(kCancel) * sqrt(length2));
    for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
      const int64_t n = min(int64_t(CHUNK), C - c0);
      scalar_t acc[CHUNK];
#pragma unroll
      for (int k = 0; k < CHUNK; ++k) acc[k] = scalar_t(0);
      trans = 1;
      walk_front_to_back(p, px, !px.inside,
                         [&](int64_t, int32_t g, const PixelAlpha<scalar_t>& a) -> bool {
                           const scalar_t next_trans = trans * (1 - a.alpha);
                           if (next_trans <= scalar_t(kTransEps)) return true;
                           const scalar_t w = a.alpha * trans;
                           accumulate_chunk(acc, w, p.feature(g) + c0, n);
                           if (!direct && c0 == 0) {
                             const scalar_t* r = q.row(p, g);
                             for (int64_t k = 0; k < Q; ++k) score[k] += w * r[k];
                             mass += w * r[Q];
                           }
                           trans = next_trans;
                           return false;
                         });
      if (!px.inside) continue;
#pragma unroll
      for (int k = 0; k < CHUNK; ++k)
        if (k < n && bg) acc[k] += trans * bg[c0 + k];
      if (!direct) {
#pragma unroll
        for (int k = 0; k < CHUNK; ++k)
          if (k < n) length2 += acc[k] * acc[k];
      } else if (need) {
        project_chunk(score, acc, q, C, c0, n);
      }
    }
    if (!direct && px.inside && bgp) {
      for (int64_t k = 0; k < Q; ++k) score[k] += trans * bgp[k];
      mass += trans * bgp[Q];
    }
  }
  if (!px.inside) return;
  const scalar_t inv = 1 / max(sqrt(length2), scalar_t(1e-12));
  for (int64_t k = 0; k < Q; ++k) score[k] *= inv;
  out_alpha[px.pix] = 1 - trans;
}

template <typename scalar_t>
__global__ void query_quantile_kernel(Params<scalar_t> p, QueryParams<scalar_t> q,
                                      scalar_t* __restrict__ scores,
                                      scalar_t* __restrict__ out_alpha) {
  constexpr int CHUNK = chunk_size<scalar_t>();
  const Pixel<scalar_t> px = this_pixel(p);
  const int64_t C = p.channels, Q = q.num_queries;
  const int K = p.num_quantiles;
  scalar_t sel_w[kMaxQuantiles];
  int32_t sel_g[kMaxQuantiles];
  scalar_t trans = 1, trans_q = 1;
  int next_level = 1, count = 0;
  walk_front_to_back(p, px, !px.inside,
                     [&](int64_t, int32_t g, const PixelAlpha<scalar_t>& a) -> bool {
                       const scalar_t next_trans = trans * (1 - a.alpha);
                       if (next_trans < quantile_boundary<scalar_t>(next_level, K)) {
                         sel_w[count] = a.alpha * trans_q;
                         sel_g[count] = g;
                         ++count;
                         trans_q *= 1 - a.alpha;
                         while (next_level <= K &&
                                next_trans < quantile_boundary<scalar_t>(next_level, K))
                           ++next_level;
                         if (next_level > K) return true;
                       }
                       trans = next_trans;
                       return false;
                     });
  if (!px.inside) return;  // no block-wide syncs below
  scalar_t* score = scores + px.pix * Q;
  if (count == 0) {  // the background (or zero) feature, a single row: no cancellation
    const scalar_t* bgp = q.bg_row(px.cam);
    const scalar_t inv = bgp ? 1 / max(bgp[Q], scalar_t(1e-12)) : scalar_t(0);
    for (int64_t k = 0; k < Q; ++k) score[k] = bgp ? bgp[k] * inv : scalar_t(0);
    out_alpha[px.pix] = 0;
    return;
  }
  const scalar_t norm = 1 - trans_q;
  scalar_t mass = 0;
  for (int j = 0; j < count; ++j) {
    sel_w[j] /= norm;
    mass += sel_w[j] * q.row(p, sel_g[j])[Q];
  }
  scalar_t length2 = 0;
  for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
    const int64_t n = min(int64_t(CHUNK), C - c0);
    scalar_t acc[CHUNK];
#pragma unroll
    for (int k = 0; k < CHUNK; ++k) acc[k] = scalar_t(0);
    for (int j = 0; j < count; ++j) accumulate_chunk(acc, sel_w[j], p.feature(sel_g[j]) + c0, n);
#pragma unroll
    for (int k = 0; k < CHUNK; ++k)
      if (k < n) length2 += acc[k] * acc[k];
  }
  const scalar_t length = sqrt(length2);
  const scalar_t inv = 1 / max(length, scalar_t(1e-12));
  if (mass > scalar_t(kCancel) * length) {
    for (int64_t k = 0; k < Q; ++k) score[k] = 0;
    for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
      const int64_t n = min(int64_t(CHUNK), C - c0);
      scalar_t acc[CHUNK];
#pragma unroll
      for (int k = 0; k < CHUNK; ++k) acc[k] = scalar_t(0);
      for (int j = 0; j < count; ++j) accumulate_chunk(acc, sel_w[j], p.feature(sel_g[j]) + c0, n);
      project_chunk(score, acc, q, C, c0, n);
    }
  } else {
    for (int64_t k = 0; k < Q; ++k) {
      scalar_t v = 0;
      for (int j = 0; j < count; ++j) v += sel_w[j] * q.row(p, sel_g[j])[k];
      score[k] = v;
    }
  }
  for (int64_t k = 0; k < Q; ++k) score[k] *= inv;
  out_alpha[px.pix] = norm;
}

// --------------------------------------------------------------------------------- host
template <typename scalar_t>
Params<scalar_t> make_params(const at::Tensor& means2d, const at::Tensor& conics,
                             const at::Tensor& features, const at::Tensor& opacities,
                             const c10::optional<at::Tensor>& backgrounds, int64_t width,
                             int64_t height, int64_t tile_size, const at::Tensor& isect_offsets,
                             const at::Tensor& flatten_ids, int64_t num_quantiles) {
  Params<scalar_t> p;
  p.means2d = means2d.data_ptr<scalar_t>();
  p.conics = conics.data_ptr<scalar_t>();
  p.features = features.data_ptr<scalar_t>();
  p.opacities = opacities.data_ptr<scalar_t>();
  p.backgrounds = backgrounds.has_value() ? backgrounds->data_ptr<scalar_t>() : nullptr;
  p.offsets = isect_offsets.data_ptr<int32_t>();
  p.flatten_ids = flatten_ids.data_ptr<int32_t>();
  p.num_gs = means2d.size(1);
  p.channels = features.size(-1);
  p.num_isects = flatten_ids.size(0);
  p.width = static_cast<int>(width);
  p.height = static_cast<int>(height);
  p.tile_size = static_cast<int>(tile_size);
  p.tiles_h = static_cast<int>(isect_offsets.size(1));
  p.tiles_w = static_cast<int>(isect_offsets.size(2));
  p.num_cams = static_cast<int>(means2d.size(0));
  p.num_quantiles = static_cast<int>(num_quantiles);
  p.feat_per_cam = features.dim() == 3;
  return p;
}

struct Launch {
  dim3 grid, block;
  size_t shmem;
  bool empty;  // nothing to launch
};

// Grid (tiles_w, tiles_h, V) of 1-D blocks of tile_size^2 threads rounded up to whole warps.
template <typename scalar_t, typename Kernel>
Launch make_launch(Kernel kernel, const Params<scalar_t>& p, bool uses_batches) {
  TORCH_CHECK(p.tile_size > 0, "tile_size must be positive, got ", p.tile_size);
  const int64_t pixels = int64_t(p.tile_size) * p.tile_size;
  const int64_t threads = (pixels + kWarpSize - 1) / kWarpSize * kWarpSize;
  Launch l;
  l.empty = int64_t(p.num_cams) * p.width * p.height == 0 ||
            int64_t(p.tiles_w) * p.tiles_h == 0;
  l.grid = dim3(p.tiles_w, p.tiles_h, p.num_cams);
  l.block = dim3(static_cast<unsigned>(threads));
  l.shmem = uses_batches ? SharedGaussians<scalar_t>::bytes(static_cast<int>(threads)) : 0;
  if (l.empty) return l;
  TORCH_CHECK(p.tiles_h <= 65535 && p.num_cams <= 65535,
              "rasterize_cuda: too many tile rows or cameras for one grid");
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  TORCH_CHECK(threads <= attr.maxThreadsPerBlock, "rasterize_cuda: tile_size ", p.tile_size,
              " needs ", threads, " threads per block, this kernel allows ",
              attr.maxThreadsPerBlock);
  if (l.shmem > 48 * 1024)  // e.g. tile_size 32 in double: opt in to the larger carve-out
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(l.shmem)));
  return l;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rasterize_cuda: `", name, "` must be a CUDA tensor");
}

}  // namespace

std::vector<at::Tensor> rasterize_forward_cuda(QRENDER_FORWARD_ARGS) {
  check_cuda(means2d, "means2d");
  check_cuda(conics, "conics");
  check_cuda(features, "features");
  check_cuda(opacities, "opacities");
  check_cuda(isect_offsets, "isect_offsets");
  check_cuda(flatten_ids, "flatten_ids");
  if (backgrounds.has_value()) check_cuda(*backgrounds, "backgrounds");
  TORCH_CHECK(num_quantiles >= 0 && num_quantiles <= kMaxQuantiles,
              "num_quantiles must be in 0..", kMaxQuantiles);
  const c10::cuda::OptionalCUDAGuard guard(device_of(means2d));
  const int64_t V = means2d.size(0), C = features.size(-1);
  auto opts = means2d.options();
  auto iopts = opts.dtype(at::kInt);
  // Same allocations as the CPU kernel (last_ids: dense only, sel_ids: quantile only).
  at::Tensor out_feat = at::empty({V, height, width, C}, opts);
  at::Tensor out_alpha = at::empty({V, height, width, 1}, opts);
  at::Tensor last_ids = at::empty({V, height, width}, iopts);
  at::Tensor sel_ids = at::empty({V, height, width, num_quantiles}, iopts);
  at::Tensor sel_count = at::empty({V, height, width}, iopts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_forward_cuda", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(means2d, conics, features, opacities,
                                                     backgrounds, width, height, tile_size,
                                                     isect_offsets, flatten_ids, num_quantiles);
    if (num_quantiles == 0) {
      const Launch l = make_launch(forward_dense_kernel<scalar_t>, p, true);
      if (l.empty) return;
      forward_dense_kernel<scalar_t><<<l.grid, l.block, l.shmem, stream>>>(
          p, out_feat.data_ptr<scalar_t>(), out_alpha.data_ptr<scalar_t>(),
          last_ids.data_ptr<int32_t>(), sel_count.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const Launch l = make_launch(forward_quantile_kernel<scalar_t>, p, true);
      if (l.empty) return;
      forward_quantile_kernel<scalar_t><<<l.grid, l.block, l.shmem, stream>>>(
          p, out_feat.data_ptr<scalar_t>(), out_alpha.data_ptr<scalar_t>(),
          sel_ids.data_ptr<int32_t>(), sel_count.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out_feat, out_alpha, last_ids, sel_ids, sel_count};
}

std::vector<at::Tensor> rasterize_backward_cuda(QRENDER_BACKWARD_ARGS) {
  check_cuda(means2d, "means2d");
  check_cuda(conics, "conics");
  check_cuda(features, "features");
  check_cuda(opacities, "opacities");
  check_cuda(isect_offsets, "isect_offsets");
  check_cuda(flatten_ids, "flatten_ids");
  check_cuda(out_feat, "out_feat");
  check_cuda(out_alpha, "out_alpha");
  check_cuda(last_ids, "last_ids");
  check_cuda(sel_ids, "sel_ids");
  check_cuda(sel_count, "sel_count");
  check_cuda(grad_feat, "grad_feat");
  check_cuda(grad_alpha, "grad_alpha");
  if (backgrounds.has_value()) check_cuda(*backgrounds, "backgrounds");
  TORCH_CHECK(num_quantiles >= 0 && num_quantiles <= kMaxQuantiles,
              "num_quantiles must be in 0..", kMaxQuantiles);
  const c10::cuda::OptionalCUDAGuard guard(device_of(means2d));
  at::Tensor g_means2d = at::zeros_like(means2d);
  at::Tensor g_means2d_abs = absgrad ? at::zeros_like(means2d) : at::Tensor();
  at::Tensor g_conics = at::zeros_like(conics);
  at::Tensor g_features = at::zeros_like(features);
  at::Tensor g_opacities = at::zeros_like(opacities);
  at::Tensor g_backgrounds =
      backgrounds.has_value() ? at::zeros_like(*backgrounds) : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_backward_cuda", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(means2d, conics, features, opacities,
                                                     backgrounds, width, height, tile_size,
                                                     isect_offsets, flatten_ids, num_quantiles);
    Grads<scalar_t> grads{g_means2d.data_ptr<scalar_t>(),
                          absgrad ? g_means2d_abs.data_ptr<scalar_t>() : nullptr,
                          g_conics.data_ptr<scalar_t>(), g_features.data_ptr<scalar_t>(),
                          g_opacities.data_ptr<scalar_t>(),
                          backgrounds.has_value() ? g_backgrounds.data_ptr<scalar_t>() : nullptr};
    if (num_quantiles == 0) {
      const Launch l = make_launch(backward_dense_kernel<scalar_t>, p, true);
      if (l.empty) return;
      backward_dense_kernel<scalar_t><<<l.grid, l.block, l.shmem, stream>>>(
          p, out_alpha.data_ptr<scalar_t>(), last_ids.data_ptr<int32_t>(),
          grad_feat.data_ptr<scalar_t>(), grad_alpha.data_ptr<scalar_t>(), grads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const Launch l = make_launch(backward_quantile_kernel<scalar_t>, p, false);
      if (l.empty) return;
      backward_quantile_kernel<scalar_t><<<l.grid, l.block, l.shmem, stream>>>(
          p, out_feat.data_ptr<scalar_t>(), sel_ids.data_ptr<int32_t>(),
          sel_count.data_ptr<int32_t>(), grad_feat.data_ptr<scalar_t>(),
          grad_alpha.data_ptr<scalar_t>(), grads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {g_means2d, g_conics, g_features, g_opacities, g_backgrounds, g_means2d_abs};
}

namespace {
constexpr int kSampleThreads = 128;

void check_common(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& features,
                  const at::Tensor& opacities, const c10::optional<at::Tensor>& backgrounds,
                  const at::Tensor& isect_offsets, const at::Tensor& flatten_ids,
                  int64_t num_quantiles) {
  check_cuda(means2d, "means2d");
  check_cuda(conics, "conics");
  check_cuda(features, "features");
  check_cuda(opacities, "opacities");
  check_cuda(isect_offsets, "isect_offsets");
  check_cuda(flatten_ids, "flatten_ids");
  if (backgrounds.has_value()) check_cuda(*backgrounds, "backgrounds");
  TORCH_CHECK(num_quantiles >= 0 && num_quantiles <= kMaxQuantiles,
              "num_quantiles must be in 0..", kMaxQuantiles);
}
}  // namespace

std::vector<at::Tensor> rasterize_pixels_forward_cuda(QRENDER_FORWARD_ARGS,
                                                      const at::Tensor& pixel_ids) {
  check_common(means2d, conics, features, opacities, backgrounds, isect_offsets, flatten_ids,
               num_quantiles);
  check_cuda(pixel_ids, "pixel_ids");
  const c10::cuda::OptionalCUDAGuard guard(device_of(means2d));
  const int64_t P = pixel_ids.size(0), C = features.size(-1);
  auto opts = means2d.options();
  auto iopts = opts.dtype(at::kInt);
  at::Tensor out_feat = at::empty({P, C}, opts);
  at::Tensor out_alpha = at::empty({P, 1}, opts);
  at::Tensor last_ids = at::empty({P}, iopts);
  at::Tensor sel_ids = at::empty({P, num_quantiles}, iopts);
  at::Tensor sel_count = at::empty({P}, iopts);
  if (P == 0) return {out_feat, out_alpha, last_ids, sel_ids, sel_count};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_pixels_forward_cuda", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(means2d, conics, features, opacities,
                                                     backgrounds, width, height, tile_size,
                                                     isect_offsets, flatten_ids, num_quantiles);
    const unsigned blocks = static_cast<unsigned>((P + kSampleThreads - 1) / kSampleThreads);
    forward_pixels_kernel<scalar_t><<<blocks, kSampleThreads, 0, stream>>>(
        p, pixel_ids.data_ptr<int64_t>(), P, out_feat.data_ptr<scalar_t>(),
        out_alpha.data_ptr<scalar_t>(), last_ids.data_ptr<int32_t>(),
        sel_ids.data_ptr<int32_t>(), sel_count.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_feat, out_alpha, last_ids, sel_ids, sel_count};
}

std::vector<at::Tensor> rasterize_pixels_backward_cuda(QRENDER_BACKWARD_ARGS,
                                                       const at::Tensor& pixel_ids) {
  check_common(means2d, conics, features, opacities, backgrounds, isect_offsets, flatten_ids,
               num_quantiles);
  check_cuda(pixel_ids, "pixel_ids");
  check_cuda(grad_feat, "grad_feat");
  check_cuda(grad_alpha, "grad_alpha");
  const c10::cuda::OptionalCUDAGuard guard(device_of(means2d));
  at::Tensor g_means2d = at::zeros_like(means2d);
  at::Tensor g_means2d_abs = absgrad ? at::zeros_like(means2d) : at::Tensor();
  at::Tensor g_conics = at::zeros_like(conics);
  at::Tensor g_features = at::zeros_like(features);
  at::Tensor g_opacities = at::zeros_like(opacities);
  at::Tensor g_backgrounds =
      backgrounds.has_value() ? at::zeros_like(*backgrounds) : at::Tensor();
  const int64_t P = pixel_ids.size(0);
  if (P == 0) return {g_means2d, g_conics, g_features, g_opacities, g_backgrounds, g_means2d_abs};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_pixels_backward_cuda", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(means2d, conics, features, opacities,
                                                     backgrounds, width, height, tile_size,
                                                     isect_offsets, flatten_ids, num_quantiles);
    Grads<scalar_t> grads{g_means2d.data_ptr<scalar_t>(),
                          absgrad ? g_means2d_abs.data_ptr<scalar_t>() : nullptr,
                          g_conics.data_ptr<scalar_t>(), g_features.data_ptr<scalar_t>(),
                          g_opacities.data_ptr<scalar_t>(),
                          backgrounds.has_value() ? g_backgrounds.data_ptr<scalar_t>() : nullptr};
    const unsigned blocks = static_cast<unsigned>((P + kSampleThreads - 1) / kSampleThreads);
    backward_pixels_kernel<scalar_t><<<blocks, kSampleThreads, 0, stream>>>(
        p, pixel_ids.data_ptr<int64_t>(), P, out_feat.data_ptr<scalar_t>(),
        out_alpha.data_ptr<scalar_t>(), last_ids.data_ptr<int32_t>(),
        sel_ids.data_ptr<int32_t>(), sel_count.data_ptr<int32_t>(),
        grad_feat.data_ptr<scalar_t>(), grad_alpha.data_ptr<scalar_t>(), grads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_means2d, g_conics, g_features, g_opacities, g_backgrounds, g_means2d_abs};
}

std::vector<at::Tensor> rasterize_query_cuda(QRENDER_FORWARD_ARGS, const at::Tensor& units,
                                             const at::Tensor& proj,
                                             const c10::optional<at::Tensor>& bg_proj) {
  check_common(means2d, conics, features, opacities, backgrounds, isect_offsets, flatten_ids,
               num_quantiles);
  check_cuda(units, "units");
  check_cuda(proj, "proj");
  if (bg_proj.has_value()) check_cuda(*bg_proj, "bg_proj");
  const c10::cuda::OptionalCUDAGuard guard(device_of(means2d));
  const int64_t V = means2d.size(0), Q = units.size(0);
  auto opts = means2d.options();
  at::Tensor scores = at::empty({V, height, width, Q}, opts);
  at::Tensor out_alpha = at::empty({V, height, width, 1}, opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_query_cuda", [&] {
    const Params<scalar_t> p = make_params<scalar_t>(means2d, conics, features, opacities,
                                                     backgrounds, width, height, tile_size,
                                                     isect_offsets, flatten_ids, num_quantiles);
    const QueryParams<scalar_t> q{proj.data_ptr<scalar_t>(),
                                  bg_proj.has_value() ? bg_proj->data_ptr<scalar_t>() : nullptr,
                                  units.data_ptr<scalar_t>(), Q, proj.dim() == 3};
    if (num_quantiles == 0) {
      const Launch l = make_launch(query_dense_kernel<scalar_t>, p, true);
      if (l.empty) return;
      query_dense_kernel<scalar_t><<<l.grid, l.block, l.shmem, stream>>>(
          p, q, scores.data_ptr<scalar_t>(), out_alpha.data_ptr<scalar_t>());
    } else {
      const Launch l = make_launch(query_quantile_kernel<scalar_t>, p, true);
      if (l.empty) return;
      query_quantile_kernel<scalar_t><<<l.grid, l.block, l.shmem, stream>>>(
          p, q, scores.data_ptr<scalar_t>(), out_alpha.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, out_alpha};
}

}  // namespace qrender
