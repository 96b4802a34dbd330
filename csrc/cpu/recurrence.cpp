// CPU kernels of the recurrence: the LTI injection fused with the first core block's pre-norm, and the ACT step.
// One pass over each row; rows are split across threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <vector>

#include "../mythos_ops.h"

namespace mythos {
namespace {

// Rows per block of the column-gradient partial sums (grad a_bar / loop_emb / weight): a fixed
// block size keeps the summation order independent of the thread count.
constexpr int64_t kRowsPerBlock = 64;

std::tuple<at::Tensor, at::Tensor, at::Tensor> inject_rmsnorm_cpu(const at::Tensor& h_in, const at::Tensor& e_in,
                                                                  const at::Tensor& a_in, const at::Tensor& loop_in,
                                                                  const at::Tensor& w_in, double eps) {
  check_inject_rmsnorm(h_in, e_in, a_in, loop_in, w_in);
  const at::Tensor h = h_in.contiguous(), e = e_in.contiguous(), a = a_in.contiguous(),
                   loop = loop_in.contiguous(), w = w_in.contiguous();
  const int64_t dim = h.size(-1), rows = h.numel() / dim;
  at::Tensor z = at::empty_like(h), out = at::empty_like(h);
  at::Tensor rstd = at::empty(h.sizes().slice(0, h.dim() - 1), h.options().dtype(at::toOpMathType(h.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "inject_rmsnorm_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *hp = h.data_ptr<scalar_t>(), *ep = e.data_ptr<scalar_t>(), *ap = a.data_ptr<scalar_t>(),
                   *lp = loop.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t *zp = z.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, rows, cpu_row_grain(dim), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> zrow(dim);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t *hr = hp + r * dim, *er = ep + r * dim;
        scalar_t* zr = zp + r * dim;
        acc_t sum_sq = 0;
        _Pragma("omp simd reduction(+ : sum_sq)")
        for (int64_t c = 0; c < dim; ++c) {
          // The norm sees z as stored (rounded to scalar_t), exactly like the reference.
          const acc_t zc = acc_t(scalar_t(acc_t(ap[c]) * acc_t(hr[c]) + acc_t(er[c]) + acc_t(lp[c])));
          zrow[c] = zc;
          zr[c] = scalar_t(zc);
          sum_sq += zc * zc;
        }
        const acc_t inv_rms = acc_t(1) / std::sqrt(sum_sq / acc_t(dim) + acc_t(eps));
        rp[r] = inv_rms;
        scalar_t* orow = op + r * dim;
        _Pragma("omp simd")
        for (int64_t c = 0; c < dim; ++c) orow[c] = scalar_t(zrow[c] * inv_rms * acc_t(wp[c]));
      }
    });
  });
  return {z, out, rstd};
}

// z = a*h + e + loop (an output itself: the block's residual stream), n = z * rstd, out = n * w.
// grad_z_total = grad_z + rstd * (g*w - n * mean(g*w*n)); grad_h = a * grad_z_total; grad_e = grad_z_total;
// column sums: grad_a = sum(grad_z_total * h), grad_loop = sum(grad_z_total), grad_w = sum(g * n).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> inject_rmsnorm_backward_cpu(
    const at::Tensor& gz_in, const at::Tensor& g_in, const at::Tensor& h_in, const at::Tensor& e_in,
    const at::Tensor& a_in, const at::Tensor& loop_in, const at::Tensor& w_in, const at::Tensor& rstd_in) {
  check_inject_rmsnorm(h_in, e_in, a_in, loop_in, w_in);
  TORCH_CHECK(g_in.sizes() == h_in.sizes() && gz_in.sizes() == h_in.sizes(),
              "mythos::inject_rmsnorm_backward: grad_z and grad_out must have the shape of h, ", h_in.sizes());
  const at::Tensor gz = gz_in.contiguous().to(h_in.scalar_type()), g = g_in.contiguous().to(h_in.scalar_type()),
                   h = h_in.contiguous(), e = e_in.contiguous(), a = a_in.contiguous(),
                   loop = loop_in.contiguous(), w = w_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t dim = h.size(-1), rows = h.numel() / dim;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  at::Tensor grad_h = at::empty_like(h), grad_e = at::empty_like(h);
  at::Tensor partial = at::zeros({std::max<int64_t>(blocks, 1), 3, dim}, rstd.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "inject_rmsnorm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *gzp = gz.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>(),
                   *ep = e.data_ptr<scalar_t>(), *ap = a.data_ptr<scalar_t>(), *lp = loop.data_ptr<scalar_t>(),
                   *wp = w.data_ptr<scalar_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    scalar_t *ghp = grad_h.data_ptr<scalar_t>(), *gep = grad_e.data_ptr<scalar_t>();
    acc_t* pp = partial.data_ptr<acc_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<acc_t> n(dim), gw(dim);
      for (int64_t b = block_begin; b < block_end; ++b) {
        acc_t *sum_a = pp + b * 3 * dim, *sum_loop = sum_a + dim, *sum_w = sum_loop + dim;
        for (int64_t r = b * kRowsPerBlock; r < std::min(rows, (b + 1) * kRowsPerBlock); ++r) {
          const scalar_t *gzr = gzp + r * dim, *gr = gp + r * dim, *hr = hp + r * dim, *er = ep + r * dim;
          const acc_t inv_rms = rp[r];
          acc_t dot = 0;
          _Pragma("omp simd reduction(+ : dot)")
          for (int64_t c = 0; c < dim; ++c) {
            const acc_t zc = acc_t(scalar_t(acc_t(ap[c]) * acc_t(hr[c]) + acc_t(er[c]) + acc_t(lp[c])));
            const acc_t nc = zc * inv_rms;
            const acc_t gwc = acc_t(gr[c]) * acc_t(wp[c]);
            n[c] = nc;
            gw[c] = gwc;
            dot += gwc * nc;
          }
          const acc_t mean_dot = dot / acc_t(dim);
          scalar_t *ghr = ghp + r * dim, *ger = gep + r * dim;
          _Pragma("omp simd")
          for (int64_t c = 0; c < dim; ++c) {
            const acc_t gzc = acc_t(gzr[c]) + inv_rms * (gw[c] - n[c] * mean_dot);
            ger[c] = scalar_t(gzc);
            ghr[c] = scalar_t(acc_t(ap[c]) * gzc);
            sum_a[c] += gzc * acc_t(hr[c]);
            sum_loop[c] += gzc;
            sum_w[c] += acc_t(gr[c]) * n[c];
          }
        }
      }
    });
  });
  const at::Tensor sums = partial.sum(0).to(h.scalar_type());
  return {grad_h, grad_e, sums[0], sums[1], sums[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_step_cpu(const at::Tensor& p_in, const at::Tensor& cum_in,
                                                            const at::Tensor& acc_in, const at::Tensor& h_in,
                                                            double threshold, bool is_last) {
  check_act_step(p_in, cum_in, acc_in, h_in);
  const at::Tensor p = p_in.contiguous(), cum = cum_in.contiguous(), acc = acc_in.contiguous(),
                   h = h_in.contiguous();
  const int64_t dim = h.size(-1), rows = p.numel();
  at::Tensor w = at::empty_like(p), new_cum = at::empty_like(cum), new_acc = at::empty_like(acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "act_step_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *pp = p.data_ptr<scalar_t>(), *cp = cum.data_ptr<scalar_t>(), *ap = acc.data_ptr<scalar_t>(),
                   *hp = h.data_ptr<scalar_t>();
    scalar_t *wp = w.data_ptr<scalar_t>(), *ncp = new_cum.data_ptr<scalar_t>(), *nap = new_acc.data_ptr<scalar_t>();
    const scalar_t thr = scalar_t(threshold);
    at::parallel_for(0, rows, cpu_row_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t wr = act_weight(pp[r], cp[r], thr, is_last).w;
        wp[r] = wr;
        ncp[r] = scalar_t(acc_t(cp[r]) + acc_t(wr));
        const acc_t wa = acc_t(wr);
        const scalar_t *ar = ap + r * dim, *hr = hp + r * dim;
        scalar_t* nar = nap + r * dim;
        _Pragma("omp simd")
        for (int64_t c = 0; c < dim; ++c) nar[c] = scalar_t(acc_t(ar[c]) + wa * acc_t(hr[c]));
      }
    });
  });
  return {w, new_cum, new_acc};
}

// With G = grad_w + grad_new_cum + sum_d(grad_acc * h):  grad_p = G where the step took p;
// grad_cum = grad_new_cum - G where it took the remainder 1 - cum; grad_h = w * grad_acc.
std::tuple<at::Tensor, at::Tensor, at::Tensor> act_step_backward_cpu(
    const at::Tensor& gw_in, const at::Tensor& gcum_in, const at::Tensor& gacc_in, const at::Tensor& p_in,
    const at::Tensor& cum_in, const at::Tensor& h_in, double threshold, bool is_last) {
  check_act_step(p_in, cum_in, gacc_in, h_in);
  const at::Tensor gw = gw_in.contiguous(), gcum = gcum_in.contiguous(), gacc = gacc_in.contiguous(),
                   p = p_in.contiguous(), cum = cum_in.contiguous(), h = h_in.contiguous();
  TORCH_CHECK(gw.sizes() == p.sizes() && gcum.sizes() == p.sizes(),
              "mythos::act_step_backward: grad_w and grad_cum must have the shape of p, ", p.sizes());
  const int64_t dim = h.size(-1), rows = p.numel();
  at::Tensor grad_p = at::empty_like(p), grad_cum = at::empty_like(cum), grad_h = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "act_step_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *gwp = gw.data_ptr<scalar_t>(), *gcp = gcum.data_ptr<scalar_t>(),
                   *gap = gacc.data_ptr<scalar_t>(), *pp = p.data_ptr<scalar_t>(), *cp = cum.data_ptr<scalar_t>(),
                   *hp = h.data_ptr<scalar_t>();
    scalar_t *gpp = grad_p.data_ptr<scalar_t>(), *gcum_out = grad_cum.data_ptr<scalar_t>(),
             *ghp = grad_h.data_ptr<scalar_t>();
    const scalar_t thr = scalar_t(threshold);
    at::parallel_for(0, rows, cpu_row_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const ActWeight<scalar_t> step = act_weight(pp[r], cp[r], thr, is_last);
        const acc_t wr = acc_t(step.w);
        const scalar_t *gar = gap + r * dim, *hr = hp + r * dim;
        scalar_t* ghr = ghp + r * dim;
        acc_t dot = 0;
        _Pragma("omp simd reduction(+ : dot)")
        for (int64_t c = 0; c < dim; ++c) {
          dot += acc_t(gar[c]) * acc_t(hr[c]);
          ghr[c] = scalar_t(wr * acc_t(gar[c]));
        }
        const acc_t total = acc_t(gwp[r]) + acc_t(gcp[r]) + dot;
        gpp[r] = scalar_t(step.takes_p ? total : acc_t(0));
        gcum_out[r] = scalar_t(acc_t(gcp[r]) - (step.takes_rest ? total : acc_t(0)));
      }
    });
  });
  return {grad_p, grad_cum, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(mythos, CPU, m) {
  m.impl("inject_rmsnorm", &inject_rmsnorm_cpu);
  m.impl("inject_rmsnorm_backward", &inject_rmsnorm_backward_cpu);
  m.impl("act_step", &act_step_cpu);
  m.impl("act_step_backward", &act_step_backward_cpu);
}

}  // namespace mythos
