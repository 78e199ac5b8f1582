// The Python module object of the extension `cbp_kernels._C`. The ops themselves register
// with the dispatcher from their own files (TORCH_LIBRARY_FRAGMENT "cbp_kernels_ext" in
// csrc/cpu/*.cpp and csrc/cuda/*.cu); importing this module loads them all.
#include <Python.h>

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
