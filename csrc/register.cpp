// The Python module object of the extension `cbp_kernels._C`. The ops register with the
// dispatcher from their own files: each csrc/cpu/<op>.cpp defines its schemas
// (TORCH_LIBRARY_FRAGMENT(cbp_kernels_ext)) and its CPU kernels (TORCH_LIBRARY_IMPL(..., CPU)),
// each csrc/cuda/<op>.cu only its CUDA kernels (TORCH_LIBRARY_IMPL(..., CUDA)); importing this
// module loads them all.
#include <Python.h>

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
