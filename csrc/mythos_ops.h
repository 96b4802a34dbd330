// Shared by the CPU and CUDA implementations of the `mythos::` operators: input checks
// (one message per mistake, naming the op and the argument).  The math each op must match is
// mythos_scale/kernels/reference.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace mythos {

// Accumulation type: float for half/bfloat16/float, double for double.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

inline void check_same(const char* op, const at::Tensor& ref, const char* ref_name,
                       const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "mythos::", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "mythos::", op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "mythos::", op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_vector(const char* op, const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "mythos::", op, ": ", name,
              " must have shape (", size, ",), got ", t.sizes());
}

// h, e_inj: (..., D); a_bar, loop_emb, weight: (D,); all one dtype and device.
inline void check_inject_rmsnorm(const at::Tensor& h, const at::Tensor& e_inj,
                                 const at::Tensor& a_bar, const at::Tensor& loop_emb,
                                 const at::Tensor& weight) {
  const char* op = "inject_rmsnorm";
  check_floating(op, h, "h");
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) > 0, "mythos::inject_rmsnorm: h must be (..., D) with D > 0, got ",
              h.sizes());
  TORCH_CHECK(e_inj.sizes() == h.sizes(), "mythos::inject_rmsnorm: e_inj has shape ", e_inj.sizes(),
              " but h has shape ", h.sizes());
  const int64_t dim = h.size(-1);
  check_vector(op, a_bar, "a_bar", dim);
  check_vector(op, loop_emb, "loop_emb", dim);
  check_vector(op, weight, "weight", dim);
  check_same(op, h, "h", e_inj, "e_inj");
  check_same(op, h, "h", a_bar, "a_bar");
  check_same(op, h, "h", loop_emb, "loop_emb");
  check_same(op, h, "h", weight, "weight");
}

// p, cum: (...,); acc, h: (..., D).
inline void check_act_step(const at::Tensor& p, const at::Tensor& cum, const at::Tensor& acc,
                           const at::Tensor& h) {
  const char* op = "act_step";
  check_floating(op, h, "h");
  TORCH_CHECK(h.dim() >= 1, "mythos::act_step: h must be (..., D), got a scalar");
  TORCH_CHECK(acc.sizes() == h.sizes(), "mythos::act_step: acc has shape ", acc.sizes(),
              " but h has shape ", h.sizes());
  const auto lead = h.sizes().slice(0, h.dim() - 1);
  TORCH_CHECK(p.sizes() == lead, "mythos::act_step: p must have shape ", lead, " (h without its last dim), got ",
              p.sizes());
  TORCH_CHECK(cum.sizes() == lead, "mythos::act_step: cum must have shape ", lead,
              " (h without its last dim), got ", cum.sizes());
  check_same(op, h, "h", acc, "acc");
  check_same(op, h, "h", p, "p");
  check_same(op, h, "h", cum, "cum");
}

// MoE dispatch: `t` holds token rows (N, D) or expert-sorted rows (N*k, D); rows: (N, k) integer,
// rows[t, j] = the expert-sorted row of token t's j-th expert (a permutation of [0, N*k)).
inline void check_rows(const char* op, const at::Tensor& t, const char* t_name, const at::Tensor& rows) {
  TORCH_CHECK(t.dim() == 2, "mythos::", op, ": ", t_name, " must be 2-D (rows, D), got ", t.sizes());
  TORCH_CHECK(rows.dim() == 2, "mythos::", op, ": rows must be 2-D (tokens, top_k), got ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt,
              "mythos::", op, ": rows must be int64 or int32, got ", rows.scalar_type());
  TORCH_CHECK(rows.device() == t.device(), "mythos::", op, ": rows is on ", rows.device(), " but ", t_name,
              " is on ", t.device());
  check_floating(op, t, t_name);
}

// gate: (N, k) like rows, in y's dtype and device.
inline void check_gate(const char* op, const at::Tensor& y, const at::Tensor& rows, const at::Tensor& gate) {
  TORCH_CHECK(gate.sizes() == rows.sizes(), "mythos::", op, ": gate must have the shape of rows ", rows.sizes(),
              ", got ", gate.sizes());
  check_same(op, y, "y", gate, "gate");
}

// y: (N*k, D) expert-sorted rows for the (N, k) rows.
inline void check_sorted_rows(const char* op, const at::Tensor& y, const at::Tensor& rows) {
  check_rows(op, y, "y", rows);
  TORCH_CHECK(y.size(0) == rows.numel(), "mythos::", op, ": y has ", y.size(0), " rows but rows has ",
              rows.size(0), " x ", rows.size(1), " = ", rows.numel(), " entries");
}

// gate, up: same shape, dtype and device.
inline void check_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_floating("swiglu", gate, "gate");
  TORCH_CHECK(gate.sizes() == up.sizes(), "mythos::swiglu: gate has shape ", gate.sizes(), " but up has shape ",
              up.sizes());
  check_same("swiglu", gate, "gate", up, "up");
}

// x: (B, S, H, R) with R even; cos, sin: (S, R/2).
inline void check_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_floating("apply_rope", x, "x");
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "mythos::apply_rope: x must be (B, S, H, R) with R even, got ",
              x.sizes());
  const std::vector<int64_t> expected{x.size(1), x.size(3) / 2};
  TORCH_CHECK(cos.sizes() == at::IntArrayRef(expected), "mythos::apply_rope: cos must have shape ",
              at::IntArrayRef(expected), " (S, R/2), got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == at::IntArrayRef(expected), "mythos::apply_rope: sin must have shape ",
              at::IntArrayRef(expected), " (S, R/2), got ", sin.sizes());
  check_same("apply_rope", x, "x", cos, "cos");
  check_same("apply_rope", x, "x", sin, "sin");
}

// ACT: the step weight of one position, computed in the tensors' own dtype as the reference does.
// A running position (cum < 1) takes p, or the remainder 1 - cum when it halts now.
template <typename scalar_t>
struct ActWeight {
  scalar_t w;
  bool takes_p;     // d w / d p = 1
  bool takes_rest;  // d w / d cum = -1
};

template <typename scalar_t>
C10_HOST_DEVICE inline ActWeight<scalar_t> act_weight(scalar_t p, scalar_t cum, scalar_t threshold, bool is_last) {
  using acc_t = acc_type<scalar_t>;
  const bool running = acc_t(cum) < acc_t(1);
  const bool halts = acc_t(scalar_t(acc_t(cum) + acc_t(p))) >= acc_t(threshold) || is_last;
  const bool takes_rest = running && halts, takes_p = running && !halts;
  return {takes_rest ? scalar_t(acc_t(1) - acc_t(cum)) : (takes_p ? p : scalar_t(0)), takes_p, takes_rest};
}

// at::parallel_for grain for row loops: about 32K elements per task.
inline int64_t cpu_row_grain(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

// x viewed as (B, S, H, R) with a unit last stride: the kernels take the other strides as they are,
// so a slice such as q[..., nope:] needs no copy.
inline at::Tensor with_unit_last_stride(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

}  // namespace mythos
