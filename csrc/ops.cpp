// Schemas of the `mythos::` operators.  Kernels are registered per device in csrc/cpu and
// csrc/cuda; autograd and the fake (meta) implementations in mythos_scale/kernels/fused.py.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(mythos, m) {
  // LTI injection and the first core block's pre-norm of it: z = a_bar * h + e_inj + loop_emb,
  // out = rmsnorm(z) * weight, and the per-row 1/rms (float32, or float64 for float64 inputs) kept
  // for the backward.
  m.def("inject_rmsnorm(Tensor h, Tensor e_inj, Tensor a_bar, Tensor loop_emb, Tensor weight, float eps)"
        " -> (Tensor z, Tensor out, Tensor rstd)");
  m.def("inject_rmsnorm_backward(Tensor grad_z, Tensor grad_out, Tensor h, Tensor e_inj, Tensor a_bar,"
        " Tensor loop_emb, Tensor weight, Tensor rstd) -> (Tensor grad_h, Tensor grad_e_inj, Tensor grad_a_bar,"
        " Tensor grad_loop_emb, Tensor grad_weight)");
  // One ACT step: (w, cum + w, acc + w * h).
  m.def("act_step(Tensor p, Tensor cum, Tensor acc, Tensor h, float threshold, bool is_last)"
        " -> (Tensor w, Tensor new_cum, Tensor new_acc)");
  m.def("act_step_backward(Tensor grad_w, Tensor grad_cum, Tensor grad_acc, Tensor p, Tensor cum, Tensor h,"
        " float threshold, bool is_last) -> (Tensor grad_p, Tensor grad_cum_in, Tensor grad_h)");
  // MoE dispatch.  rows (N, k): the expert-sorted row of each token's j-th expert, a permutation of
  // [0, N*k).  permute: out[rows[t, j]] = x[t]; unpermute: out[t] = sum_j gate[t, j] * y[rows[t, j]]
  // (gate-less: weights 1), summed in order j = 0..k-1.
  m.def("moe_permute(Tensor x, Tensor rows) -> Tensor");
  m.def("moe_unpermute(Tensor y, Tensor rows, Tensor? gate) -> Tensor");
  m.def("moe_unpermute_backward(Tensor grad_out, Tensor y, Tensor rows, Tensor gate)"
        " -> (Tensor grad_y, Tensor grad_gate)");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
  // Rotary embedding (rotate-half); the backward is the inverse rotation.
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("apply_rope_backward(Tensor grad_out, Tensor cos, Tensor sin) -> Tensor");
}

// `import mythos_scale._C` loads this library (and so registers the operators); the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
