// The op surface of a native backend, named once: csrc/cpu/ops.cpp and csrc/cuda/ops.cpp each define
// these functions (same names and arguments, in their own anonymous namespace) and register them
// with PGNAS_DEFINE_OPS(m), so the two modules cannot drift apart in names, argument names or
// defaults. The Python wrappers (pgnas_fast/cpu_backend.py, cuda_backend.py) call them by keyword.
#pragma once

#include <pybind11/pybind11.h>

#define PGNAS_DEFINE_OPS(m)                                                                                    \
  do {                                                                                                       \
    using namespace pybind11::literals;                                                                      \
    (m).def("philox_uniform_out", &philox_uniform_out, "out"_a, "seed"_a, "stream"_a, "offset"_a,            \
            "Fill float32 [n] `out` with u of elements offset .. offset + n - 1.");                          \
    (m).def("gate_keep", &gate_keep, "p_logit"_a, "batch"_a, "seed"_a, "stream"_a, "tau"_a, "mode"_a,        \
            "offset"_a = 0);                                                                                 \
    (m).def("candidate_keep", &candidate_keep, "p_logit"_a, "candidates"_a, "seed"_a, "layer"_a, "domain"_a); \
    (m).def("gate_keep_backward", &gate_keep_backward, "grad_keep"_a, "keep"_a, "tau"_a, "mode"_a);          \
    (m).def("gated_apply", &gated_apply, "x"_a, "p_logit"_a, "seed"_a, "stream"_a, "tau"_a, "mode"_a,        \
            "offset"_a = 0);                                                                                 \
    (m).def("gated_apply_backward", &gated_apply_backward, "grad"_a, "x"_a, "p_logit"_a, "seed"_a, "stream"_a, \
            "tau"_a, "mode"_a, "offset"_a = 0);                                                              \
    (m).def("affine_relu_gate", &affine_relu_gate, "x"_a, "scale"_a, "shift"_a, "p_logit"_a, "seed"_a,       \
            "stream"_a, "tau"_a, "mode"_a, "offset"_a);                                                      \
    (m).def("affine_relu_gate_backward", &affine_relu_gate_backward, "grad"_a, "x"_a, "scale"_a, "shift"_a,  \
            "p_logit"_a, "seed"_a, "stream"_a, "tau"_a, "mode"_a, "offset"_a);                               \
    (m).def("gated_copies", &gated_copies, "x"_a, "p_logits"_a, "seed"_a, "streams"_a, "tau"_a, "mode"_a,    \
            "offset"_a, "relu"_a);                                                                           \
    (m).def("gated_copies_backward", &gated_copies_backward, "grad"_a, "x"_a, "p_logits"_a, "seed"_a,        \
            "streams"_a, "tau"_a, "mode"_a, "offset"_a, "relu"_a);                                           \
    (m).def("branch_combine", &branch_combine, "ys"_a, "weights"_a, "skip"_a);                               \
    (m).def("branch_combine_backward", &branch_combine_backward, "grad"_a, "ys"_a, "weights"_a,              \
            "backward_weights"_a);                                                                           \
    (m).def("regularizer", &regularizer, "weights"_a, "p_logits"_a, "weight_reg"_a, "drop_reg"_a,            \
            "n_train"_a);                                                                                    \
    (m).def("regularizer_backward", &regularizer_backward, "grad"_a, "weights"_a, "p_logits"_a,              \
            "weight_reg"_a, "drop_reg"_a, "n_train"_a);                                                      \
    (m).def("gaussian_noise", &gaussian_noise, "mu"_a, "var"_a, "seed"_a, "stream"_a, "offset"_a);           \
    (m).def("gaussian_noise_backward", &gaussian_noise_backward, "grad"_a, "var"_a, "seed"_a, "stream"_a,    \
            "offset"_a);                                                                                     \
    (m).def("gaussian_kl", &gaussian_kl, "log_alphas"_a, "weights_per_channel"_a, "n_train"_a);              \
    (m).def("gaussian_kl_backward", &gaussian_kl_backward, "grad"_a, "log_alphas"_a, "weights_per_channel"_a, \
            "n_train"_a);                                                                                    \
  } while (0)
