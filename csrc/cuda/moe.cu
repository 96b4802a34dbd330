// CUDA kernels of the MoE dispatch, one block per token.  rows[t, j] is the expert-sorted row of
// token t's j-th expert, a permutation of [0, N*k): the permute writes every sorted row exactly
// once, the combine gathers a token's k rows and sums them in order j = 0..k-1 (float
// accumulation), and the backward writes each sorted row once.  No atomics anywhere, so every
// result is deterministic and an activation-checkpointing recompute reproduces the forward
// bitwise.  Out-of-range rows trip a device assert; that rows is a permutation is the caller's
// contract (the CPU kernels check it).
#include "launch.cuh"

namespace mythos {
namespace {

template <typename scalar_t>
__global__ void moe_permute_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ rows, int64_t top_k,
                                   int64_t dim, scalar_t* __restrict__ out) {
  const int64_t t = blockIdx.x, count = gridDim.x * top_k;
  for (int64_t j = 0; j < top_k; ++j) {
    const int64_t r = rows[t * top_k + j];
    CUDA_KERNEL_ASSERT(r >= 0 && r < count && "mythos::moe_permute: rows out of range");
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) out[r * dim + c] = x[t * dim + c];
  }
}

template <typename scalar_t>
__global__ void moe_unpermute_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ gate,
                                     const int64_t* __restrict__ rows, int64_t top_k, int64_t dim,
                                     scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t t = blockIdx.x, count = gridDim.x * top_k;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    acc_t sum = 0;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t r = rows[t * top_k + j];
      CUDA_KERNEL_ASSERT(r >= 0 && r < count && "mythos::moe_unpermute: rows out of range");
      sum += (gate ? acc_t(gate[t * top_k + j]) : acc_t(1)) * acc_t(y[r * dim + c]);
    }
    out[t * dim + c] = scalar_t(sum);
  }
}

template <typename scalar_t>
__global__ void moe_unpermute_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                                              const int64_t* __restrict__ rows, const scalar_t* __restrict__ gate,
                                              int64_t top_k, int64_t dim, scalar_t* __restrict__ grad_y,
                                              scalar_t* __restrict__ grad_gate) {
  using acc_t = acc_type<scalar_t>;
  const int64_t t = blockIdx.x, count = gridDim.x * top_k;
  for (int64_t j = 0; j < top_k; ++j) {
    const int64_t r = rows[t * top_k + j];
    CUDA_KERNEL_ASSERT(r >= 0 && r < count && "mythos::moe_unpermute_backward: rows out of range");
    const acc_t g = acc_t(gate[t * top_k + j]);
    acc_t dot = 0;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const acc_t go = acc_t(grad_out[t * dim + c]);
      dot += go * acc_t(y[r * dim + c]);
      grad_y[r * dim + c] = scalar_t(g * go);
    }
    dot = block_sum(dot);
    if (threadIdx.x == 0) grad_gate[t * top_k + j] = scalar_t(dot);
  }
}

at::Tensor moe_permute_cuda(const at::Tensor& x_in, const at::Tensor& rows_in) {
  check_rows("moe_permute", x_in, "x", rows_in);
  TORCH_CHECK(x_in.size(0) == rows_in.size(0), "mythos::moe_permute: x has ", x_in.size(0), " tokens but rows has ",
              rows_in.size(0));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), rows = rows_in.to(at::kLong).contiguous();
  const int64_t num_tokens = rows.size(0), top_k = rows.size(1), dim = x.size(1);
  at::Tensor out = at::empty({num_tokens * top_k, dim}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute_cuda", [&] {
    moe_permute_kernel<scalar_t><<<num_tokens, row_threads(dim), 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), top_k, dim, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor moe_unpermute_cuda(const at::Tensor& y_in, const at::Tensor& rows_in,
                              const std::optional<at::Tensor>& gate_in) {
  check_sorted_rows("moe_unpermute", y_in, rows_in);
  if (gate_in) check_gate("moe_unpermute", y_in, rows_in, *gate_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(), rows = rows_in.to(at::kLong).contiguous();
  const at::Tensor gate = gate_in ? gate_in->contiguous() : at::Tensor();
  const int64_t num_tokens = rows.size(0), top_k = rows.size(1), dim = y.size(1);
  at::Tensor out = at::empty({num_tokens, dim}, y.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_cuda", [&] {
    moe_unpermute_kernel<scalar_t><<<num_tokens, row_threads(dim), 0, current_stream()>>>(
        y.data_ptr<scalar_t>(), gate.defined() ? gate.data_ptr<scalar_t>() : nullptr, rows.data_ptr<int64_t>(),
        top_k, dim, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                                               const at::Tensor& rows_in, const at::Tensor& gate_in) {
  check_sorted_rows("moe_unpermute_backward", y_in, rows_in);
  check_gate("moe_unpermute_backward", y_in, rows_in, gate_in);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == rows_in.size(0) && grad_out_in.size(1) == y_in.size(1),
              "mythos::moe_unpermute_backward: grad_out must be (", rows_in.size(0), ", ", y_in.size(1), "), got ",
              grad_out_in.sizes());
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous().to(y_in.scalar_type()), y = y_in.contiguous(),
                   rows = rows_in.to(at::kLong).contiguous(), gate = gate_in.contiguous();
  const int64_t num_tokens = rows.size(0), top_k = rows.size(1), dim = y.size(1);
  at::Tensor grad_y = at::empty_like(y), grad_gate = at::empty_like(gate);
  if (rows.numel() == 0) return {grad_y, grad_gate};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_backward_cuda", [&] {
    moe_unpermute_backward_kernel<scalar_t><<<num_tokens, row_threads(dim), 0, current_stream()>>>(
        grad_out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), gate.data_ptr<scalar_t>(),
        top_k, dim, grad_y.data_ptr<scalar_t>(), grad_gate.data_ptr<scalar_t>());
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
