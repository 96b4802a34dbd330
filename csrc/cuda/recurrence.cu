// CUDA kernels of the recurrence: the LTI injection fused with the first core block's pre-norm, and the ACT step.
// One block per row (the row sums are block reductions); the column gradients of the injection
// (a_bar, loop_emb, weight) go through fixed per-block partial sums, so results are deterministic.
#include "launch.cuh"

namespace mythos {
namespace {

// z = a*h + e + loop (stored, and normalized as stored), out = rmsnorm(z) * w.
template <typename scalar_t, typename acc_t>
__device__ inline acc_t injected(const scalar_t* a, const scalar_t* hr, const scalar_t* er, const scalar_t* loop,
                                 int64_t c) {
  return acc_t(scalar_t(acc_t(a[c]) * acc_t(hr[c]) + acc_t(er[c]) + acc_t(loop[c])));
}

template <typename scalar_t, typename acc_t>
__global__ void inject_rmsnorm_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ e,
                                      const scalar_t* __restrict__ a, const scalar_t* __restrict__ loop,
                                      const scalar_t* __restrict__ w, acc_t eps, int64_t dim,
                                      scalar_t* __restrict__ z, scalar_t* __restrict__ out,
                                      acc_t* __restrict__ rstd) {
  const int64_t row = blockIdx.x;
  const scalar_t *hr = h + row * dim, *er = e + row * dim;
  scalar_t* zrow = z + row * dim;
  acc_t sum_sq = 0;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    const acc_t zc = injected<scalar_t, acc_t>(a, hr, er, loop, c);
    zrow[c] = scalar_t(zc);
    sum_sq += zc * zc;
  }
  const acc_t inv_rms = acc_t(1) / ::sqrt(block_sum(sum_sq) / acc_t(dim) + eps);
  if (threadIdx.x == 0) rstd[row] = inv_rms;
  scalar_t* orow = out + row * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    orow[c] = scalar_t(acc_t(zrow[c]) * inv_rms * acc_t(w[c]));  // each thread rereads its own columns
  }
}

// Block b handles rows [b * rows_per_block, ...) and owns partial[b] (3 x dim): thread t owns
// columns t, t + blockDim, ... of it, so the accumulation needs no atomics.
// grad_z_total = grad_z + rstd * (g*w - n * mean(g*w*n)).
template <typename scalar_t, typename acc_t>
__global__ void inject_rmsnorm_backward_kernel(
    const scalar_t* __restrict__ gz, const scalar_t* __restrict__ g, const scalar_t* __restrict__ h,
    const scalar_t* __restrict__ e, const scalar_t* __restrict__ a, const scalar_t* __restrict__ loop,
    const scalar_t* __restrict__ w, const acc_t* __restrict__ rstd, int64_t rows, int64_t dim,
    int64_t rows_per_block, scalar_t* __restrict__ grad_h, scalar_t* __restrict__ grad_e,
    acc_t* __restrict__ partial) {
  acc_t* sum_a = partial + blockIdx.x * 3 * dim;
  acc_t *sum_loop = sum_a + dim, *sum_w = sum_loop + dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) sum_a[c] = sum_loop[c] = sum_w[c] = acc_t(0);
  const int64_t first = blockIdx.x * rows_per_block, last = min(rows, first + rows_per_block);
  for (int64_t row = first; row < last; ++row) {
    const scalar_t *gzr = gz + row * dim, *gr = g + row * dim, *hr = h + row * dim, *er = e + row * dim;
    const acc_t inv_rms = rstd[row];
    acc_t dot = 0;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const acc_t n = injected<scalar_t, acc_t>(a, hr, er, loop, c) * inv_rms;
      dot += acc_t(gr[c]) * acc_t(w[c]) * n;
    }
    const acc_t mean_dot = block_sum(dot) / acc_t(dim);
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const acc_t hc = acc_t(hr[c]), gc = acc_t(gr[c]);
      const acc_t n = injected<scalar_t, acc_t>(a, hr, er, loop, c) * inv_rms;
      const acc_t gzc = acc_t(gzr[c]) + inv_rms * (gc * acc_t(w[c]) - n * mean_dot);
      grad_e[row * dim + c] = scalar_t(gzc);
      grad_h[row * dim + c] = scalar_t(acc_t(a[c]) * gzc);
      sum_a[c] += gzc * hc;
      sum_loop[c] += gzc;
      sum_w[c] += gc * n;
    }
  }
}

template <typename scalar_t>
__global__ void act_step_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ cum,
                                const scalar_t* __restrict__ acc, const scalar_t* __restrict__ h, scalar_t threshold,
                                bool is_last, int64_t dim, scalar_t* __restrict__ w, scalar_t* __restrict__ new_cum,
                                scalar_t* __restrict__ new_acc) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t wr = act_weight(p[row], cum[row], threshold, is_last).w;
  if (threadIdx.x == 0) {
    w[row] = wr;
    new_cum[row] = scalar_t(acc_t(cum[row]) + acc_t(wr));
  }
  const acc_t wa = acc_t(wr);
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    new_acc[row * dim + c] = scalar_t(acc_t(acc[row * dim + c]) + wa * acc_t(h[row * dim + c]));
  }
}

template <typename scalar_t>
__global__ void act_step_backward_kernel(const scalar_t* __restrict__ grad_w, const scalar_t* __restrict__ grad_cum,
                                         const scalar_t* __restrict__ grad_acc, const scalar_t* __restrict__ p,
                                         const scalar_t* __restrict__ cum, const scalar_t* __restrict__ h,
                                         scalar_t threshold, bool is_last, int64_t dim,
                                         scalar_t* __restrict__ grad_p, scalar_t* __restrict__ grad_cum_in,
                                         scalar_t* __restrict__ grad_h) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const ActWeight<scalar_t> step = act_weight(p[row], cum[row], threshold, is_last);
  const acc_t wr = acc_t(step.w);
  acc_t dot = 0;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    const acc_t ga = acc_t(grad_acc[row * dim + c]);
    dot += ga * acc_t(h[row * dim + c]);
    grad_h[row * dim + c] = scalar_t(wr * ga);
  }
  dot = block_sum(dot);
  if (threadIdx.x == 0) {
    const acc_t total = acc_t(grad_w[row]) + acc_t(grad_cum[row]) + dot;
    grad_p[row] = scalar_t(step.takes_p ? total : acc_t(0));
    grad_cum_in[row] = scalar_t(acc_t(grad_cum[row]) - (step.takes_rest ? total : acc_t(0)));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> inject_rmsnorm_cuda(const at::Tensor& h_in, const at::Tensor& e_in,
                                                                   const at::Tensor& a_in, const at::Tensor& loop_in,
                                                                   const at::Tensor& w_in, double eps) {
  check_inject_rmsnorm(h_in, e_in, a_in, loop_in, w_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), e = e_in.contiguous(), a = a_in.contiguous(),
                   loop = loop_in.contiguous(), w = w_in.contiguous();
  const int64_t dim = h.size(-1), rows = h.numel() / dim;
  at::Tensor z = at::empty_like(h), out = at::empty_like(h);
  at::Tensor rstd = at::empty(h.sizes().slice(0, h.dim() - 1), h.options().dtype(at::toOpMathType(h.scalar_type())));
  if (rows == 0) return {z, out, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "inject_rmsnorm_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    inject_rmsnorm_kernel<scalar_t, acc_t><<<rows, row_threads(dim), 0, current_stream()>>>(
        h.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), loop.data_ptr<scalar_t>(),
        w.data_ptr<scalar_t>(), acc_t(eps), dim, z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        rstd.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {z, out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> inject_rmsnorm_backward_cuda(
    const at::Tensor& gz_in, const at::Tensor& g_in, const at::Tensor& h_in, const at::Tensor& e_in,
    const at::Tensor& a_in, const at::Tensor& loop_in, const at::Tensor& w_in, const at::Tensor& rstd_in) {
  check_inject_rmsnorm(h_in, e_in, a_in, loop_in, w_in);
  TORCH_CHECK(g_in.sizes() == h_in.sizes() && gz_in.sizes() == h_in.sizes(),
              "mythos::inject_rmsnorm_backward: grad_z and grad_out must have the shape of h, ", h_in.sizes());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor gz = gz_in.contiguous().to(h_in.scalar_type()), g = g_in.contiguous().to(h_in.scalar_type()),
                   h = h_in.contiguous(), e = e_in.contiguous(), a = a_in.contiguous(),
                   loop = loop_in.contiguous(), w = w_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t dim = h.size(-1), rows = h.numel() / dim;
  // Enough blocks to fill the GPU a few times over; each sums its rows' column gradients.
  const int64_t sms = multiprocessor_count(h.device());
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * sms));
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  at::Tensor grad_h = at::empty_like(h), grad_e = at::empty_like(h);
  at::Tensor partial = at::empty({blocks, 3, dim}, rstd.options());  // zeroed by the kernel
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "inject_rmsnorm_backward_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      inject_rmsnorm_backward_kernel<scalar_t, acc_t>
          <<<blocks, row_threads(dim), 0, current_stream()>>>(
              gz.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
              a.data_ptr<scalar_t>(), loop.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(),
              rows, dim, rows_per_block, grad_h.data_ptr<scalar_t>(), grad_e.data_ptr<scalar_t>(),
              partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor sums = partial.sum(0).to(h.scalar_type());
  return {grad_h, grad_e, sums[0], sums[1], sums[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_step_cuda(const at::Tensor& p_in, const at::Tensor& cum_in,
                                                             const at::Tensor& acc_in, const at::Tensor& h_in,
                                                             double threshold, bool is_last) {
  check_act_step(p_in, cum_in, acc_in, h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor p = p_in.contiguous(), cum = cum_in.contiguous(), acc = acc_in.contiguous(),
                   h = h_in.contiguous();
  const int64_t dim = h.size(-1), rows = p.numel();
  at::Tensor w = at::empty_like(p), new_cum = at::empty_like(cum), new_acc = at::empty_like(acc);
  if (rows == 0) return {w, new_cum, new_acc};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "act_step_cuda", [&] {
    act_step_kernel<scalar_t><<<rows, row_threads(dim), 0, current_stream()>>>(
        p.data_ptr<scalar_t>(), cum.data_ptr<scalar_t>(), acc.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
        scalar_t(threshold), is_last, dim, w.data_ptr<scalar_t>(), new_cum.data_ptr<scalar_t>(),
        new_acc.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {w, new_cum, new_acc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_step_backward_cuda(
    const at::Tensor& gw_in, const at::Tensor& gcum_in, const at::Tensor& gacc_in, const at::Tensor& p_in,
    const at::Tensor& cum_in, const at::Tensor& h_in, double threshold, bool is_last) {
  check_act_step(p_in, cum_in, gacc_in, h_in);
  TORCH_CHECK(gw_in.sizes() == p_in.sizes() && gcum_in.sizes() == p_in.sizes(),
              "mythos::act_step_backward: grad_w and grad_cum must have the shape of p, ", p_in.sizes());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor gw = gw_in.contiguous(), gcum = gcum_in.contiguous(), gacc = gacc_in.contiguous(),
                   p = p_in.contiguous(), cum = cum_in.contiguous(), h = h_in.contiguous();
  const int64_t dim = h.size(-1), rows = p.numel();
  at::Tensor grad_p = at::empty_like(p), grad_cum = at::empty_like(cum), grad_h = at::empty_like(h);
  if (rows == 0) return {grad_p, grad_cum, grad_h};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "act_step_backward_cuda", [&] {
    act_step_backward_kernel<scalar_t><<<rows, row_threads(dim), 0, current_stream()>>>(
        gw.data_ptr<scalar_t>(), gcum.data_ptr<scalar_t>(), gacc.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
        cum.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), scalar_t(threshold), is_last, dim,
        grad_p.data_ptr<scalar_t>(), grad_cum.data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_p, grad_cum, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(mythos, CUDA, m) {
  m.impl("inject_rmsnorm", &inject_rmsnorm_cuda);
  m.impl("inject_rmsnorm_backward", &inject_rmsnorm_backward_cuda);
  m.impl("act_step", &act_step_cuda);
  m.impl("act_step_backward", &act_step_backward_cuda);
}

}  // namespace mythos
