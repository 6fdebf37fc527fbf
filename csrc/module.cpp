// The Python module `taskrouting._C`: importing it loads this library, whose static initialisers
// register the CPU (and, when built, CUDA) kernels against the schemas defined in
// taskrouting/ops/schemas.py.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "taskrouting compiled kernels", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
