// CUDA kernels of the element-wise ops: SwiGLU and rotary embedding, grid-stride loops with
// one read and one write per element.
#include "launch.cuh"

namespace mythos {
namespace {

template <typename scalar_t>
__global__ void swiglu_kernel(const scalar_t* __restrict__ gate, const scalar_t* __restrict__ up, int64_t n,
                              scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t g = acc_t(gate[i]);
    out[i] = scalar_t(g / (acc_t(1) + ::exp(-g)) * acc_t(up[i]));
  }
}

template <typename scalar_t>
__global__ void swiglu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ gate,
                                       const scalar_t* __restrict__ up, int64_t n, scalar_t* __restrict__ grad_gate,
                                       scalar_t* __restrict__ grad_up) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t d = acc_t(grad[i]), g = acc_t(gate[i]);
    const acc_t s = acc_t(1) / (acc_t(1) + ::exp(-g));
    grad_gate[i] = scalar_t(d * acc_t(up[i]) * s * (acc_t(1) + g * (acc_t(1) - s)));
    grad_up[i] = scalar_t(d * g * s);
  }
}

// One thread per rotated pair (row, j); rows are (b, s, h) of x with its own strides.
template <typename scalar_t, bool kInverse>
__global__ void rope_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cos,
                            const scalar_t* __restrict__ sin, int64_t seq, int64_t heads, int64_t half,
                            int64_t stride_b, int64_t stride_s, int64_t stride_h, int64_t pairs,
                            scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < pairs; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = k % half, row = k / half;
    const int64_t h = row % heads, s = (row / heads) % seq, b = row / (heads * seq);
    const scalar_t* xr = x + b * stride_b + s * stride_s + h * stride_h;
    const acc_t c = acc_t(cos[s * half + j]), sn = kInverse ? -acc_t(sin[s * half + j]) : acc_t(sin[s * half + j]);
    const acc_t x1 = acc_t(xr[j]), x2 = acc_t(xr[j + half]);
    out[row * 2 * half + j] = scalar_t(x1 * c - x2 * sn);
    out[row * 2 * half + j + half] = scalar_t(x2 * c + x1 * sn);
  }
}

at::Tensor swiglu_cuda(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu(gate_in, up_in);
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty_like(gate);
  const int64_t n = gate.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_cuda", [&] {
    swiglu_kernel<scalar_t><<<grid_blocks(n), kMaxThreads, 0, current_stream()>>>(
        gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), n, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& gate_in,
                                                        const at::Tensor& up_in) {
  check_swiglu(gate_in, up_in);
  TORCH_CHECK(grad_in.sizes() == gate_in.sizes(), "mythos::swiglu_backward: grad_out has shape ", grad_in.sizes(),
              " but gate has shape ", gate_in.sizes());
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor grad = grad_in.contiguous().to(gate_in.scalar_type()), gate = gate_in.contiguous(),
                   up = up_in.contiguous();
  at::Tensor grad_gate = at::empty_like(gate), grad_up = at::empty_like(up);
  const int64_t n = gate.numel();
  if (n == 0) return {grad_gate, grad_up};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_backward_cuda", [&] {
    swiglu_backward_kernel<scalar_t><<<grid_blocks(n), kMaxThreads, 0, current_stream()>>>(
        grad.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), n,
        grad_gate.data_ptr<scalar_t>(), grad_up.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_gate, grad_up};
}

template <bool kInverse>
at::Tensor rope_cuda(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_rope(x_in, cos_in, sin_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = with_unit_last_stride(x_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t half = x.size(3) / 2, pairs = x.numel() / 2;
  if (pairs == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_rope_cuda", [&] {
    rope_kernel<scalar_t, kInverse><<<grid_blocks(pairs), kMaxThreads, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), x.size(1), x.size(2), half,
        x.stride(0), x.stride(1), x.stride(2), pairs, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor apply_rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_cuda<false>(x, cos, sin);
}

at::Tensor apply_rope_backward_cuda(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_cuda<true>(grad_out, cos, sin);
}

}  // namespace

TORCH_LIBRARY_IMPL(mythos, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
  m.impl("apply_rope", &apply_rope_cuda);
  m.impl("apply_rope_backward", &apply_rope_backward_cuda);
}

}  // namespace mythos
