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

namespace qrender {
namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16_rne(float f) {
  return c10::BFloat16(f).x;
}

inline uint16_t float_to_bf16_stochastic(float f, uint32_t noise) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) return c10::BFloat16(f).x;  // inf / nan
  return static_cast<uint16_t>((bits + (noise & 0xffffu)) >> 16);
}

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
      for (int64_t i = 0; i < c; ++i) out[i] = p[i];
      break;
    }
    case at::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + row * c;
      for (int64_t i = 0; i < c; ++i) out[i] = bf16_to_float(p[i]);
      break;
    }
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
    case at::kFloat: {
      float* p = static_cast<float*>(base) + row * c;
      for (int64_t i = 0; i < c; ++i) p[i] = in[i];
      break;
    }
    case at::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(base) + row * c;
      if (stochastic) {
        uint64_t state = splitmix64(seed ^ (static_cast<uint64_t>(row) * 0xd1b54a32d192ed03ull));
        for (int64_t i = 0; i < c; i += 2) {
          state = splitmix64(state);
          p[i] = float_to_bf16_stochastic(in[i], static_cast<uint32_t>(state));
          if (i + 1 < c) p[i + 1] = float_to_bf16_stochastic(in[i + 1], static_cast<uint32_t>(state >> 32));
        }
      } else {
        for (int64_t i = 0; i < c; ++i) p[i] = float_to_bf16_rne(in[i]);
      }
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
    for (int64_t j = begin; j < end; ++j) {
      const int64_t row = ids[j];
      const int32_t step = ++steps[row];
      const double bias1 = 1 - std::pow(beta1, step);
      const float step_size = static_cast<float>(lr / bias1);
      const float bias2_sqrt = static_cast<float>(std::sqrt(1 - std::pow(beta2, step)));
      load_row(gt, g_base, j, c, g.data());
      load_row(mt, m_base, row, c, m.data());
      load_row(pt, p_base, row, c, p.data());
      if (rowwise) {
        float* vr = static_cast<float*>(v_base) + row;
        double sq = 0;
        for (int64_t k = 0; k < c; ++k) sq += static_cast<double>(g[k]) * g[k];
        *vr = *vr * b2 + one_b2 * static_cast<float>(sq / c);
        const float denom = std::sqrt(*vr) / bias2_sqrt + eps_f;
        for (int64_t k = 0; k < c; ++k) {
          m[k] = m[k] * b1 + one_b1 * g[k];
          p[k] = p[k] + (-step_size) * m[k] / denom;
        }
      } else {
        load_row(vt, v_base, row, c, v.data());
        for (int64_t k = 0; k < c; ++k) {
          m[k] = m[k] * b1 + one_b1 * g[k];
          v[k] = v[k] * b2 + one_b2 * g[k] * g[k];
          const float denom = std::sqrt(v[k]) / bias2_sqrt + eps_f;
          p[k] = p[k] + (-step_size) * m[k] / denom;
        }
        store_row(vt, v_base, row, c, v.data(), false, 0);
      }
      store_row(mt, m_base, row, c, m.data(), false, 0);
      store_row(pt, p_base, row, c, p.data(), stochastic, static_cast<uint64_t>(seed) ^ static_cast<uint64_t>(step));
    }
  });
}

}  // namespace qrender
