// The Python module facm_ext._C. It carries no Python functions: importing it loads the shared library, whose
// static initializers register the facm_ext:: operators with the PyTorch dispatcher (see registration.cpp and the
// *_bindings.cpp files). Keeping Python bindings out of the library keeps every .cpp off torch/extension.h.
#include <Python.h>

static struct PyModuleDef facm_ext_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "facm_ext compiled operators (registered in torch.ops.facm_ext)", -1,
                                             nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&facm_ext_module); }
