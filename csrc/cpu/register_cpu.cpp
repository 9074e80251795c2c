// The CPU backend's kernels for every resnet_fused op.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bn_act", &resnet_fused::cpu::conv_bn_act);
  m.impl("conv_bn_act_into_residual", &resnet_fused::cpu::conv_bn_act_into_residual);
  m.impl("conv_bn_act_chain", &resnet_fused::cpu::conv_bn_act_chain);
  m.impl("conv_bn_act_chain_into_residual", &resnet_fused::cpu::conv_bn_act_chain_into_residual);
  m.impl("bn_act", &resnet_fused::cpu::bn_act);
  m.impl("bn_act_backward", &resnet_fused::cpu::bn_act_backward);
  m.impl("add_act", &resnet_fused::cpu::add_act);
  m.impl("scale_add_act", &resnet_fused::cpu::scale_add_act);
  m.impl("scale_add_act_backward", &resnet_fused::cpu::scale_add_act_backward);
  m.impl("max_pool2d", &resnet_fused::cpu::max_pool2d);
  m.impl("conv_stats", &resnet_fused::cpu::conv_stats);
  m.impl("bn_add_relu", &resnet_fused::cpu::bn_add_relu);
}

// A weight prepacked for oneDNN is an MKLDNN tensor, and that dispatch key outranks CPU: the same kernel
// takes it (it passes the packed weight to oneDNN).
TORCH_LIBRARY_IMPL(resnet_fused, MkldnnCPU, m) {
  m.impl("conv_bn_act", &resnet_fused::cpu::conv_bn_act);
  m.impl("conv_bn_act_into_residual", &resnet_fused::cpu::conv_bn_act_into_residual);
  m.impl("conv_bn_act_chain", &resnet_fused::cpu::conv_bn_act_chain);
  m.impl("conv_bn_act_chain_into_residual", &resnet_fused::cpu::conv_bn_act_chain_into_residual);
}
