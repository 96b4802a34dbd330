// CPU kernels of the MoE dispatch: gather token rows into expert order, and scatter expert
// outputs back to their tokens weighted by the gates (a per-token gather, so no write races).
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../mythos_ops.h"

namespace mythos {
namespace {

at::Tensor moe_permute_cpu(const at::Tensor& x_in, const at::Tensor& token_index_in) {
  check_token_index("moe_permute", x_in, "x", token_index_in);
  const at::Tensor x = x_in.contiguous(), index = token_index_in.to(at::kLong).contiguous();
  const int64_t num_tokens = x.size(0), dim = x.size(1), rows = index.size(0);
  at::Tensor out = at::empty({rows, dim}, x.options());
  const int64_t* ip = index.data_ptr<int64_t>();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = dim * x.element_size();
  at::parallel_for(0, rows, cpu_row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = ip[i];
      TORCH_CHECK(t >= 0 && t < num_tokens, "mythos::moe_permute: token_index[", i, "] = ", t,
                  " is out of range for x with ", num_tokens, " rows");
      std::memcpy(op + i * row_bytes, xp + t * row_bytes, row_bytes);
    }
  });
  return out;
}

at::Tensor moe_unpermute_cpu(const at::Tensor& y_in, const at::Tensor& token_index,
                             const std::optional<at::Tensor>& gate_in, int64_t num_tokens) {
  check_token_index("moe_unpermute", y_in, "y", token_index);
  TORCH_CHECK(token_index.size(0) == y_in.size(0), "mythos::moe_unpermute: token_index has ", token_index.size(0),
              " entries but y has ", y_in.size(0), " rows");
  TORCH_CHECK(num_tokens >= 0, "mythos::moe_unpermute: num_tokens must be >= 0, got ", num_tokens);
  if (gate_in) check_gate("moe_unpermute", y_in, token_index, *gate_in);
  const at::Tensor y = y_in.contiguous();
  const int64_t dim = y.size(1), rows = y.size(0);
  const TokenRows token_major = token_rows(token_index, num_tokens);
  TORCH_CHECK(token_major.row_start[0].item<int64_t>() == 0 && token_major.row_start[num_tokens].item<int64_t>() == rows,
              "mythos::moe_unpermute: token_index has entries outside [0, num_tokens=", num_tokens, ")");
  at::Tensor out = at::empty({num_tokens, dim}, y.options());
  const at::Tensor gate = gate_in ? gate_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gate.defined() ? gate.data_ptr<scalar_t>() : nullptr;
    const int64_t *order = token_major.order.data_ptr<int64_t>(), *start = token_major.row_start.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, cpu_row_grain(dim), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(dim);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t j = start[t]; j < start[t + 1]; ++j) {
          const int64_t i = order[j];
          const acc_t g = gp ? acc_t(gp[i]) : acc_t(1);
          const scalar_t* yr = yp + i * dim;
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

// grad_y[i] = gate[i] * grad_out[token_index[i]];  grad_gate[i] = <grad_out[token_index[i]], y[i]>.
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                                              const at::Tensor& token_index_in,
                                                              const at::Tensor& gate_in) {
  check_token_index("moe_unpermute_backward", y_in, "y", token_index_in);
  check_gate("moe_unpermute_backward", y_in, token_index_in, gate_in);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(1) == y_in.size(1),
              "mythos::moe_unpermute_backward: grad_out must be (num_tokens, ", y_in.size(1), "), got ",
              grad_out_in.sizes());
  const at::Tensor grad_out = grad_out_in.contiguous().to(y_in.scalar_type()), y = y_in.contiguous(),
                   index = token_index_in.to(at::kLong).contiguous(), gate = gate_in.contiguous();
  const int64_t num_tokens = grad_out.size(0), dim = y.size(1), rows = y.size(0);
  at::Tensor grad_y = at::empty_like(y), grad_gate = at::empty_like(gate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *gop = grad_out.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>(), *gp = gate.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    scalar_t *gyp = grad_y.data_ptr<scalar_t>(), *ggp = grad_gate.data_ptr<scalar_t>();
    at::parallel_for(0, rows, cpu_row_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = ip[i];
        TORCH_CHECK(t >= 0 && t < num_tokens, "mythos::moe_unpermute_backward: token_index[", i, "] = ", t,
                    " is out of range for ", num_tokens, " tokens");
        const scalar_t *gr = gop + t * dim, *yr = yp + i * dim;
        scalar_t* gyr = gyp + i * dim;
        const acc_t g = acc_t(gp[i]);
        acc_t dot = 0;
        _Pragma("omp simd reduction(+ : dot)")
        for (int64_t c = 0; c < dim; ++c) {
          dot += acc_t(gr[c]) * acc_t(yr[c]);
          gyr[c] = scalar_t(g * acc_t(gr[c]));
        }
        ggp[i] = scalar_t(dot);
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
