// The blend of a row-sparse sampled-pixel render (qrender_ns/render/rows.py), fused: the rows are read straight
// from the table in its storage dtype and accumulated in float32, so no [R, C] float32 copy of the touched rows
// (nor its [R, C] gradient) is made in a step; the gradient of the table is written once per touched row, in the
// table's dtype, from a segment sum over the picks of that row (no atomics, a fixed order).
//
//   out[p]          = sum_k w[p, k] table[touched[slot[p, k]]]           (slot < 0: no pick)
//   grad_rows[s]    = sum_{(p, k): slot[p, k] = s} w[p, k] grad_out[p]    (in the table's dtype, round to nearest)
//   grad_w[p, k]    = grad_out[p] . table[touched[slot[p, k]]]
//
// Same values as torch's table[touched].float() + F.embedding_bag(slot, ..., per_sample_weights=w) up to the
// order of the float32 sums (tests/test_sparse_features.py compares them, values and gradients).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../common.h"
#include "bf16.h"

namespace qrender {
namespace {

// madvise(MADV_HUGEPAGE) on the whole 4 KiB pages of a fresh buffer (as qrender_ns/utils/memory.py does for the
// table): tens of MB a step otherwise fault in page by page.
void advise_huge_pages(void* data, int64_t bytes) {
#ifdef __linux__
  if (bytes < (int64_t(2) << 20)) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (start + 4095) & ~uintptr_t(4095), last = (start + bytes) & ~uintptr_t(4095);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

#define QR_ROW_OPS(NAME, T, LOAD)                                                           \
  QR_CLONES void axpy_##NAME(float* __restrict acc, float w, const T* __restrict r, int64_t c) { \
    for (int64_t i = 0; i < c; ++i) acc[i] += w * LOAD(r[i]);                               \
  }                                                                                         \
  QR_CLONES float dot_##NAME(const float* __restrict g, const T* __restrict r, int64_t c) { \
    float s = 0;                                                                            \
    for (int64_t i = 0; i < c; ++i) s += g[i] * LOAD(r[i]);                                 \
    return s;                                                                               \
  }

inline float load_f32(float x) { return x; }
inline float load_bf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float load_f16(c10::Half h) { return static_cast<float>(h); }

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
QR_ROW_OPS(f32, float, load_f32)
QR_ROW_OPS(bf16, uint16_t, load_bf16)
#pragma GCC diagnostic pop
QR_ROW_OPS(f16, c10::Half, load_f16)

// One table row of any supported storage dtype, read as float32.
struct TableRows {
  at::ScalarType dtype;
  const void* base;
  int64_t channels, row_bytes;

  void prefetch(int64_t row) const { prefetch_bytes(static_cast<const char*>(base) + row * row_bytes, row_bytes); }
  void axpy(float* acc, float w, int64_t row) const {
    const int64_t off = row * channels;
    switch (dtype) {
      case at::kFloat: return axpy_f32(acc, w, static_cast<const float*>(base) + off, channels);
      case at::kBFloat16: return axpy_bf16(acc, w, static_cast<const uint16_t*>(base) + off, channels);
      default: return axpy_f16(acc, w, static_cast<const c10::Half*>(base) + off, channels);
    }
  }
  float dot(const float* g, int64_t row) const {
    const int64_t off = row * channels;
    switch (dtype) {
      case at::kFloat: return dot_f32(g, static_cast<const float*>(base) + off, channels);
      case at::kBFloat16: return dot_bf16(g, static_cast<const uint16_t*>(base) + off, channels);
      default: return dot_f16(g, static_cast<const c10::Half*>(base) + off, channels);
    }
  }
};

TableRows table_rows(const at::Tensor& table) {
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous() && table.device().is_cpu(),
              "row_blend: the table must be a contiguous CPU [N, C] tensor");
  const auto t = table.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "row_blend: the table must be float32, bfloat16 or float16");
  return {t, table.data_ptr(), table.size(1), table.size(1) * table.element_size()};
}

void check_picks(const at::Tensor& touched, const at::Tensor& slot, const at::Tensor& weights) {
  TORCH_CHECK(touched.scalar_type() == at::kLong && touched.dim() == 1 && touched.is_contiguous(),
              "row_blend: touched must be contiguous int64 [R]");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.dim() == 2 && slot.is_contiguous(),
              "row_blend: slot must be contiguous int64 [P, K]");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.sizes() == slot.sizes() && weights.is_contiguous(),
              "row_blend: weights must be contiguous float32 [P, K]");
}

}  // namespace

at::Tensor row_blend_forward_cpu(const at::Tensor& table, const at::Tensor& touched, const at::Tensor& slot,
                                 const at::Tensor& weights) {
  const TableRows rows = table_rows(table);
  check_picks(touched, slot, weights);
  const int64_t P = slot.size(0), K = slot.size(1), C = rows.channels, R = touched.size(0);
  const int64_t* ids = touched.data_ptr<int64_t>();
  const int64_t* s = slot.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  for (int64_t i = 0; i < P * K; ++i) TORCH_CHECK(s[i] < R, "row_blend: slot out of range");
  at::Tensor out = at::zeros({P, C}, table.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (p + 1 < end)  // the next pixel's rows, while this one blends
        for (int64_t k = 0; k < K; ++k)
          if (s[(p + 1) * K + k] >= 0) rows.prefetch(ids[s[(p + 1) * K + k]]);
      for (int64_t k = 0; k < K; ++k)
        if (s[p * K + k] >= 0) rows.axpy(o + p * C, w[p * K + k], ids[s[p * K + k]]);
    }
  });
  return out;
}

std::vector<at::Tensor> row_blend_backward_cpu(const at::Tensor& table, const at::Tensor& touched,
                                               const at::Tensor& slot, const at::Tensor& weights,
                                               const at::Tensor& grad_out, bool need_weights) {
  const TableRows rows = table_rows(table);
  check_picks(touched, slot, weights);
  const int64_t P = slot.size(0), K = slot.size(1), C = rows.channels, R = touched.size(0);
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous() && grad_out.dim() == 2 &&
                  grad_out.size(0) == P && grad_out.size(1) == C,
              "row_blend: grad_out must be contiguous float32 [P, C]");
  const int64_t* ids = touched.data_ptr<int64_t>();
  const int64_t* s = slot.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  const float* g = grad_out.data_ptr<float>();
  // the picks of each touched row, in (p, k) order: a counting sort by slot
  std::vector<int64_t> start(R + 1, 0), picks;
  for (int64_t i = 0; i < P * K; ++i) {
    TORCH_CHECK(s[i] < R, "row_blend: slot out of range");
    if (s[i] >= 0) ++start[s[i] + 1];
  }
  for (int64_t r = 0; r < R; ++r) start[r + 1] += start[r];
  picks.resize(start[R]);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < P * K; ++i)
      if (s[i] >= 0) picks[next[s[i]]++] = i;
  }
  at::Tensor grad_rows = at::empty({R, C}, table.options());
  advise_huge_pages(grad_rows.data_ptr(), grad_rows.nbytes());  // fresh pages every step: fault them in 2 MiB
  const auto dtype = rows.dtype;
  void* gr = grad_rows.data_ptr();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = start[r]; j < start[r + 1]; ++j) {
        const int64_t i = picks[j];
        axpy_f32(acc.data(), w[i], g + (i / K) * C, C);
      }
      if (dtype == at::kFloat) {
        std::copy(acc.begin(), acc.end(), static_cast<float*>(gr) + r * C);
      } else if (dtype == at::kBFloat16) {
        narrow_bf16_rne(static_cast<uint16_t*>(gr) + r * C, acc.data(), C);
      } else {
        c10::Half* dst = static_cast<c10::Half*>(gr) + r * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = c10::Half(acc[c]);
      }
    }
  });
  at::Tensor grad_w;
  if (need_weights) {
    grad_w = at::zeros({P, K}, weights.options());
    float* gw = grad_w.data_ptr<float>();
    at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        if (p + 1 < end)
          for (int64_t k = 0; k < K; ++k)
            if (s[(p + 1) * K + k] >= 0) rows.prefetch(ids[s[(p + 1) * K + k]]);
        for (int64_t k = 0; k < K; ++k)
          if (s[p * K + k] >= 0) gw[p * K + k] = rows.dot(g + p * C, ids[s[p * K + k]]);
      }
    });
  }
  return {grad_rows, grad_w};
}

}  // namespace qrender
