// pgnas_fast._C: the native backends' entry points (design.md layer 6).
//   _C.cpu   the C++/OpenMP `cpu` backend (csrc/cpu/), always built
//   _C.cuda  the `cuda` backend (kernels/*.cu via csrc/cuda/), built where torch has CUDA and nvcc
// pgnas_fast/cpu_backend.py and pgnas_fast/cuda_backend.py wrap them into the backend interface.
#include <torch/extension.h>

namespace pgnas {
void register_cpu_ops(pybind11::module_& m);
#ifdef PGNAS_WITH_CUDA
void register_cuda_ops(pybind11::module_& m);
#endif
}  // namespace pgnas

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pgnas_fast native backends: `cpu` (C++/OpenMP) and, where built, `cuda`.";
  pybind11::module_ cpu = m.def_submodule("cpu");
  pgnas::register_cpu_ops(cpu);
#ifdef PGNAS_WITH_CUDA
  pybind11::module_ cuda = m.def_submodule("cuda");
  pgnas::register_cuda_ops(cuda);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("openmp") = _OPENMP;
#else
  m.attr("openmp") = 0;
#endif
}
