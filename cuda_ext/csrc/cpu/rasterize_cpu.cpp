// CPU rasterizer: dense and quantile feature blending, forward and backward, for whole images,
// for a list of sampled pixels, and straight into query space (cosine scores against text
// embeddings, no feature map). Semantics: docs/quantile_rendering.md (the reference in
// qrender_ns/render/reference.py is the oracle).
//
// Every path blends one pixel at a time through the same function (blend_pixel), so a sampled
// pixel or a query score sees exactly the Gaussians, the order and the selection of the full
// image. Each pixel accumulates its feature in a small per-thread buffer (L1) and writes its
// output row once (a streaming store for wide rows): no read-modify-write of output rows.
// OpenMP threads follow torch's intra-op thread count (torch.set_num_threads / OMP_NUM_THREADS).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

#include "../common.h"
#include "../rasterize.h"
#include "map_pool.h"

// The lane vectors of the quantile walk never cross a call (always-inlined helpers), so GCC's
// note that AVX vectors would change the ABI of such a call does not apply (it is reported at
// the end of the file, hence for the whole file).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace qrender {
namespace {

// Threads for one kernel call: torch's intra-op count, never more than the work items.
inline int num_threads_for(int64_t work_items) {
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work_items));
  return static_cast<int>(n);
}

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

// A pixel of a whole-image or sampled-pixel call: its position, tile list, and output row.
template <typename scalar_t>
struct PixelRef {
  int64_t cam, start, end;
  int64_t row;  // output row (flat pixel for images, index into pixel_ids for samples)
  scalar_t px, py;
};

// Pixel `pid` (flat over V*H*W) as a sample: same tile list and pixel centre as the image.
template <typename scalar_t>
inline PixelRef<scalar_t> sampled_pixel(const Layout& l, const int32_t* offsets, int64_t pid,
                                        int64_t row) {
  PixelRef<scalar_t> r;
  const int64_t hw = l.height * l.width;
  r.cam = pid / hw;
  const int64_t y = (pid % hw) / l.width, x = pid % l.width;
  const int64_t tile = (r.cam * l.tiles_h + y / l.tile_size) * l.tiles_w + x / l.tile_size;
  tile_range(offsets, l, tile, &r.start, &r.end);
  r.row = row;
  r.px = scalar_t(x) + scalar_t(0.5);
  r.py = scalar_t(y) + scalar_t(0.5);
  return r;
}

// A tile's Gaussians copied contiguously ([x, y, a, b, c, o] each), like the CUDA kernel's
// shared memory: every pixel of the tile walks this list, so random reads happen once per tile.
// `reject[j]` = ln(255 o) + margin: sigma above it means alpha < 1/255 for sure, so the exp
// is skipped; borderline cases fall through to the exact test, keeping the semantics exact.
template <typename scalar_t>
struct TileCache {
  std::vector<scalar_t> packed, reject;
  static constexpr int kStride = 6;

  // Gaussian g's row: [x, y, a, b, c, o].
  static void pack(scalar_t* p, const scalar_t* means2d, const scalar_t* conics, const scalar_t* opacities,
                   int32_t g) {
    p[0] = means2d[2 * g];
    p[1] = means2d[2 * g + 1];
    p[2] = conics[3 * g];
    p[3] = conics[3 * g + 1];
    p[4] = conics[3 * g + 2];
    p[5] = opacities[g];
  }

  void fill(const scalar_t* means2d, const scalar_t* conics, const scalar_t* opacities,
            const int32_t* flatten_ids, int64_t start, int64_t end) {
    const int64_t n = end - start;
    packed.resize(n * kStride);
    reject.resize(n);
    for (int64_t j = 0; j < n; ++j) {
      scalar_t* p = packed.data() + j * kStride;
      pack(p, means2d, conics, opacities, flatten_ids[start + j]);
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

// The same alphas read straight from the inputs (sampled pixels: a tile has a few of them).
template <typename scalar_t>
struct DirectAlphas {
  const scalar_t *means2d, *conics, *opacities;
  const int32_t* flatten_ids;
  int64_t start;

  PixelAlpha<scalar_t> alpha(int64_t j, scalar_t px, scalar_t py) const {
    const int64_t g = flatten_ids[start + j];
    return pixel_alpha(means2d + 2 * g, conics + 3 * g, opacities[g], px, py);
  }
};

// A tile's list packed from the geometry as far as the walks over it have gone (the sampled pixels' lanes walks:
// a tile has a few samples, which seldom walk its whole list, so packing all of it as TileCache does would read
// much more of the [N] geometry than the walks need). Lane groups of one tile share it: a later group reads what
// an earlier one packed and packs only beyond. Rows as TileCache::packed, with an opacity-free early reject:
// alpha = o exp(-sigma) < 1/255 for any o <= 1 once sigma > ln(255) + margin, so no log per entry (o > 1 is never
// rejected early; the exact test decides as always).
template <typename scalar_t>
struct LazyTileCache {
  const scalar_t *means2d, *conics, *opacities;
  const int32_t* ids = nullptr;  // the tile's list: flatten_ids + start
  int64_t filled = 0;
  std::vector<scalar_t> packed, reject;

  void reset(const scalar_t* m, const scalar_t* c, const scalar_t* o, const int32_t* list, int64_t n) {
    means2d = m;
    conics = c;
    opacities = o;
    ids = list;
    filled = 0;
    if (static_cast<int64_t>(reject.size()) < n) {
      packed.resize(n * TileCache<scalar_t>::kStride);
      reject.resize(n);
    }
  }

  // Entries [j0, j1) packed (rows of TileCache::kStride) and their rejects; j0 <= filled.
  const scalar_t* block(int64_t j0, int64_t j1, const scalar_t** reject_out) {
    const scalar_t kRejectAny = std::log(scalar_t(255)) + scalar_t(1e-3);
    for (int64_t j = filled; j < j1; ++j) {
      scalar_t* p = packed.data() + j * TileCache<scalar_t>::kStride;
      TileCache<scalar_t>::pack(p, means2d, conics, opacities, ids[j]);
      reject[j] = p[5] > 1 ? std::numeric_limits<scalar_t>::infinity() : (p[5] > 0 ? kRejectAny : scalar_t(-1));
    }
    filled = std::max(filled, j1);
    *reject_out = reject.data() + j0;
    return packed.data() + j0 * TileCache<scalar_t>::kStride;
  }
};

// ------------------------------------------------------------------- quantile selection
// The <= K quantile Gaussians of one pixel (pass 1 of quantile blending: scalars only).
template <typename scalar_t>
struct Selection {
  int count;
  scalar_t trans_q;                   // prod over the picks of (1 - alpha)
  scalar_t weight[kMaxQuantiles];     // alpha_j * T_q before pick j (not normalised)
  int32_t local[kMaxQuantiles];       // index into the pixel's tile list
};

// One pixel's walk, with any Alphas (the tile cache or the inputs directly).
template <typename scalar_t, typename Alphas>
inline void select_quantiles(const Alphas& alphas, const PixelRef<scalar_t>& p, int K,
                             Selection<scalar_t>* s) {
  s->count = 0;
  scalar_t trans = 1, trans_q = 1;
  int next_level = 1;
  for (int64_t i = p.start; i < p.end; ++i) {
    const PixelAlpha<scalar_t> a = alphas.alpha(i - p.start, p.px, p.py);
    if (!a.used) continue;
    const scalar_t next_trans = trans * (1 - a.alpha);
    if (next_trans < quantile_boundary<scalar_t>(next_level, K)) {
      s->weight[s->count] = a.alpha * trans_q;
      s->local[s->count++] = static_cast<int32_t>(i - p.start);  // <= K: each pick crosses a level
      trans_q *= 1 - a.alpha;
      while (next_level <= K && next_trans < quantile_boundary<scalar_t>(next_level, K))
        ++next_level;
      if (next_level > K) break;
    }
    trans = next_trans;
  }
  s->trans_q = trans_q;
}

// kLanes pixels of one tile walk the tile's list together, one SIMD lane each (what a GPU warp
// does): the early reject, the alpha and its exp run 8-wide and a pixel that has all its picks
// drops out of the mask; picks are rare (<= K of ~100 entries) and are handled lane by lane.
// Same arithmetic as select_quantiles over TileCache::alpha, operation for operation (no FMA
// contraction, exp_nonpositive for both), so the same Gaussians are picked with the same
// weights as a pixel walked alone (the reference tests).
// Whole images: the lanes are adjacent pixels of a tile row and the entries come packed from
// the TileCache. Sampled pixels (a tile has a few, anywhere in it): each lane has its own
// (x, y), and with `ids` given the entries are packed block by block straight from the
// geometry (only the prefix the lanes walk is read, once for all lanes), rejected against
// ln(255) + margin: alpha = o exp(-sigma) < 1/255 for any o <= 1 beyond it, so no log per
// entry (entries with o > 1 are never rejected early; the exact test decides as always).
constexpr int kLanes = 8;
constexpr int kWalkBlock = 32;  // entries filtered per pass A of the lanes walk

template <typename M>
inline bool any_lane(const M& mask) {
  uint64_t words[sizeof(M) / 8];
  std::memcpy(words, &mask, sizeof(M));
  uint64_t any = 0;
  for (uint64_t w : words) any |= w;
  return any != 0;
}

// Bit l set where lane l of the mask is set (the lanes that picked: usually one).
template <typename M>
inline unsigned lane_bits(const M& mask) {
  unsigned bits = 0;
  for (int l = 0; l < kLanes; ++l) bits |= static_cast<unsigned>(mask[l] != 0) << l;
  return bits;
}

#define QR_GROUP_SELECT(T, VT, VI, IT)                                                          \
  QR_CLONES QR_NO_CONTRACT void select_quantiles_lanes(                                         \
      const T* packed, const T* reject, LazyTileCache<T>* lazy, int64_t n,                      \
      const T* lane_px, const T* lane_py, int lanes, int K, const T* bounds, Selection<T>* sel) { \
    VT px, py, trans = VT{} + T(1), trans_q = VT{} + T(1);                                      \
    VT bound = VT{} + bounds[1];                                                                \
    VI active;                                                                                  \
    int next_level[kLanes];                                                                     \
    for (int l = 0; l < kLanes; ++l) {                                                          \
      px[l] = lane_px[l < lanes ? l : 0];                                                       \
      py[l] = lane_py[l < lanes ? l : 0];                                                       \
      active[l] = l < lanes ? IT(-1) : IT(0);                                                   \
      next_level[l] = 1;                                                                        \
      sel[l].count = 0;                                                                         \
    }                                                                                           \
    bool done = false;                                                                          \
    for (int64_t j0 = 0; j0 < n && !done; j0 += kWalkBlock) {                                   \
      const int64_t j1 = std::min<int64_t>(n, j0 + kWalkBlock);                                 \
      const T* br; /* entry j at bp + (j - j0) * stride, its reject at br[j - j0] */            \
      const T* bp = lazy ? lazy->block(j0, j1, &br) : packed + j0 * TileCache<T>::kStride;      \
      if (!lazy) br = reject + j0;                                                              \
      /* Pass A, branch free: the block's entries that some active lane does not reject, */     \
      /* with their sigmas (most entries are rejected, and a branch per entry mispredicts). */  \
      int32_t keep[kWalkBlock];                                                                 \
      VT keep_sigma[kWalkBlock];                                                                \
      int m = 0;                                                                                \
      for (int64_t j = j0; j < j1; ++j) {                                                       \
        const T* g = bp + (j - j0) * TileCache<T>::kStride;                                     \
        const VT dx = g[0] - px;                                                                \
        const VT dy = g[1] - py;                                                                \
        keep[m] = static_cast<int32_t>(j);                                                      \
        keep_sigma[m] = T(0.5) * (g[2] * dx * dx + g[4] * dy * dy) + g[3] * dx * dy;            \
        m += any_lane(active & ~(keep_sigma[m] > br[j - j0]));                                  \
      }                                                                                         \
      /* Pass B: the kept entries in order, as one pixel's walk would see them. */              \
      for (int i = 0; i < m; ++i) {                                                             \
        const int64_t j = keep[i];                                                              \
        const T* g = bp + (j - j0) * TileCache<T>::kStride;                                     \
        const VT sigma = keep_sigma[i];                                                         \
        const VI pass = active & ~(sigma > br[j - j0]);                                         \
        if (!any_lane(pass)) continue;                                                          \
        const VT raw = g[5] * exp_nonpositive<VT, VI, T, IT>(-sigma);                           \
        const VT alpha = raw > T(kAlphaMax) ? VT{} + T(kAlphaMax) : raw;                        \
        const VI used = pass & ~(sigma < T(0)) & ~(alpha < T(kAlphaMin));                       \
        if (!any_lane(used)) continue;                                                          \
        const VT next_trans = trans * (T(1) - alpha);                                           \
        const VI cross = used & (next_trans < bound);                                           \
        if (any_lane(cross)) {                                                                  \
          for (unsigned bits = lane_bits(cross); bits != 0; bits &= bits - 1) {                 \
            const int l = __builtin_ctz(bits);                                                  \
            Selection<T>& s = sel[l];                                                           \
            s.weight[s.count] = alpha[l] * trans_q[l];                                          \
            s.local[s.count++] = static_cast<int32_t>(j);                                       \
            trans_q[l] *= T(1) - alpha[l];                                                      \
            while (next_level[l] <= K && next_trans[l] < bounds[next_level[l]]) ++next_level[l]; \
            if (next_level[l] > K)                                                              \
              active[l] = IT(0);                                                                \
            else                                                                                \
              bound[l] = bounds[next_level[l]];                                                 \
          }                                                                                     \
          if (!any_lane(active)) {                                                              \
            done = true;                                                                        \
            break;                                                                              \
          }                                                                                     \
        }                                                                                       \
        trans = used ? next_trans : trans;                                                      \
      }                                                                                         \
    }                                                                                           \
    for (int l = 0; l < kLanes; ++l) sel[l].trans_q = trans_q[l];                               \
  }                                                                                             \

typedef float FloatLanes __attribute__((vector_size(4 * kLanes)));
typedef int32_t FloatMask __attribute__((vector_size(4 * kLanes)));
typedef double DoubleLanes __attribute__((vector_size(8 * kLanes)));
typedef int64_t DoubleMask __attribute__((vector_size(8 * kLanes)));
QR_GROUP_SELECT(float, FloatLanes, FloatMask, int32_t)
QR_GROUP_SELECT(double, DoubleLanes, DoubleMask, int64_t)

// A pixel whose selection the lanes walk already made; alpha() serves the dense paths.
template <typename scalar_t, typename Base = TileCache<scalar_t>>
struct Preselected {
  const Base& base;
  const Selection<scalar_t>& selection;
  PixelAlpha<scalar_t> alpha(int64_t j, scalar_t px, scalar_t py) const {
    return base.alpha(j, px, py);
  }
};

template <typename scalar_t, typename Alphas>
inline const Selection<scalar_t>& selection_of(const Alphas& alphas, const PixelRef<scalar_t>& p,
                                               int K, Selection<scalar_t>* scratch) {
  select_quantiles(alphas, p, K, scratch);
  return *scratch;
}

template <typename scalar_t, typename Base>
inline const Selection<scalar_t>& selection_of(const Preselected<scalar_t, Base>& alphas,
                                               const PixelRef<scalar_t>&, int,
                                               Selection<scalar_t>*) {
  return alphas.selection;
}

// Row kernels (C = 512: the hot loops of every path). Wide rows run through the clones
// (8-wide FMAs where the CPU has them); rows of a few channels (RGB) stay inline: a call per
// Gaussian would cost more than the row.
constexpr int64_t kWideRow = 16;

#define QR_ROW_KERNELS(T)                                                                    \
  QR_CLONES void axpy_wide(T* __restrict out, T w, const T* __restrict f, int64_t n) {       \
    _Pragma("omp simd") for (int64_t c = 0; c < n; ++c) out[c] += w * f[c];                 \
  }                                                                                          \
  QR_CLONES T dot_wide(const T* a, const T* b, int64_t n) {                                  \
    T s = 0;                                                                                 \
    _Pragma("omp simd reduction(+ : s)") for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];  \
    return s;                                                                                \
  }
QR_ROW_KERNELS(float)
QR_ROW_KERNELS(double)

template <typename scalar_t>
inline void axpy(scalar_t* __restrict out, scalar_t w, const scalar_t* __restrict f, int64_t n) {
  if (n >= kWideRow) return axpy_wide(out, w, f, n);
  for (int64_t c = 0; c < n; ++c) out[c] += w * f[c];
}

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  if (n >= kWideRow) return dot_wide(a, b, n);
  scalar_t s = 0;
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

// out = sum_j w[j] rows[j] over n >= 1 rows of C channels; returns |out|^2. Wide rows go in
// chunks of 8 vectors whose partial sums stay in registers across the rows, so each row is
// only loaded (no load and store of the output per row) and |out|^2 comes with the last one.
#define QR_BLEND_ROWS(T)                                                                       \
  QR_CLONES T blend_rows_wide(T* __restrict out, const T* const* rows, const T* w, int n,      \
                              int64_t C) {                                                     \
    typedef T V __attribute__((vector_size(32)));                                              \
    typedef T VU __attribute__((vector_size(32), aligned(sizeof(T))));                         \
    constexpr int kW = 32 / sizeof(T), kChunk = 8 * kW;                                        \
    V sq = {};                                                                                 \
    int64_t c = 0;                                                                             \
    for (; c + kChunk <= C; c += kChunk) {                                                     \
      V a[8];                                                                                  \
      for (int v = 0; v < 8; ++v) a[v] = w[0] * *reinterpret_cast<const VU*>(rows[0] + c + v * kW); \
      for (int j = 1; j < n; ++j) {                                                            \
        const T* r = rows[j] + c;                                                              \
        for (int v = 0; v < 8; ++v) a[v] += w[j] * *reinterpret_cast<const VU*>(r + v * kW);   \
      }                                                                                        \
      for (int v = 0; v < 8; ++v) {                                                            \
        *reinterpret_cast<VU*>(out + c + v * kW) = a[v];                                       \
        sq += a[v] * a[v];                                                                     \
      }                                                                                        \
    }                                                                                          \
    T total = 0;                                                                               \
    for (int k = 0; k < kW; ++k) total += sq[k];                                               \
    for (; c < C; ++c) {                                                                       \
      T x = w[0] * rows[0][c];                                                                 \
      for (int j = 1; j < n; ++j) x += w[j] * rows[j][c];                                      \
      out[c] = x;                                                                              \
      total += x * x;                                                                          \
    }                                                                                          \
    return total;                                                                              \
  }
QR_BLEND_ROWS(float)
QR_BLEND_ROWS(double)

template <typename scalar_t>
inline scalar_t blend_rows(scalar_t* __restrict out, const scalar_t* const* rows,
                           const scalar_t* w, int n, int64_t C) {
  if (C >= kWideRow) return blend_rows_wide(out, rows, w, n, C);
  scalar_t total = 0;
  for (int64_t c = 0; c < C; ++c) {
    scalar_t x = w[0] * rows[0][c];
    for (int j = 1; j < n; ++j) x += w[j] * rows[j][c];
    out[c] = x;
    total += x * x;
  }
  return total;
}

// One output row written once. Rows of whole cache lines bypass the cache (streaming
// stores): a 640x480x512 map is 630 MB, which no cache holds, so reading the lines before
// writing them (what plain stores do) would double the memory traffic.
inline bool streams(int64_t bytes) { return bytes % 64 == 0; }

inline void store_row(float* dst, const float* src, int64_t n) {
#if defined(__SSE2__)
  if (streams(n * 4) && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    for (int64_t c = 0; c < n; c += 4) _mm_stream_ps(dst + c, _mm_loadu_ps(src + c));
    return;
  }
#endif
  std::copy(src, src + n, dst);
}

inline void store_row(double* dst, const double* src, int64_t n) {
#if defined(__SSE2__)
  if (streams(n * 8) && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    for (int64_t c = 0; c < n; c += 2) _mm_stream_pd(dst + c, _mm_loadu_pd(src + c));
    return;
  }
#endif
  std::copy(src, src + n, dst);
}

// Makes this thread's streaming stores visible before the parallel region ends.
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// The quantile picks of one pixel, weights normalised by 1 - T_Q (norm; 0 if none).
template <typename scalar_t>
struct Picks {
  int count;
  scalar_t norm;
  scalar_t weight[kMaxQuantiles];
  int32_t ids[kMaxQuantiles];    // flat Gaussian ids
  int32_t local[kMaxQuantiles];  // indices into the pixel's tile list
};

template <typename scalar_t, typename Alphas>
inline Picks<scalar_t> picks_of(const Layout& l, const Alphas& alphas, const int32_t* flatten_ids,
                                const PixelRef<scalar_t>& p) {
  Selection<scalar_t> scratch;
  const Selection<scalar_t>& s = selection_of(alphas, p, l.num_quantiles, &scratch);
  Picks<scalar_t> picks;
  picks.count = s.count;
  picks.norm = s.count > 0 ? 1 - s.trans_q : scalar_t(0);
  for (int j = 0; j < s.count; ++j) {
    picks.weight[j] = s.weight[j] / picks.norm;
    picks.local[j] = s.local[j];
    picks.ids[j] = flatten_ids[p.start + s.local[j]];
  }
  return picks;
}

// acc = sum_j w_j f_j over the picks (the background, or zeros, where nothing was picked);
// returns |acc|^2.
template <typename scalar_t>
inline scalar_t blend_picks(const Layout& l, const scalar_t* features, const Picks<scalar_t>& picks,
                            const scalar_t* bg, scalar_t* __restrict acc) {
  const int64_t C = l.channels;
  if (picks.count == 0) {
    if (bg)
      std::copy(bg, bg + C, acc);
    else
      std::fill(acc, acc + C, scalar_t(0));
    return dot(acc, acc, C);
  }
  const scalar_t* rows[kMaxQuantiles];
  for (int j = 0; j < picks.count; ++j) rows[j] = features + feature_row(l, picks.ids[j]) * C;
  return blend_rows(acc, rows, picks.weight, picks.count, C);
}

// Per-pixel results besides the feature (what backward needs, and the alpha).
template <typename scalar_t>
struct BlendOut {
  scalar_t alpha;    // dense: 1 - T_final; quantile: 1 - T_Q (0 if nothing selected)
  int64_t last;      // dense: last blended isect index (start - 1 if none)
  int count;         // quantile: selected count; dense: number of blended Gaussians
};

// Blends pixel `p` into `acc` [C] (background and quantile normalisation included).
// Quantile mode writes the selected isect indices to `sel` [K] (-1 padded) and, if given,
// their flat ids and blending weights (normalised) to `sel_g` / `sel_w` (query space).
// Dense mode reports every blended Gaussian to `on_dense(flat id, weight)` if given.
template <typename scalar_t, typename Alphas>
inline BlendOut<scalar_t> blend_pixel(const Layout& l, const Alphas& alphas,
                                      const scalar_t* features, const int32_t* flatten_ids,
                                      const scalar_t* bg, const PixelRef<scalar_t>& p,
                                      scalar_t* __restrict acc, int32_t* sel,
                                      int32_t* sel_g = nullptr, scalar_t* sel_w = nullptr) {
  const int64_t C = l.channels;
  const int K = l.num_quantiles;
  BlendOut<scalar_t> r;
  r.last = p.start - 1;
  r.count = 0;
  scalar_t trans = 1;
  if (K == 0) {
    std::fill(acc, acc + C, scalar_t(0));
    for (int64_t i = p.start; i < p.end; ++i) {
      const PixelAlpha<scalar_t> a = alphas.alpha(i - p.start, p.px, p.py);
      if (!a.used) continue;
      const scalar_t next_trans = trans * (1 - a.alpha);
      if (next_trans <= scalar_t(kTransEps)) break;  // gsplat's stop
      axpy(acc, a.alpha * trans, features + feature_row(l, flatten_ids[i]) * C, C);
      trans = next_trans;
      r.last = i;
      ++r.count;
    }
    if (bg) axpy(acc, trans, bg, C);
    r.alpha = 1 - trans;
    return r;
  }
  // Quantile mode, pass 1: scalars only, pick the <= K quantile Gaussians.
  const Picks<scalar_t> picks = picks_of(l, alphas, flatten_ids, p);
  r.count = picks.count;
  for (int j = 0; j < picks.count; ++j) sel[j] = static_cast<int32_t>(p.start + picks.local[j]);
  for (int j = picks.count; j < K; ++j) sel[j] = -1;
  // Pass 2: the selected rows, normalised by 1 - T_Q, into the L1 buffer.
  blend_picks(l, features, picks, bg, acc);
  if (sel_g)
    for (int j = 0; j < r.count; ++j) {
      sel_g[j] = picks.ids[j];
      sel_w[j] = picks.weight[j];
    }
  r.alpha = picks.norm;
  return r;
}

// Output arrays of a forward call, indexed by the pixel's output row.
template <typename scalar_t>
struct ForwardOut {
  scalar_t *feat, *alpha;
  int32_t *last_ids, *sel_ids, *sel_count;
};

template <typename scalar_t, typename Alphas>
inline void forward_pixel(const Layout& l, const Alphas& alphas, const scalar_t* features,
                          const int32_t* flatten_ids, const scalar_t* backgrounds,
                          const PixelRef<scalar_t>& p, scalar_t* acc,
                          const ForwardOut<scalar_t>& o) {
  const int64_t C = l.channels, K = l.num_quantiles;
  const scalar_t* bg = backgrounds ? backgrounds + p.cam * C : nullptr;
  int32_t* sel = K > 0 ? o.sel_ids + p.row * K : nullptr;
  const BlendOut<scalar_t> b = blend_pixel(l, alphas, features, flatten_ids, bg, p, acc, sel);
  store_row(o.feat + p.row * C, acc, C);
  o.alpha[p.row] = b.alpha;
  o.last_ids[p.row] = static_cast<int32_t>(b.last);
  o.sel_count[p.row] = b.count;
}

// Calls visit(PixelRef, alphas) for every pixel of the image, tile by tile (OpenMP over
// (camera, tile)); the tile's Gaussians are cached once per tile.
template <typename scalar_t, typename Visit>
void for_each_image_pixel(const Layout& l, const scalar_t* means2d, const scalar_t* conics,
                          const scalar_t* opacities, const int32_t* offsets,
                          const int32_t* flatten_ids, bool cache_tile, Visit&& visit) {
  const int64_t total_tiles = l.num_cams * l.tiles_h * l.tiles_w;
#pragma omp parallel num_threads(num_threads_for(total_tiles))
  {
    TileCache<scalar_t> cache;
    std::vector<Selection<scalar_t>> lane_sel(kLanes);
    std::vector<scalar_t> bounds(l.num_quantiles + 1);  // quantile_boundary(k, K), k >= 1
    for (int k = 1; k <= l.num_quantiles; ++k) bounds[k] = quantile_boundary<scalar_t>(k, l.num_quantiles);
    std::vector<scalar_t> acc(std::max<int64_t>(l.channels, 1));
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < total_tiles; ++tile) {
      const int64_t cam = tile / (l.tiles_h * l.tiles_w);
      const int64_t ty = (tile / l.tiles_w) % l.tiles_h, tx = tile % l.tiles_w;
      PixelRef<scalar_t> p;
      p.cam = cam;
      tile_range(offsets, l, tile, &p.start, &p.end);
      if (cache_tile) cache.fill(means2d, conics, opacities, flatten_ids, p.start, p.end);
      const int64_t x_end = std::min((tx + 1) * l.tile_size, l.width);
      for (int64_t y = ty * l.tile_size; y < std::min((ty + 1) * l.tile_size, l.height); ++y) {
        if (cache_tile && l.num_quantiles > 0) {  // quantile walks: kLanes pixels at a time
          for (int64_t x0 = tx * l.tile_size; x0 < x_end; x0 += kLanes) {
            const int lanes = static_cast<int>(std::min<int64_t>(kLanes, x_end - x0));
            scalar_t lane_px[kLanes], lane_py[kLanes];
            for (int k = 0; k < lanes; ++k) {
              lane_px[k] = scalar_t(x0 + k) + scalar_t(0.5);
              lane_py[k] = scalar_t(y) + scalar_t(0.5);
            }
            select_quantiles_lanes(cache.packed.data(), cache.reject.data(), nullptr,
                                   p.end - p.start, lane_px, lane_py, lanes, l.num_quantiles,
                                   bounds.data(), lane_sel.data());
            for (int k = 0; k < lanes; ++k) {
              p.row = (cam * l.height + y) * l.width + x0 + k;
              p.px = scalar_t(x0 + k) + scalar_t(0.5);
              p.py = scalar_t(y) + scalar_t(0.5);
              visit(p, Preselected<scalar_t>{cache, lane_sel[k]}, acc.data());
            }
          }
          continue;
        }
        for (int64_t x = tx * l.tile_size; x < x_end; ++x) {
          p.row = (cam * l.height + y) * l.width + x;
          p.px = scalar_t(x) + scalar_t(0.5);
          p.py = scalar_t(y) + scalar_t(0.5);
          visit(p, cache, acc.data());
        }
      }
    }
    store_fence();
  }
}

// The samples in (camera, tile, row, column) order, cut into groups of <= kLanes samples of one
// tile: [begin, end) ranges of `order`. The samples of a group walk their tile's list together, the
// groups of a tile one after the other over one lazily packed copy of its list.
struct SampleGroups {
  std::vector<int64_t> order, begin, end;
  std::vector<int64_t> tile_begin;  // the groups of one tile: [tile_begin[t], tile_begin[t + 1])
};

inline SampleGroups group_samples_by_tile(const Layout& l, const int64_t* pixel_ids,
                                          int64_t num_pixels) {
  const int64_t hw = l.height * l.width;
  std::vector<std::pair<int64_t, int64_t>> keyed(num_pixels);
  std::vector<int64_t> tile_of(num_pixels);
  for (int64_t s = 0; s < num_pixels; ++s) {
    const int64_t pid = pixel_ids[s], cam = pid / hw, y = (pid % hw) / l.width, x = pid % l.width;
    tile_of[s] = (cam * l.tiles_h + y / l.tile_size) * l.tiles_w + x / l.tile_size;
    keyed[s] = {(tile_of[s] * l.tile_size + y % l.tile_size) * l.tile_size + x % l.tile_size, s};
  }
  std::sort(keyed.begin(), keyed.end());
  SampleGroups g;
  g.order.resize(num_pixels);
  for (int64_t i = 0; i < num_pixels; ++i) g.order[i] = keyed[i].second;
  for (int64_t i = 0; i < num_pixels;) {
    if (i == 0 || tile_of[g.order[i]] != tile_of[g.order[i - 1]])
      g.tile_begin.push_back(static_cast<int64_t>(g.begin.size()));
    int64_t j = i + 1;
    while (j < num_pixels && j - i < kLanes && tile_of[g.order[j]] == tile_of[g.order[i]]) ++j;
    g.begin.push_back(i);
    g.end.push_back(j);
    i = j;
  }
  g.tile_begin.push_back(static_cast<int64_t>(g.begin.size()));
  return g;
}

// Calls visit(PixelRef, alphas) for every sampled pixel (OpenMP over samples). With `preselect`
// (quantile forward) the samples of a tile are grouped and their quantile walks run as lanes
// (select_quantiles_lanes over the tile's LazyTileCache): visit gets the selection made (Preselected).
template <typename scalar_t, typename Visit>
void for_each_sampled_pixel(const Layout& l, const scalar_t* means2d, const scalar_t* conics,
                            const scalar_t* opacities, const int32_t* offsets,
                            const int32_t* flatten_ids, const int64_t* pixel_ids,
                            int64_t num_pixels, bool preselect, Visit&& visit) {
  if (preselect && l.num_quantiles > 0) {
    const SampleGroups groups = group_samples_by_tile(l, pixel_ids, num_pixels);
    const int64_t num_tiles = static_cast<int64_t>(groups.tile_begin.size()) - 1;
#pragma omp parallel num_threads(num_threads_for(num_tiles / 8 + 1))
    {
      std::vector<scalar_t> acc(std::max<int64_t>(l.channels, 1));
      std::vector<Selection<scalar_t>> lane_sel(kLanes);
      std::vector<scalar_t> bounds(l.num_quantiles + 1);
      for (int k = 1; k <= l.num_quantiles; ++k)
        bounds[k] = quantile_boundary<scalar_t>(k, l.num_quantiles);
      LazyTileCache<scalar_t> cache;
#pragma omp for schedule(dynamic, 2)
      for (int64_t t = 0; t < num_tiles; ++t) {
        bool fresh = true;
        for (int64_t gi = groups.tile_begin[t]; gi < groups.tile_begin[t + 1]; ++gi) {
          const int64_t b = groups.begin[gi];
          const int lanes = static_cast<int>(groups.end[gi] - b);
          PixelRef<scalar_t> ps[kLanes];
          scalar_t lane_px[kLanes], lane_py[kLanes];
          for (int k = 0; k < lanes; ++k) {
            const int64_t s = groups.order[b + k];
            ps[k] = sampled_pixel<scalar_t>(l, offsets, pixel_ids[s], s);
            lane_px[k] = ps[k].px;
            lane_py[k] = ps[k].py;
          }
          if (fresh)  // the tile's first group: its list, packed as far as its walks go
            cache.reset(means2d, conics, opacities, flatten_ids + ps[0].start, ps[0].end - ps[0].start);
          fresh = false;
          select_quantiles_lanes(static_cast<const scalar_t*>(nullptr),
                                 static_cast<const scalar_t*>(nullptr), &cache, ps[0].end - ps[0].start,
                                 lane_px, lane_py, lanes, l.num_quantiles, bounds.data(), lane_sel.data());
          const DirectAlphas<scalar_t> alphas{means2d, conics, opacities, flatten_ids, ps[0].start};
          for (int k = 0; k < lanes; ++k)
            visit(ps[k], Preselected<scalar_t, DirectAlphas<scalar_t>>{alphas, lane_sel[k]},
                  acc.data());
        }
      }
      store_fence();
    }
    return;
  }
#pragma omp parallel num_threads(num_threads_for(num_pixels / 64 + 1))
  {
    std::vector<scalar_t> acc(std::max<int64_t>(l.channels, 1));
#pragma omp for schedule(dynamic, 16)
    for (int64_t s = 0; s < num_pixels; ++s) {
      const PixelRef<scalar_t> p = sampled_pixel<scalar_t>(l, offsets, pixel_ids[s], s);
      const DirectAlphas<scalar_t> alphas{means2d, conics, opacities, flatten_ids, p.start};
      visit(p, alphas, acc.data());
    }
    store_fence();
  }
}

// ------------------------------------------------------------------------------ backward
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

// Saved forward outputs and incoming gradients, indexed by the pixel's output row.
template <typename scalar_t>
struct BackwardIn {
  const scalar_t *out_feat, *out_alpha;
  const int32_t *last_ids, *sel_ids, *sel_count;
  const scalar_t *grad_feat, *grad_alpha;
};

template <typename scalar_t, typename Alphas>
inline void backward_pixel(const Layout& l, const Alphas& alphas, const scalar_t* means2d,
                           const scalar_t* conics, const scalar_t* features,
                           const scalar_t* opacities, const scalar_t* backgrounds,
                           const int32_t* flatten_ids, const PixelRef<scalar_t>& p,
                           const BackwardIn<scalar_t>& in, const Grads<scalar_t>& grads) {
  const int64_t C = l.channels, K = l.num_quantiles;
  const scalar_t* bg = backgrounds ? backgrounds + p.cam * C : nullptr;
  const scalar_t* g_out = in.grad_feat + p.row * C;
  const scalar_t g_alpha = in.grad_alpha[p.row];
  if (K == 0) {
    const scalar_t t_final = 1 - in.out_alpha[p.row];
    scalar_t v_final = g_alpha;  // dL/dT_final * (-1) folded below
    if (bg) {
      v_final -= dot(bg, g_out, C);
      for (int64_t c = 0; c < C; ++c)
        atomic_add(grads.backgrounds + p.cam * C + c, t_final * g_out[c]);
    }
    scalar_t trans = t_final, behind = 0;  // behind = sum_{l>i} w_l (f_l . g)
    for (int64_t i = in.last_ids[p.row]; i >= p.start; --i) {
      const PixelAlpha<scalar_t> a = alphas.alpha(i - p.start, p.px, p.py);
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
    return;
  }
  const int count = in.sel_count[p.row];
  if (count == 0) {
    if (bg)
      for (int64_t c = 0; c < C; ++c) atomic_add(grads.backgrounds + p.cam * C + c, g_out[c]);
    return;
  }
  scalar_t sel_alpha[kMaxQuantiles], sel_trans[kMaxQuantiles];
  const int32_t* sel = in.sel_ids + p.row * K;
  scalar_t trans_q = 1;
  for (int j = 0; j < count; ++j) {
    const int32_t g = flatten_ids[sel[j]];
    sel_alpha[j] = pixel_alpha(means2d + 2 * g, conics + 3 * g, opacities[g], p.px, p.py).alpha;
    sel_trans[j] = trans_q;
    trans_q *= 1 - sel_alpha[j];
  }
  const scalar_t norm = 1 - trans_q;
  const scalar_t v_norm = g_alpha - dot(g_out, in.out_feat + p.row * C, C) / norm;
  scalar_t behind = 0;
  for (int j = count - 1; j >= 0; --j) {
    const int32_t g = flatten_ids[sel[j]];
    const PixelAlpha<scalar_t> a =
        pixel_alpha(means2d + 2 * g, conics + 3 * g, opacities[g], p.px, p.py);
    const scalar_t ra = 1 / (1 - a.alpha);
    const scalar_t w = a.alpha * sel_trans[j];
    const scalar_t fg = dot(features + feature_row(l, g) * C, g_out, C);
    const scalar_t v_alpha = (sel_trans[j] * fg - behind * ra) / norm + trans_q * ra * v_norm;
    behind += w * fg;
    scatter_gaussian(l, grads, g, a, conics + 3 * g, opacities[g], v_alpha, w / norm, g_out);
  }
}

// ---------------------------------------------------------------------------- query space
// cos(F(p), t_q) for every pixel from the per-Gaussian projections G = features . T^T:
// F(p) = sum_i w_i f_i (+ T bg), so F(p) . t_q = sum_i w_i G_iq (+ T bg . t_q); the blended
// row is only needed for |F(p)|. Scores are F.normalize(F(p)) . t_q (t_q unit vectors):
// |F| is clamped at 1e-12 as F.normalize does, zero features score 0.
// The projected sum is exact up to rounding of sum_i |w_i| |f_i|; where that mass exceeds
// kCancel * |F(p)| (the rows cancel), the scores are recomputed as F(p) . t_q from the row.
constexpr double kCancel = 16;

template <typename scalar_t>
struct QueryIn {
  const scalar_t* proj;     // [N or V*N, Q + 1]: G, then |f| in the last column
  const scalar_t* bg_proj;  // [V, Q + 1]: bg . T^T, then |bg| (null without backgrounds)
  const scalar_t* units;    // [Q, C] unit query embeddings
  int64_t num_queries;
  bool proj_per_cam;
};

template <typename scalar_t, typename Alphas>
inline void query_pixel(const Layout& l, const Alphas& alphas, const scalar_t* features,
                        const int32_t* flatten_ids, const scalar_t* backgrounds,
                        const QueryIn<scalar_t>& q, const PixelRef<scalar_t>& p,
                        scalar_t* acc, scalar_t* out_scores, scalar_t* out_alpha) {
  const int64_t C = l.channels, Q = q.num_queries;
  const scalar_t* bg = backgrounds ? backgrounds + p.cam * C : nullptr;
  const scalar_t* bg_proj = q.bg_proj ? q.bg_proj + p.cam * (Q + 1) : nullptr;
  scalar_t* score = out_scores + p.row * Q;
  std::fill(score, score + Q, scalar_t(0));
  auto proj_row = [&](int32_t g) {
    return q.proj + (q.proj_per_cam ? int64_t(g) : int64_t(g) % l.num_gs) * (Q + 1);
  };
  scalar_t mass = 0;  // sum_i |w_i| |f_i|
  scalar_t length;    // |F(p)|
  BlendOut<scalar_t> b;
  if (l.num_quantiles == 0) {
    // Dense: the weights are re-derived in a second walk (cheap scalars) rather than stored.
    b = blend_pixel(l, alphas, features, flatten_ids, bg, p, acc, nullptr);
    scalar_t trans = 1;
    for (int64_t i = p.start; i <= b.last; ++i) {
      const PixelAlpha<scalar_t> a = alphas.alpha(i - p.start, p.px, p.py);
      if (!a.used) continue;
      const scalar_t* r = proj_row(flatten_ids[i]);
      axpy(score, a.alpha * trans, r, Q);
      mass += a.alpha * trans * r[Q];
      trans *= 1 - a.alpha;
    }
    if (bg_proj) {
      axpy(score, 1 - b.alpha, bg_proj, Q);
      mass += (1 - b.alpha) * bg_proj[Q];
    }
    length = std::sqrt(dot(acc, acc, C));
  } else {
    const Picks<scalar_t> picks = picks_of(l, alphas, flatten_ids, p);
    b.alpha = picks.norm;
    for (int j = 0; j < picks.count; ++j) {
      const scalar_t* r = proj_row(picks.ids[j]);
      axpy(score, picks.weight[j], r, Q);
      mass += picks.weight[j] * r[Q];
    }
    if (picks.count == 0 && bg_proj) {
      std::copy(bg_proj, bg_proj + Q, score);
      mass = bg_proj[Q];
    }
    length = std::sqrt(blend_picks(l, features, picks, bg, acc));
  }
  const scalar_t inv = 1 / std::max(length, scalar_t(1e-12));
  if (mass > scalar_t(kCancel) * length)
    for (int64_t k = 0; k < Q; ++k) score[k] = dot(acc, q.units + k * C, C) * inv;
  else
    for (int64_t k = 0; k < Q; ++k) score[k] *= inv;
  out_alpha[p.row] = b.alpha;
}

// Two rows of the query projection: out_r[q] = row_r . units[q] for q < Q, out_r[Q] = |row_r|.
// Each load of a unit row serves both rows and four queries go at once: 8 independent sums,
// so the FMAs do not wait on one another (a matmul and a norm would read each row twice).
#define QR_PROJECT_ROWS(T)                                                                    \
  QR_CLONES void project_row_pair(const T* __restrict r0, const T* __restrict r1,            \
                                  const T* __restrict units, int64_t Q, int64_t C,            \
                                  T* __restrict o0, T* __restrict o1) {                       \
    typedef T V __attribute__((vector_size(32)));                                             \
    typedef T VU __attribute__((vector_size(32), aligned(sizeof(T))));                        \
    constexpr int kW = 32 / sizeof(T);                                                        \
    const int64_t vec_end = C - C % kW;                                                       \
    auto load = [](const T* p) { return *reinterpret_cast<const VU*>(p); };                   \
    auto total = [](const V& v) {                                                             \
      T s = 0;                                                                                \
      for (int k = 0; k < kW; ++k) s += v[k];                                                 \
      return s;                                                                               \
    };                                                                                        \
    o0[Q] = std::sqrt(dot(r0, r0, C));                                                        \
    o1[Q] = std::sqrt(dot(r1, r1, C));                                                        \
    int64_t q0 = 0;                                                                           \
    for (; q0 + 4 <= Q; q0 += 4) {                                                            \
      const T* u[4];                                                                          \
      for (int k = 0; k < 4; ++k) u[k] = units + (q0 + k) * C;                                \
      V a[4] = {}, b[4] = {};                                                                 \
      for (int64_t c = 0; c < vec_end; c += kW) {                                             \
        const V f0 = load(r0 + c), f1 = load(r1 + c);                                         \
        for (int k = 0; k < 4; ++k) {                                                         \
          const V uk = load(u[k] + c);                                                        \
          a[k] += f0 * uk;                                                                    \
          b[k] += f1 * uk;                                                                    \
        }                                                                                     \
      }                                                                                       \
      for (int k = 0; k < 4; ++k) {                                                           \
        T s0 = total(a[k]), s1 = total(b[k]);                                                 \
        for (int64_t c = vec_end; c < C; ++c) {                                               \
          s0 += r0[c] * u[k][c];                                                              \
          s1 += r1[c] * u[k][c];                                                              \
        }                                                                                     \
        o0[q0 + k] = s0;                                                                      \
        o1[q0 + k] = s1;                                                                      \
      }                                                                                       \
    }                                                                                         \
    for (; q0 < Q; ++q0) { /* the last 1-3 queries one by one, two sums per row */            \
      const T* u = units + q0 * C;                                                            \
      V a[2] = {}, b[2] = {};                                                                 \
      int64_t c = 0;                                                                          \
      for (; c + 2 * kW <= vec_end; c += 2 * kW)                                              \
        for (int h = 0; h < 2; ++h) {                                                         \
          const V uh = load(u + c + h * kW);                                                  \
          a[h] += load(r0 + c + h * kW) * uh;                                                 \
          b[h] += load(r1 + c + h * kW) * uh;                                                 \
        }                                                                                     \
      T s0 = total(a[0] + a[1]), s1 = total(b[0] + b[1]);                                     \
      for (; c < C; ++c) {                                                                    \
        s0 += r0[c] * u[c];                                                                   \
        s1 += r1[c] * u[c];                                                                   \
      }                                                                                       \
      o0[q0] = s0;                                                                            \
      o1[q0] = s1;                                                                            \
    }                                                                                         \
  }
QR_PROJECT_ROWS(float)
QR_PROJECT_ROWS(double)

template <typename scalar_t>
void project_rows(const scalar_t* rows, const scalar_t* units, int64_t n, int64_t Q, int64_t C,
                  scalar_t* out) {
  const int64_t pairs = (n + 1) / 2;
  std::vector<scalar_t> spare(Q + 1);  // the odd last row's twin output
#pragma omp parallel for schedule(static) num_threads(num_threads_for(pairs / 128 + 1))
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t a = 2 * i, b = std::min(a + 1, n - 1);
    project_row_pair(rows + a * C, rows + b * C, units, Q, C, out + a * (Q + 1),
                     b == a ? spare.data() : out + b * (Q + 1));
  }
}

// --------------------------------------------------------------------------- entry points
template <typename scalar_t>
struct Inputs {
  const scalar_t *means2d, *conics, *features, *opacities, *backgrounds;
  const int32_t *offsets, *flatten_ids;
};

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& means2d, const at::Tensor& conics,
                           const at::Tensor& features, const at::Tensor& opacities,
                           const c10::optional<at::Tensor>& backgrounds,
                           const at::Tensor& isect_offsets, const at::Tensor& flatten_ids) {
  return {means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
          features.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
          backgrounds.has_value() ? backgrounds->data_ptr<scalar_t>() : nullptr,
          isect_offsets.data_ptr<int32_t>(), flatten_ids.data_ptr<int32_t>()};
}

at::Tensor zeros_large_like(const at::Tensor& like) {
  return empty_recycled(like.sizes(), like.options()).zero_();
}

// Shapes of per-pixel outputs: [V, H, W, ...] for images, [P, ...] for sampled pixels.
std::vector<int64_t> pixel_shape(const Layout& l, const c10::optional<at::Tensor>& pixel_ids,
                                 std::initializer_list<int64_t> tail) {
  std::vector<int64_t> shape;
  if (pixel_ids.has_value())
    shape = {pixel_ids->size(0)};
  else
    shape = {l.num_cams, l.height, l.width};
  shape.insert(shape.end(), tail.begin(), tail.end());
  return shape;
}

std::vector<at::Tensor> forward_any(QRENDER_FORWARD_ARGS,
                                    const c10::optional<at::Tensor>& pixel_ids) {
  const Layout l = make_layout(means2d, features, width, height, tile_size, isect_offsets,
                               flatten_ids, num_quantiles);
  auto opts = means2d.options();
  auto iopts = opts.dtype(at::kInt);
  at::Tensor out_feat = empty_recycled(pixel_shape(l, pixel_ids, {l.channels}), opts);
  at::Tensor out_alpha = at::empty(pixel_shape(l, pixel_ids, {1}), opts);
  at::Tensor last_ids = at::empty(pixel_shape(l, pixel_ids, {}), iopts);
  at::Tensor sel_ids = at::empty(pixel_shape(l, pixel_ids, {num_quantiles}), iopts);
  at::Tensor sel_count = at::empty(pixel_shape(l, pixel_ids, {}), iopts);
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_forward_cpu", [&] {
    const Inputs<scalar_t> in = inputs_of<scalar_t>(means2d, conics, features, opacities,
                                                    backgrounds, isect_offsets, flatten_ids);
    const ForwardOut<scalar_t> o{out_feat.data_ptr<scalar_t>(), out_alpha.data_ptr<scalar_t>(),
                                 last_ids.data_ptr<int32_t>(), sel_ids.data_ptr<int32_t>(),
                                 sel_count.data_ptr<int32_t>()};
    auto visit = [&](const PixelRef<scalar_t>& p, const auto& alphas, scalar_t* acc) {
      forward_pixel(l, alphas, in.features, in.flatten_ids, in.backgrounds, p, acc, o);
    };
    if (pixel_ids.has_value())
      for_each_sampled_pixel<scalar_t>(l, in.means2d, in.conics, in.opacities, in.offsets,
                                       in.flatten_ids, pixel_ids->data_ptr<int64_t>(),
                                       pixel_ids->size(0), true, visit);
    else
      for_each_image_pixel<scalar_t>(l, in.means2d, in.conics, in.opacities, in.offsets,
                                     in.flatten_ids, true, visit);
  });
  return {out_feat, out_alpha, last_ids, sel_ids, sel_count};
}

std::vector<at::Tensor> backward_any(QRENDER_BACKWARD_ARGS,
                                     const c10::optional<at::Tensor>& pixel_ids) {
  const Layout l = make_layout(means2d, features, width, height, tile_size, isect_offsets,
                               flatten_ids, num_quantiles);
  at::Tensor g_means2d = at::zeros_like(means2d);
  at::Tensor g_means2d_abs = absgrad ? at::zeros_like(means2d) : at::Tensor();
  at::Tensor g_conics = at::zeros_like(conics);
  at::Tensor g_features = zeros_large_like(features);
  at::Tensor g_opacities = at::zeros_like(opacities);
  at::Tensor g_backgrounds = backgrounds.has_value() ? at::zeros_like(*backgrounds) : at::Tensor();
  RowLocks feature_locks;
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_backward_cpu", [&] {
    const Inputs<scalar_t> in = inputs_of<scalar_t>(means2d, conics, features, opacities,
                                                    backgrounds, isect_offsets, flatten_ids);
    const Grads<scalar_t> grads{g_means2d.data_ptr<scalar_t>(),
                                absgrad ? g_means2d_abs.data_ptr<scalar_t>() : nullptr,
                                g_conics.data_ptr<scalar_t>(), g_features.data_ptr<scalar_t>(),
                                g_opacities.data_ptr<scalar_t>(),
                                backgrounds.has_value() ? g_backgrounds.data_ptr<scalar_t>() : nullptr,
                                &feature_locks};
    const BackwardIn<scalar_t> saved{out_feat.data_ptr<scalar_t>(), out_alpha.data_ptr<scalar_t>(),
                                     last_ids.data_ptr<int32_t>(), sel_ids.data_ptr<int32_t>(),
                                     sel_count.data_ptr<int32_t>(), grad_feat.data_ptr<scalar_t>(),
                                     grad_alpha.data_ptr<scalar_t>()};
    auto visit = [&](const PixelRef<scalar_t>& p, const auto& alphas, scalar_t*) {
      backward_pixel(l, alphas, in.means2d, in.conics, in.features, in.opacities, in.backgrounds,
                     in.flatten_ids, p, saved, grads);
    };
    if (pixel_ids.has_value())
      for_each_sampled_pixel<scalar_t>(l, in.means2d, in.conics, in.opacities, in.offsets,
                                       in.flatten_ids, pixel_ids->data_ptr<int64_t>(),
                                       pixel_ids->size(0), false, visit);
    else  // the quantile backward reads its few selected Gaussians directly
      for_each_image_pixel<scalar_t>(l, in.means2d, in.conics, in.opacities, in.offsets,
                                     in.flatten_ids, num_quantiles == 0, visit);
  });
  return {g_means2d, g_conics, g_features, g_opacities, g_backgrounds, g_means2d_abs};
}

}  // namespace

at::Tensor project_rows_cpu(const at::Tensor& rows, const at::Tensor& units) {
  TORCH_CHECK(rows.device().is_cpu() && units.device().is_cpu(), "project_rows_cpu: CPU tensors");
  TORCH_CHECK(units.dim() == 2 && rows.dim() >= 1 && rows.size(-1) == units.size(1),
              "project_rows_cpu: rows [..., C] and units [Q, C]");
  TORCH_CHECK(rows.scalar_type() == units.scalar_type(), "project_rows_cpu: one dtype");
  const at::Tensor r = rows.contiguous(), u = units.contiguous();
  const int64_t C = r.size(-1), Q = u.size(0), n = C > 0 ? r.numel() / C : 0;
  std::vector<int64_t> shape(r.sizes().begin(), r.sizes().end());
  shape.back() = Q + 1;
  at::Tensor out = at::empty(shape, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "project_rows_cpu", [&] {
    project_rows(r.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), n, Q, C, out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<at::Tensor> rasterize_forward_cpu(QRENDER_FORWARD_ARGS) {
  return forward_any(means2d, conics, features, opacities, backgrounds, width, height, tile_size,
                     isect_offsets, flatten_ids, num_quantiles, c10::nullopt);
}

std::vector<at::Tensor> rasterize_backward_cpu(QRENDER_BACKWARD_ARGS) {
  return backward_any(means2d, conics, features, opacities, backgrounds, width, height,
                      tile_size, isect_offsets, flatten_ids, num_quantiles, out_feat, out_alpha,
                      last_ids, sel_ids, sel_count, grad_feat, grad_alpha, absgrad, c10::nullopt);
}

std::vector<at::Tensor> rasterize_pixels_forward_cpu(QRENDER_FORWARD_ARGS,
                                                     const at::Tensor& pixel_ids) {
  return forward_any(means2d, conics, features, opacities, backgrounds, width, height, tile_size,
                     isect_offsets, flatten_ids, num_quantiles, pixel_ids);
}

std::vector<at::Tensor> rasterize_pixels_backward_cpu(QRENDER_BACKWARD_ARGS,
                                                      const at::Tensor& pixel_ids) {
  return backward_any(means2d, conics, features, opacities, backgrounds, width, height,
                      tile_size, isect_offsets, flatten_ids, num_quantiles, out_feat, out_alpha,
                      last_ids, sel_ids, sel_count, grad_feat, grad_alpha, absgrad, pixel_ids);
}

std::vector<at::Tensor> rasterize_query_cpu(QRENDER_FORWARD_ARGS, const at::Tensor& units,
                                            const at::Tensor& proj,
                                            const c10::optional<at::Tensor>& bg_proj) {
  const Layout l = make_layout(means2d, features, width, height, tile_size, isect_offsets,
                               flatten_ids, num_quantiles);
  const int64_t Q = units.size(0);
  auto opts = means2d.options();
  at::Tensor scores = empty_recycled({l.num_cams, height, width, Q}, opts);
  at::Tensor out_alpha = at::empty({l.num_cams, height, width, 1}, opts);
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_query_cpu", [&] {
    const Inputs<scalar_t> in = inputs_of<scalar_t>(means2d, conics, features, opacities,
                                                    backgrounds, isect_offsets, flatten_ids);
    const QueryIn<scalar_t> q{proj.data_ptr<scalar_t>(),
                              bg_proj.has_value() ? bg_proj->data_ptr<scalar_t>() : nullptr,
                              units.data_ptr<scalar_t>(), Q, proj.dim() == 3};
    scalar_t* s = scores.data_ptr<scalar_t>();
    scalar_t* a = out_alpha.data_ptr<scalar_t>();
    for_each_image_pixel<scalar_t>(
        l, in.means2d, in.conics, in.opacities, in.offsets, in.flatten_ids, true,
        [&](const PixelRef<scalar_t>& p, const auto& alphas, scalar_t* acc) {
          query_pixel(l, alphas, in.features, in.flatten_ids, in.backgrounds, q, p, acc, s, a);
        });
  });
  return {scores, out_alpha};
}

}  // namespace qrender
