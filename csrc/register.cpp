// The extension `cbp_kernels._C`: its Python module object, and the schema of every op of the
// `cbp_kernels_ext` library, inferred from the entry points declared once in
// csrc/common/<op>_api.h (csrc/common/op_schema.h). The kernels register from their own files
// (TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu); importing this module loads
// them all.
#include <Python.h>
#include <torch/library.h>

#include "common/batch_norm_stats_api.h"
#include "common/bitconv_api.h"
#include "common/bitpack_api.h"
#include "common/constraint_api.h"
#include "common/conv_input_grad_api.h"
#include "common/conv_weight_grad_api.h"
#include "common/max_pool_api.h"
#include "common/neuron_api.h"
#include "common/plane_sum_api.h"
#include "common/sigmoid_quant_api.h"

TORCH_LIBRARY(cbp_kernels_ext, m) {
  cbp::define<cbp::BatchNormStatsOp>(m);
  cbp::define<cbp::BitpackOp>(m);
  cbp::define<cbp::BitunpackOp>(m);
  cbp::define<cbp::Bitconv2dOp>(m);
  cbp::define<cbp::Bitconv2dLifOp>(m);
  cbp::define<cbp::ConstraintPassOp>(m);
  cbp::define<cbp::ConstraintQuantizeOp>(m);
  cbp::define<cbp::ConstraintMultiplierStepOp>(m);
  cbp::define<cbp::ConvInputGradOp>(m);
  cbp::define<cbp::Conv2dIntegerInputOp>(m);
  cbp::define<cbp::ConvWeightGradOp>(m);
  cbp::define<cbp::MaxPool2d3x3s2Op>(m);
  cbp::define<cbp::MaxPool2d3x3s2BackwardOp>(m);
  cbp::define<cbp::NeuronForwardOp>(m);
  cbp::define<cbp::NeuronBackwardOp>(m);
  cbp::define<cbp::PlaneSumNchwOp>(m);
  cbp::define<cbp::SigmoidQuantForwardOp>(m);
  cbp::define<cbp::SigmoidQuantBackwardOp>(m);
}

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
