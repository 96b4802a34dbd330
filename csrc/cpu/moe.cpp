// CPU kernels of the MoE dispatch.  rows[t, j] is the expert-sorted row of token t's j-th expert,
// a permutation of [0, N*k): the permute writes every sorted row exactly once, and the combine
// gathers each token's k rows and sums them in order j = 0..k-1 (float accumulation, one rounding),
// so both are deterministic and a recompute reproduces them bitwise.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../mythos_ops.h"

namespace mythos {
namespace {

// rows as int64, checked to be a permutation of [0, rows.numel()) (a serial pass: O(N*k) bytes).
at::Tensor permutation_rows(const char* op, const at::Tensor& rows_in) {
  const at::Tensor rows = rows_in.to(at::kLong).contiguous();
  const int64_t count = rows.numel();
  const int64_t* rp = rows.data_ptr<int64_t>();
  std::vector<uint8_t> seen(count, 0);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t r = rp[i];
    TORCH_CHECK(r >= 0 && r < count, "mythos::", op, ": rows[", i / rows.size(1), ", ", i % rows.size(1), "] = ", r,
                " is outside [0, ", count, ")");
    TORCH_CHECK(!seen[r], "mythos::", op, ": rows is not a permutation: row ", r, " appears twice");
    seen[r] = 1;
  }
  return rows;
}

at::Tensor moe_permute_cpu(const at::Tensor& x_in, const at::Tensor& rows_in) {
  check_rows("moe_permute", x_in, "x", rows_in);
  TORCH_CHECK(x_in.size(0) == rows_in.size(0), "mythos::moe_permute: x has ", x_in.size(0), " tokens but rows has ",
              rows_in.size(0));
  const at::Tensor x = x_in.contiguous(), rows = permutation_rows("moe_permute", rows_in);
  const int64_t num_tokens = rows.size(0), top_k = rows.size(1), dim = x.size(1);
  at::Tensor out = at::empty({num_tokens * top_k, dim}, x.options());
  const int64_t* rp = rows.data_ptr<int64_t>();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = dim * x.element_size();
  at::parallel_for(0, num_tokens, cpu_row_grain(dim * top_k), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < top_k; ++j) std::memcpy(op + rp[t * top_k + j] * row_bytes, xp + t * row_bytes, row_bytes);
    }
  });
  return out;
}

at::Tensor moe_unpermute_cpu(const at::Tensor& y_in, const at::Tensor& rows_in,
                             const std::optional<at::Tensor>& gate_in) {
  check_sorted_rows("moe_unpermute", y_in, rows_in);
  if (gate_in) check_gate("moe_unpermute", y_in, rows_in, *gate_in);
  const at::Tensor y = y_in.contiguous(), rows = rows_in.to(at::kLong).contiguous();
  const at::Tensor gate = gate_in ? gate_in->contiguous() : at::Tensor();
  const int64_t num_tokens = rows.size(0), top_k = rows.size(1), dim = y.size(1), count = rows.numel();
  at::Tensor out = at::empty({num_tokens, dim}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gate.defined() ? gate.data_ptr<scalar_t>() : nullptr;
    const int64_t* rp = rows.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, cpu_row_grain(dim * top_k), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(dim);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t r = rp[t * top_k + j];
          TORCH_CHECK(r >= 0 && r < count, "mythos::moe_unpermute: rows[", t, ", ", j, "] = ", r, " is outside [0, ",
                      count, ")");
          const acc_t g = gp ? acc_t(gp[t * top_k + j]) : acc_t(1);
          const scalar_t* yr = yp + r * dim;
          _Pragma("omp simd")
          for (int64_t c = 0; c < dim; ++c) sum[c] += g * acc_t(yr[c]);
        }
        scalar_t* orow = op + t * dim;
        _Pragma("omp simd")
        for (int64_t c = 0; c < dim; ++c) orow[c] = scalar_t(sum[c]);
      }
    });
  });
  return out;
}

// grad_y[rows[t, j]] = gate[t, j] * grad_out[t];  grad_gate[t, j] = <grad_out[t], y[rows[t, j]]>.
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                                              const at::Tensor& rows_in, const at::Tensor& gate_in) {
  check_sorted_rows("moe_unpermute_backward", y_in, rows_in);
  check_gate("moe_unpermute_backward", y_in, rows_in, gate_in);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == rows_in.size(0) && grad_out_in.size(1) == y_in.size(1),
              "mythos::moe_unpermute_backward: grad_out must be (", rows_in.size(0), ", ", y_in.size(1), "), got ",
              grad_out_in.sizes());
  const at::Tensor grad_out = grad_out_in.contiguous().to(y_in.scalar_type()), y = y_in.contiguous(),
                   rows = permutation_rows("moe_unpermute_backward", rows_in), gate = gate_in.contiguous();
  const int64_t num_tokens = rows.size(0), top_k = rows.size(1), dim = y.size(1);
  at::Tensor grad_y = at::empty_like(y), grad_gate = at::empty_like(gate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *gop = grad_out.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>(), *gp = gate.data_ptr<scalar_t>();
    const int64_t* rp = rows.data_ptr<int64_t>();
    scalar_t *gyp = grad_y.data_ptr<scalar_t>(), *ggp = grad_gate.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, cpu_row_grain(dim * top_k), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* gr = gop + t * dim;
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t r = rp[t * top_k + j];
          const scalar_t* yr = yp + r * dim;
          scalar_t* gyr = gyp + r * dim;
          const acc_t g = acc_t(gp[t * top_k + j]);
          acc_t dot = 0;
          _Pragma("omp simd reduction(+ : dot)")
          for (int64_t c = 0; c < dim; ++c) {
            dot += acc_t(gr[c]) * acc_t(yr[c]);
            gyr[c] = scalar_t(g * acc_t(gr[c]));
          }
          ggp[t * top_k + j] = scalar_t(dot);
        }
      }
    });
  });
  return {grad_y, grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(mythos, CPU, m) {
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_cpu);
}

}  // namespace mythos
