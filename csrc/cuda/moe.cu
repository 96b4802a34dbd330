// CUDA kernels of the MoE dispatch.  Permute: one block per expert-sorted row.  Un-permute: one
// block per token, summing its gate-weighted expert rows (token-major order from token_rows(), so
// there are no atomics and the sum order is fixed).  Out-of-range indices trip a device assert.
#include "launch.cuh"

namespace mythos {
namespace {

template <typename scalar_t>
__global__ void moe_permute_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ index,
                                   int64_t num_tokens, int64_t dim, scalar_t* __restrict__ out) {
  const int64_t i = blockIdx.x, t = index[i];
  CUDA_KERNEL_ASSERT(t >= 0 && t < num_tokens && "mythos::moe_permute: token_index out of range");
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) out[i * dim + c] = x[t * dim + c];
}

template <typename scalar_t>
__global__ void moe_unpermute_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ gate,
                                     const int64_t* __restrict__ order, const int64_t* __restrict__ row_start,
                                     int64_t num_tokens, int64_t rows, int64_t dim, scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t t = blockIdx.x;
  if (t == 0 && threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT(row_start[0] == 0 && row_start[num_tokens] == rows &&
                       "mythos::moe_unpermute: token_index has entries outside [0, num_tokens)");
  }
  const int64_t first = row_start[t], last = row_start[t + 1];
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    acc_t sum = 0;
    for (int64_t j = first; j < last; ++j) {
      const int64_t i = order[j];
      sum += (gate ? acc_t(gate[i]) : acc_t(1)) * acc_t(y[i * dim + c]);
    }
    out[t * dim + c] = scalar_t(sum);
  }
}

template <typename scalar_t>
__global__ void moe_unpermute_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                                              const int64_t* __restrict__ index, const scalar_t* __restrict__ gate,
                                              int64_t num_tokens, int64_t dim, scalar_t* __restrict__ grad_y,
                                              scalar_t* __restrict__ grad_gate) {
  using acc_t = acc_type<scalar_t>;
  const int64_t i = blockIdx.x, t = index[i];
  CUDA_KERNEL_ASSERT(t >= 0 && t < num_tokens && "mythos::moe_unpermute_backward: token_index out of range");
  const acc_t g = acc_t(gate[i]);
  acc_t dot = 0;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    const acc_t go = acc_t(grad_out[t * dim + c]);
    dot += go * acc_t(y[i * dim + c]);
    grad_y[i * dim + c] = scalar_t(g * go);
  }
  dot = block_sum(dot);
  if (threadIdx.x == 0) grad_gate[i] = scalar_t(dot);
}

at::Tensor moe_permute_cuda(const at::Tensor& x_in, const at::Tensor& token_index) {
  check_token_index("moe_permute", x_in, "x", token_index);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), index = token_index.to(at::kLong).contiguous();
  const int64_t dim = x.size(1), rows = index.size(0);
  at::Tensor out = at::empty({rows, dim}, x.options());
  if (rows == 0 || dim == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute_cuda", [&] {
    moe_permute_kernel<scalar_t><<<rows, row_threads(dim), 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), x.size(0), dim, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor moe_unpermute_cuda(const at::Tensor& y_in, const at::Tensor& token_index,
                              const std::optional<at::Tensor>& gate_in, int64_t num_tokens) {
  check_token_index("moe_unpermute", y_in, "y", token_index);
  TORCH_CHECK(token_index.size(0) == y_in.size(0), "mythos::moe_unpermute: token_index has ", token_index.size(0),
              " entries but y has ", y_in.size(0), " rows");
  TORCH_CHECK(num_tokens >= 0, "mythos::moe_unpermute: num_tokens must be >= 0, got ", num_tokens);
  if (gate_in) check_gate("moe_unpermute", y_in, token_index, *gate_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor gate = gate_in ? gate_in->contiguous() : at::Tensor();
  const int64_t dim = y.size(1), rows = y.size(0);
  at::Tensor out = at::empty({num_tokens, dim}, y.options());
  if (num_tokens == 0 || dim == 0) return out;
  const TokenRows token_major = token_rows(token_index, num_tokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_cuda", [&] {
    moe_unpermute_kernel<scalar_t><<<num_tokens, row_threads(dim), 0, current_stream()>>>(
        y.data_ptr<scalar_t>(), gate.defined() ? gate.data_ptr<scalar_t>() : nullptr,
        token_major.order.data_ptr<int64_t>(), token_major.row_start.data_ptr<int64_t>(), num_tokens, rows, dim,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                                               const at::Tensor& token_index,
                                                               const at::Tensor& gate_in) {
  check_token_index("moe_unpermute_backward", y_in, "y", token_index);
  check_gate("moe_unpermute_backward", y_in, token_index, gate_in);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(1) == y_in.size(1),
              "mythos::moe_unpermute_backward: grad_out must be (num_tokens, ", y_in.size(1), "), got ",
              grad_out_in.sizes());
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous().to(y_in.scalar_type()), y = y_in.contiguous(),
                   index = token_index.to(at::kLong).contiguous(), gate = gate_in.contiguous();
  const int64_t dim = y.size(1), rows = y.size(0);
  at::Tensor grad_y = at::empty_like(y), grad_gate = at::empty_like(gate);
  if (rows == 0) return {grad_y, grad_gate};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_backward_cuda", [&] {
    moe_unpermute_backward_kernel<scalar_t><<<rows, row_threads(dim), 0, current_stream()>>>(
        grad_out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), gate.data_ptr<scalar_t>(),
        grad_out.size(0), dim, grad_y.data_ptr<scalar_t>(), grad_gate.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_y, grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(mythos, CUDA, m) {
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_cuda);
}

}  // namespace mythos
