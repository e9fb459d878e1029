// Row-sparse Adam step (issue 27; qrender_ns/method/sparse_adam.py): updates only the rows a step touched, in one
// pass per row (the table, its moments and its gradient read once and written once), with a step count per row.
// Float32 arithmetic whatever the storage (float32, bfloat16, float16); bfloat16/float16 outputs round to nearest
// or, for bfloat16 with `stochastic`, stochastically (unbiased, a per-row hash of `seed` as the random source).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common.h"
#include "bf16.h"

namespace qrender {

// The per-row loops, vectorised (AVX2 clones where the CPU has them) and bit-for-bit what the scalar loops
// computed: no FMA contraction (the torch step, tests/test_sparse_features.py, rounds every product), the
// bfloat16 round to nearest written out as c10::BFloat16 does it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
QR_CLONES void widen_bf16(float* __restrict out, const uint16_t* __restrict in, int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    const uint32_t bits = static_cast<uint32_t>(in[i]) << 16;
    std::memcpy(out + i, &bits, 4);
  }
}

// Round to nearest even; NaN -> 0x7fc0 (c10::BFloat16's).
QR_CLONES void narrow_bf16_rne(uint16_t* __restrict out, const float* __restrict in, int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    uint32_t bits;
    std::memcpy(&bits, in + i, 4);
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    out[i] = static_cast<uint16_t>(nan ? 0x7fc0u : rounded);
  }
}
#pragma GCC diagnostic pop

namespace {

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// Stochastic rounding: + 16 random low bits, truncate (unbiased); inf / NaN as round to nearest. The noise is a
// hash of (key, channel) (lowbias32), so a row's rounding depends on the step's seed and the row only.
QR_CLONES void narrow_bf16_stochastic(uint16_t* __restrict out, const float* __restrict in, int64_t c,
                                      uint32_t key) {
  for (int64_t i = 0; i < c; ++i) {
    uint32_t h = key ^ (static_cast<uint32_t>(i) * 0x9e3779b1u);
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    uint32_t bits;
    std::memcpy(&bits, in + i, 4);
    const bool special = (bits & 0x7f800000u) == 0x7f800000u;
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    const uint32_t random = (bits + (h & 0xffffu)) >> 16;
    out[i] = static_cast<uint16_t>(special ? (nan ? 0x7fc0u : bits >> 16) : random);
  }
}

// sum g^2 in double (exact products; four partial sums)
QR_CLONES double sum_squares(const float* __restrict g, int64_t c) {
  double a[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= c; i += 4)
    for (int k = 0; k < 4; ++k) a[k] += static_cast<double>(g[i + k]) * g[i + k];
  for (; i < c; ++i) a[0] += static_cast<double>(g[i]) * g[i];
  return (a[0] + a[1]) + (a[2] + a[3]);
}

QR_CLONES QR_NO_CONTRACT void adam_rowwise(float* __restrict p, float* __restrict m, const float* __restrict g,
                                           int64_t c, float b1, float one_b1, float neg_step, float denom) {
  for (int64_t k = 0; k < c; ++k) {
    m[k] = m[k] * b1 + one_b1 * g[k];
    p[k] = p[k] + neg_step * m[k] / denom;
  }
}

QR_CLONES QR_NO_CONTRACT void adam_elementwise(float* __restrict p, float* __restrict m, float* __restrict v,
                                               const float* __restrict g, int64_t c, float b1, float one_b1,
                                               float b2, float one_b2, float neg_step, float bias2_sqrt,
                                               float eps) {
  for (int64_t k = 0; k < c; ++k) {
    m[k] = m[k] * b1 + one_b1 * g[k];
    v[k] = v[k] * b2 + one_b2 * g[k] * g[k];
    const float denom = std::sqrt(v[k]) / bias2_sqrt + eps;
    p[k] = p[k] + neg_step * m[k] / denom;
  }
}
#pragma GCC diagnostic pop

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void load_row(const at::ScalarType t, const void* base, int64_t row, int64_t c, float* out) {
  switch (t) {
    case at::kFloat: {
      const float* p = static_cast<const float*>(base) + row * c;
      std::memcpy(out, p, c * sizeof(float));
      break;
    }
    case at::kBFloat16:
      widen_bf16(out, static_cast<const uint16_t*>(base) + row * c, c);
      break;
    case at::kHalf: {
      const c10::Half* p = static_cast<const c10::Half*>(base) + row * c;
      for (int64_t i = 0; i < c; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "row_sparse_adam: unsupported dtype");
  }
}

void store_row(const at::ScalarType t, void* base, int64_t row, int64_t c, const float* in, bool stochastic,
               uint64_t seed) {
  switch (t) {
    case at::kFloat:
      std::memcpy(static_cast<float*>(base) + row * c, in, c * sizeof(float));
      break;
    case at::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(base) + row * c;
      if (stochastic)
        narrow_bf16_stochastic(p, in, c, static_cast<uint32_t>(
            splitmix64(seed ^ (static_cast<uint64_t>(row) * 0xd1b54a32d192ed03ull))));
      else
        narrow_bf16_rne(p, in, c);
      break;
    }
    case at::kHalf: {
      c10::Half* p = static_cast<c10::Half*>(base) + row * c;
      for (int64_t i = 0; i < c; ++i) p[i] = c10::Half(in[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "row_sparse_adam: unsupported dtype");
  }
}

}  // namespace

// param [N, C], rows int64 [R] (unique), grad [R, C], exp_avg [N, C], exp_avg_sq [N, C] or [N] (row-wise: the
// mean of g^2 over the row, float32), row_step int32 [N]; all contiguous CPU tensors, updated in place.
void row_sparse_adam_cpu(at::Tensor param, const at::Tensor& rows, const at::Tensor& grad, at::Tensor exp_avg,
                         at::Tensor exp_avg_sq, at::Tensor row_step, double lr, double beta1, double beta2,
                         double eps, bool stochastic, int64_t seed) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous() && !param.is_cuda(), "param: contiguous CPU [N, C]");
  const int64_t n = param.size(0), c = param.size(1), r = rows.numel();
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows: contiguous int64");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == r && grad.size(1) == c && grad.is_contiguous(), "grad: [R, C]");
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg.is_contiguous(), "exp_avg: [N, C]");
  const bool rowwise = exp_avg_sq.dim() == 1;
  TORCH_CHECK(exp_avg_sq.size(0) == n && exp_avg_sq.is_contiguous() && (!rowwise || exp_avg_sq.scalar_type() == at::kFloat)
              && (rowwise || exp_avg_sq.sizes() == param.sizes()), "exp_avg_sq: [N, C] or float32 [N]");
  TORCH_CHECK(row_step.scalar_type() == at::kInt && row_step.numel() == n && row_step.is_contiguous(), "row_step: int32 [N]");
  const int64_t* ids = rows.data_ptr<int64_t>();
  int32_t* steps = row_step.data_ptr<int32_t>();
  void* p_base = param.data_ptr();
  const void* g_base = grad.data_ptr();
  void* m_base = exp_avg.data_ptr();
  void* v_base = exp_avg_sq.data_ptr();
  const auto pt = param.scalar_type(), gt = grad.scalar_type(), mt = exp_avg.scalar_type(), vt = exp_avg_sq.scalar_type();
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float one_b1 = static_cast<float>(1 - beta1), one_b2 = static_cast<float>(1 - beta2);
  const float eps_f = static_cast<float>(eps);
  for (int64_t i = 0; i < r; ++i) TORCH_CHECK(ids[i] >= 0 && ids[i] < n, "row_sparse_adam: row id out of range");
  at::parallel_for(0, r, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> g(c), m(c), v(rowwise ? 1 : c), p(c);
    const int64_t p_row = c * param.element_size(), m_row = c * exp_avg.element_size();
    for (int64_t j = begin; j < end; ++j) {
      const int64_t row = ids[j];
      if (j + 1 < end) {  // the next row's table and moment lines, while this one computes
        prefetch_bytes(static_cast<const char*>(p_base) + ids[j + 1] * p_row, p_row);
        prefetch_bytes(static_cast<const char*>(m_base) + ids[j + 1] * m_row, m_row);
      }
      const int32_t step = ++steps[row];
      const double bias1 = 1 - std::pow(beta1, step);
      const float step_size = static_cast<float>(lr / bias1);
      const float bias2_sqrt = static_cast<float>(std::sqrt(1 - std::pow(beta2, step)));
      load_row(gt, g_base, j, c, g.data());
      load_row(mt, m_base, row, c, m.data());
      load_row(pt, p_base, row, c, p.data());
      if (rowwise) {
        float* vr = static_cast<float*>(v_base) + row;
        *vr = *vr * b2 + one_b2 * static_cast<float>(sum_squares(g.data(), c) / c);
        const float denom = std::sqrt(*vr) / bias2_sqrt + eps_f;
        adam_rowwise(p.data(), m.data(), g.data(), c, b1, one_b1, -step_size, denom);
      } else {
        load_row(vt, v_base, row, c, v.data());
        adam_elementwise(p.data(), m.data(), v.data(), g.data(), c, b1, one_b1, b2, one_b2, -step_size,
                         bias2_sqrt, eps_f);
        store_row(vt, v_base, row, c, v.data(), false, 0);
      }
      store_row(mt, m_base, row, c, m.data(), false, 0);
      store_row(pt, p_base, row, c, p.data(), stochastic, static_cast<uint64_t>(seed) ^ static_cast<uint64_t>(step));
    }
  });
}

}  // namespace qrender
