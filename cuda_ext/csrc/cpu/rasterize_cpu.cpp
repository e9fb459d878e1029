// CPU rasterizer: dense and quantile feature blending, forward and backward.
// OpenMP over (camera, tile); one pixel at a time inside a tile. Semantics:
// docs/quantile_rendering.md (the reference in qrender_ns/render/reference.py is the oracle).
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <vector>

#include "../common.h"
#include "../rasterize.h"

namespace qrender {
namespace {

template <typename scalar_t>
inline void atomic_add(scalar_t* dst, scalar_t v) {
#pragma omp atomic
  *dst += v;
}

// Striped spin locks guarding feature-gradient rows: one lock per (pixel, Gaussian) pair and
// a vectorised row update instead of C separate atomic adds (C = 512 made those dominate).
class RowLocks {
 public:
  void lock(int64_t row) {
    std::atomic<bool>& flag = flags_[row & (kCount - 1)];
    while (flag.exchange(true, std::memory_order_acquire)) {
    }
  }
  void unlock(int64_t row) { flags_[row & (kCount - 1)].store(false, std::memory_order_release); }

 private:
  static constexpr int64_t kCount = 4096;
  std::array<std::atomic<bool>, kCount> flags_{};
};

struct Layout {
  int64_t num_cams, num_gs, channels, width, height, tile_size, tiles_w, tiles_h, num_isects;
  int num_quantiles;  // 0: dense
  bool feat_per_cam;
};

Layout make_layout(const at::Tensor& means2d, const at::Tensor& features, int64_t width,
                   int64_t height, int64_t tile_size, const at::Tensor& isect_offsets,
                   const at::Tensor& flatten_ids, int64_t num_quantiles) {
  Layout l;
  l.num_cams = means2d.size(0);
  l.num_gs = means2d.size(1);
  l.channels = features.size(-1);
  l.width = width;
  l.height = height;
  l.tile_size = tile_size;
  l.tiles_h = isect_offsets.size(1);
  l.tiles_w = isect_offsets.size(2);
  l.num_isects = flatten_ids.size(0);
  l.num_quantiles = static_cast<int>(num_quantiles);
  l.feat_per_cam = features.dim() == 3;
  return l;
}

// Range [start, end) of isect entries of tile `tile` (flat over cameras).
inline void tile_range(const int32_t* offsets, const Layout& l, int64_t tile, int64_t* start,
                       int64_t* end) {
  const int64_t total_tiles = l.num_cams * l.tiles_h * l.tiles_w;
  *start = offsets[tile];
  *end = tile + 1 < total_tiles ? offsets[tile + 1] : l.num_isects;
}

inline int64_t feature_row(const Layout& l, int32_t flat_id) {
  return l.feat_per_cam ? flat_id : flat_id % l.num_gs;
}

// A tile's Gaussians copied contiguously ([x, y, a, b, c, o] each), like the CUDA kernel's
// shared memory: every pixel of the tile walks this list, so random reads happen once per tile.
// `reject[j]` = ln(255 o) + margin: sigma above it means alpha < 1/255 for sure, so the exp
// is skipped; borderline cases fall through to the exact test, keeping the semantics exact.
template <typename scalar_t>
struct TileCache {
  std::vector<scalar_t> packed, reject;
  static constexpr int kStride = 6;

  void fill(const scalar_t* means2d, const scalar_t* conics, const scalar_t* opacities,
            const int32_t* flatten_ids, int64_t start, int64_t end) {
    const int64_t n = end - start;
    packed.resize(n * kStride);
    reject.resize(n);
    for (int64_t j = 0; j < n; ++j) {
      const int32_t g = flatten_ids[start + j];
      scalar_t* p = packed.data() + j * kStride;
      p[0] = means2d[2 * g];
      p[1] = means2d[2 * g + 1];
      p[2] = conics[3 * g];
      p[3] = conics[3 * g + 1];
      p[4] = conics[3 * g + 2];
      p[5] = opacities[g];
      reject[j] = p[5] > 0 ? std::log(scalar_t(255) * p[5]) + scalar_t(1e-3) : scalar_t(-1);
    }
  }

  // Exact alpha of entry j at (px, py); `used` is false when the exact test would skip it.
  PixelAlpha<scalar_t> alpha(int64_t j, scalar_t px, scalar_t py) const {
    const scalar_t* p = packed.data() + j * kStride;
    const scalar_t dx = p[0] - px, dy = p[1] - py;
    const scalar_t sigma =
        scalar_t(0.5) * (p[2] * dx * dx + p[4] * dy * dy) + p[3] * dx * dy;
    if (sigma > reject[j]) {
      PixelAlpha<scalar_t> r;
      r.used = false;
      return r;
    }
    return pixel_alpha(p, p + 2, p[5], px, py);
  }
};

template <typename scalar_t>
inline void axpy(scalar_t* __restrict out, scalar_t w, const scalar_t* __restrict f, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] += w * f[c];
}

// One quantile Gaussian picked by one pixel, blended in the tile's second pass.
template <typename scalar_t>
struct Pick {
  int64_t entry;  // index into the tile's Gaussian list
  int64_t pixel;  // flat output pixel
  scalar_t weight;  // T_Q alpha / (1 - T_Q)
  bool operator<(const Pick& o) const { return entry < o.entry || (entry == o.entry && pixel < o.pixel); }
};

template <typename scalar_t>
void forward_impl(const Layout& l, const scalar_t* means2d, const scalar_t* conics,
                  const scalar_t* features, const scalar_t* opacities,
                  const scalar_t* backgrounds, const int32_t* offsets,
                  const int32_t* flatten_ids, scalar_t* out_feat, scalar_t* out_alpha,
                  int32_t* last_ids, int32_t* sel_ids, int32_t* sel_count) {
  const int64_t C = l.channels, K = l.num_quantiles;
  const int64_t total_tiles = l.num_cams * l.tiles_h * l.tiles_w;
  // Quantile mode with wide features blends Gaussian-major per tile (below); with a few
  // channels the sort costs more than it saves, so pixels blend as they walk.
  const bool gaussian_major = K > 0 && C > 32;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t tile = 0; tile < total_tiles; ++tile) {
    const int64_t cam = tile / (l.tiles_h * l.tiles_w);
    const int64_t ty = (tile / l.tiles_w) % l.tiles_h, tx = tile % l.tiles_w;
    int64_t start, end;
    tile_range(offsets, l, tile, &start, &end);
    const scalar_t* bg = backgrounds ? backgrounds + cam * C : nullptr;
    TileCache<scalar_t> cache;
    cache.fill(means2d, conics, opacities, flatten_ids, start, end);
    std::vector<Pick<scalar_t>> picks;
    for (int64_t y = ty * l.tile_size; y < std::min((ty + 1) * l.tile_size, l.height); ++y) {
      for (int64_t x = tx * l.tile_size; x < std::min((tx + 1) * l.tile_size, l.width); ++x) {
        const int64_t pix = (cam * l.height + y) * l.width + x;
        const scalar_t px = scalar_t(x) + scalar_t(0.5), py = scalar_t(y) + scalar_t(0.5);
        scalar_t* out = out_feat + pix * C;
        std::fill(out, out + C, scalar_t(0));
        scalar_t trans = 1, trans_q = 1;
        int next_level = 1, count = 0;
        int64_t last = start - 1;
        for (int64_t i = start; i < end; ++i) {
          const PixelAlpha<scalar_t> a = cache.alpha(i - start, px, py);
          if (!a.used) continue;
          const scalar_t next_trans = trans * (1 - a.alpha);
          if (K == 0) {
            if (next_trans <= scalar_t(kTransEps)) break;
            axpy(out, a.alpha * trans, features + feature_row(l, flatten_ids[i]) * C, C);
            trans = next_trans;
            last = i;
            ++count;
            continue;
          }
          // Quantile mode: only the scalar walk here; feature rows are blended per tile below.
          if (next_trans < quantile_boundary<scalar_t>(next_level, K)) {
            if (gaussian_major)
              picks.push_back({i - start, pix, a.alpha * trans_q});
            else
              axpy(out, a.alpha * trans_q, features + feature_row(l, flatten_ids[i]) * C, C);
            trans_q *= 1 - a.alpha;
            sel_ids[pix * K + count++] = static_cast<int32_t>(i);
            while (next_level <= K && next_trans < quantile_boundary<scalar_t>(next_level, K))
              ++next_level;
            if (next_level > K) break;
          }
          trans = next_trans;
        }
        sel_count[pix] = count;  // dense: number of blended Gaussians (for benchmarks)
        if (K == 0) {
          if (bg)
            for (int64_t c = 0; c < C; ++c) out[c] += trans * bg[c];
          out_alpha[pix] = 1 - trans;
          last_ids[pix] = static_cast<int32_t>(last);
          continue;
        }
        for (int j = count; j < K; ++j) sel_ids[pix * K + j] = -1;
        const scalar_t norm = 1 - trans_q;
        if (gaussian_major)
          for (int j = 0; j < count; ++j) picks[picks.size() - 1 - j].weight /= norm;
        else if (count > 0)
          for (int64_t c = 0; c < C; ++c) out[c] /= norm;
        out_alpha[pix] = count > 0 ? norm : scalar_t(0);
        if (count == 0 && bg) std::copy(bg, bg + C, out);
      }
    }
    // Gaussian-major blending: each picked feature row is read once per tile and added to
    // every pixel that picked it (rows of a tile's pixels stay in cache). Per pixel the
    // order is still front to back, since list entries are depth-sorted.
    std::sort(picks.begin(), picks.end());
    for (size_t p = 0; p < picks.size(); ++p) {
      const scalar_t* f = features + feature_row(l, flatten_ids[start + picks[p].entry]) * C;
      axpy(out_feat + picks[p].pixel * C, picks[p].weight, f, C);
    }
  }
}

template <typename scalar_t>
struct Grads {
  scalar_t *means2d, *means2d_abs, *conics, *features, *opacities, *backgrounds;
  RowLocks* feature_locks;
};

// Accumulate the gradients of one Gaussian at one pixel given dL/dalpha and dL/df = w * g.
template <typename scalar_t>
inline void scatter_gaussian(const Layout& l, const Grads<scalar_t>& grads, int32_t g,
                             const PixelAlpha<scalar_t>& a, const scalar_t* conic,
                             scalar_t opacity, scalar_t v_alpha, scalar_t w,
                             const scalar_t* grad_out) {
  const int64_t row = feature_row(l, g);
  grads.feature_locks->lock(row);
  axpy(grads.features + row * l.channels, w, grad_out, l.channels);
  grads.feature_locks->unlock(row);
  scalar_t v_mean[2], v_conic[3], v_opac;
  alpha_backward(a, conic, opacity, v_alpha, v_mean, v_conic, &v_opac);
  atomic_add(grads.means2d + 2 * g, v_mean[0]);
  atomic_add(grads.means2d + 2 * g + 1, v_mean[1]);
  if (grads.means2d_abs) {
    atomic_add(grads.means2d_abs + 2 * g, std::abs(v_mean[0]));
    atomic_add(grads.means2d_abs + 2 * g + 1, std::abs(v_mean[1]));
  }
  for (int k = 0; k < 3; ++k) atomic_add(grads.conics + 3 * g + k, v_conic[k]);
  atomic_add(grads.opacities + g, v_opac);
}

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

template <typename scalar_t>
void backward_impl(const Layout& l, const scalar_t* means2d, const scalar_t* conics,
                   const scalar_t* features, const scalar_t* opacities,
                   const scalar_t* backgrounds, const int32_t* offsets,
                   const int32_t* flatten_ids, const scalar_t* out_feat,
                   const scalar_t* out_alpha, const int32_t* last_ids, const int32_t* sel_ids,
                   const int32_t* sel_count, const scalar_t* grad_feat,
                   const scalar_t* grad_alpha, Grads<scalar_t> grads) {
  const int64_t C = l.channels, K = l.num_quantiles;
  const int64_t total_tiles = l.num_cams * l.tiles_h * l.tiles_w;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t tile = 0; tile < total_tiles; ++tile) {
    const int64_t cam = tile / (l.tiles_h * l.tiles_w);
    const int64_t ty = (tile / l.tiles_w) % l.tiles_h, tx = tile % l.tiles_w;
    int64_t start, end;
    tile_range(offsets, l, tile, &start, &end);
    const scalar_t* bg = backgrounds ? backgrounds + cam * C : nullptr;
    scalar_t sel_alpha_buf[kMaxQuantiles], sel_trans_buf[kMaxQuantiles];
    TileCache<scalar_t> cache;
    if (K == 0) cache.fill(means2d, conics, opacities, flatten_ids, start, end);
    for (int64_t y = ty * l.tile_size; y < std::min((ty + 1) * l.tile_size, l.height); ++y) {
      for (int64_t x = tx * l.tile_size; x < std::min((tx + 1) * l.tile_size, l.width); ++x) {
        const int64_t pix = (cam * l.height + y) * l.width + x;
        const scalar_t px = scalar_t(x) + scalar_t(0.5), py = scalar_t(y) + scalar_t(0.5);
        const scalar_t* g_out = grad_feat + pix * C;
        const scalar_t g_alpha = grad_alpha[pix];
        if (K == 0) {
          const scalar_t t_final = 1 - out_alpha[pix];
          scalar_t v_final = g_alpha;  // dL/dT_final * (-1) folded below
          if (bg) {
            v_final -= dot(bg, g_out, C);
            for (int64_t c = 0; c < C; ++c) atomic_add(grads.backgrounds + cam * C + c, t_final * g_out[c]);
          }
          scalar_t trans = t_final, behind = 0;  // behind = sum_{l>i} w_l (f_l . g)
          for (int64_t i = last_ids[pix]; i >= start; --i) {
            const PixelAlpha<scalar_t> a = cache.alpha(i - start, px, py);
            if (!a.used) continue;
            const int32_t g = flatten_ids[i];
            const scalar_t ra = 1 / (1 - a.alpha);
            trans *= ra;
            const scalar_t w = a.alpha * trans;
            const scalar_t fg = dot(features + feature_row(l, g) * C, g_out, C);
            const scalar_t v_alpha = trans * fg - behind * ra + t_final * ra * v_final;
            behind += w * fg;
            scatter_gaussian(l, grads, g, a, conics + 3 * g, opacities[g], v_alpha, w, g_out);
          }
          continue;
        }
        const int count = sel_count[pix];
        if (count == 0) {
          if (bg)
            for (int64_t c = 0; c < C; ++c) atomic_add(grads.backgrounds + cam * C + c, g_out[c]);
          continue;
        }
        const int32_t* sel = sel_ids + pix * K;
        scalar_t trans_q = 1;
        for (int j = 0; j < count; ++j) {
          const int32_t g = flatten_ids[sel[j]];
          sel_alpha_buf[j] =
              pixel_alpha(means2d + 2 * g, conics + 3 * g, opacities[g], px, py).alpha;
          sel_trans_buf[j] = trans_q;
          trans_q *= 1 - sel_alpha_buf[j];
        }
        const scalar_t norm = 1 - trans_q;
        const scalar_t v_norm = g_alpha - dot(g_out, out_feat + pix * C, C) / norm;
        scalar_t behind = 0;
        for (int j = count - 1; j >= 0; --j) {
          const int32_t g = flatten_ids[sel[j]];
          const PixelAlpha<scalar_t> a =
              pixel_alpha(means2d + 2 * g, conics + 3 * g, opacities[g], px, py);
          const scalar_t ra = 1 / (1 - a.alpha);
          const scalar_t w = a.alpha * sel_trans_buf[j];
          const scalar_t fg = dot(features + feature_row(l, g) * C, g_out, C);
          const scalar_t v_alpha =
              (sel_trans_buf[j] * fg - behind * ra) / norm + trans_q * ra * v_norm;
          behind += w * fg;
          scatter_gaussian(l, grads, g, a, conics + 3 * g, opacities[g], v_alpha, w / norm, g_out);
        }
      }
    }
  }
}

}  // namespace

std::vector<at::Tensor> rasterize_forward_cpu(QRENDER_FORWARD_ARGS) {
  const Layout l = make_layout(means2d, features, width, height, tile_size, isect_offsets,
                               flatten_ids, num_quantiles);
  auto opts = means2d.options();
  auto iopts = opts.dtype(at::kInt);
  at::Tensor out_feat = at::empty({l.num_cams, height, width, l.channels}, opts);
  at::Tensor out_alpha = at::empty({l.num_cams, height, width, 1}, opts);
  const int64_t k_store = std::max<int64_t>(num_quantiles, 1);
  at::Tensor last_ids = at::empty({l.num_cams, height, width}, iopts);
  at::Tensor sel_ids = at::empty({l.num_cams, height, width, num_quantiles > 0 ? k_store : 0}, iopts);
  at::Tensor sel_count = at::empty({l.num_cams, height, width}, iopts);
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_forward_cpu", [&] {
    forward_impl<scalar_t>(
        l, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
        features.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
        backgrounds.has_value() ? backgrounds->data_ptr<scalar_t>() : nullptr,
        isect_offsets.data_ptr<int32_t>(), flatten_ids.data_ptr<int32_t>(),
        out_feat.data_ptr<scalar_t>(), out_alpha.data_ptr<scalar_t>(),
        last_ids.data_ptr<int32_t>(), sel_ids.data_ptr<int32_t>(), sel_count.data_ptr<int32_t>());
  });
  return {out_feat, out_alpha, last_ids, sel_ids, sel_count};
}

std::vector<at::Tensor> rasterize_backward_cpu(QRENDER_BACKWARD_ARGS) {
  const Layout l = make_layout(means2d, features, width, height, tile_size, isect_offsets,
                               flatten_ids, num_quantiles);
  at::Tensor g_means2d = at::zeros_like(means2d);
  at::Tensor g_means2d_abs = absgrad ? at::zeros_like(means2d) : at::Tensor();
  at::Tensor g_conics = at::zeros_like(conics);
  at::Tensor g_features = at::zeros_like(features);
  at::Tensor g_opacities = at::zeros_like(opacities);
  at::Tensor g_backgrounds = backgrounds.has_value() ? at::zeros_like(*backgrounds) : at::Tensor();
  RowLocks feature_locks;
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_backward_cpu", [&] {
    Grads<scalar_t> grads{g_means2d.data_ptr<scalar_t>(),
                          absgrad ? g_means2d_abs.data_ptr<scalar_t>() : nullptr,
                          g_conics.data_ptr<scalar_t>(), g_features.data_ptr<scalar_t>(),
                          g_opacities.data_ptr<scalar_t>(),
                          backgrounds.has_value() ? g_backgrounds.data_ptr<scalar_t>() : nullptr,
                          &feature_locks};
    backward_impl<scalar_t>(
        l, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
        features.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
        backgrounds.has_value() ? backgrounds->data_ptr<scalar_t>() : nullptr,
        isect_offsets.data_ptr<int32_t>(), flatten_ids.data_ptr<int32_t>(),
        out_feat.data_ptr<scalar_t>(), out_alpha.data_ptr<scalar_t>(),
        last_ids.data_ptr<int32_t>(), sel_ids.data_ptr<int32_t>(), sel_count.data_ptr<int32_t>(),
        grad_feat.data_ptr<scalar_t>(), grad_alpha.data_ptr<scalar_t>(), grads);
  });
  return {g_means2d, g_conics, g_features, g_opacities, g_backgrounds, g_means2d_abs};
}

}  // namespace qrender
