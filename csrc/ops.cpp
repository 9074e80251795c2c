// Every schema of the resnet_fused namespace, defined once. Backends register their kernels in their
// own files with TORCH_LIBRARY_IMPL (cpu/*.cpp, cuda/register_cuda.cpp); the fake kernels and the
// autograd formulas live in Python (resnet_fused/ops/), except the eager training ops' C++ autograd nodes
// (bn_act_autograd.cpp, conv_training.cpp, recomputed_bn_relu.cpp: CompositeImplicitAutograd kernels).
#include <torch/library.h>

TORCH_LIBRARY(resnet_fused, m) {
  // out = act(conv2d(x, weight) + bias[c] + residual); bias is usually a folded BatchNorm.
  m.def(
      "conv_bn_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  // The same, written into the residual's buffer (residual = act(conv2d(x, weight) + bias[c] + residual)), for
  // a caller that owns the residual and needs no gradient: a ResNet's blocks in inference save its copy.
  m.def(
      "conv_bn_act_into_residual(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu) -> ()");
  // conv_bn_act steps in inference as one call (a block's main path, or a module's single step): y =
  // conv_bn_act(y, weights[i], biases[i], relu=true) for every convolution but the last, which adds the residual
  // (when given) and applies ReLU when `relu`. `geometry` holds 7 ints per convolution: stride, padding and dilation
  // as (height, width) pairs, then groups. One call from Python instead of one per convolution (nn/fused.py).
  m.def(
      "conv_bn_act_chain(Tensor x, Tensor[] weights, Tensor?[] biases, int[] geometry, Tensor? residual, "
      "bool relu) -> Tensor");
  // The same, the last convolution written into the residual's buffer as conv_bn_act_into_residual writes it.
  m.def(
      "conv_bn_act_chain_into_residual(Tensor x, Tensor[] weights, Tensor?[] biases, int[] geometry, "
      "Tensor(a!) residual, bool relu) -> ()");
  // out = act(batch_norm(x) + residual). Functional: the updated running statistics are returned
  // (as aten::_native_batch_norm_legit_functional does) and copied into the buffers by the caller,
  // so the op can carry an autograd formula and be traced by torch.compile.
  // Returns (out, save_mean, save_invstd, new_running_mean, new_running_var).
  m.def(
      "bn_act(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor running_mean, "
      "Tensor running_var, bool training, float momentum, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradient of bn_act. `out` supplies the ReLU mask (out > 0), so the pre-activation is never
  // saved. Returns (grad_x, grad_weight, grad_bias, grad_pre_act); grad_pre_act is also the
  // residual's gradient. need_grad_pre=false returns it empty (shape [0]): a kernel may then compute grad_x
  // in the buffer that held the masked gradient, one activation-sized allocation less.
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool relu, bool need_grad_pre=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // bn_act's eager path in one call (bn_act_autograd.cpp): bn_act with its autograd node in C++, and in training
  // the running statistics (when given; scratch ones otherwise) updated in place from its new ones. rf.bn_act calls
  // it on the C++ backends in eager; torch.compile and torch.export see bn_act itself, whose autograd formulas are
  // registered in Python.
  m.def(
      "bn_act_autograd(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu) -> Tensor");
  // conv2d(x, weight), no bias, in x's memory format, with its autograd node in C++ (conv_training.cpp): the cpu
  // backend's convolutions that run alone in training, whose weight gradients over small planes are a matmul.
  m.def(
      "conv_training(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  // out = act(x + residual)
  m.def("add_act(Tensor x, Tensor residual, bool relu) -> Tensor");
  // out = act(x * scale[n, c] + residual), scale (N, C): a block's squeeze-and-excitation (or ECA) gate applied, then
  // its shortcut added and the ReLU, in one pass. The backward returns (grad_x, grad_scale, grad_pre): grad_pre, the
  // gradient before the ReLU (the residual's), is empty without ReLU, where it is grad_out itself.
  m.def("scale_add_act(Tensor x, Tensor scale, Tensor residual, bool relu) -> Tensor");
  m.def(
      "scale_add_act_backward(Tensor grad_out, Tensor out, Tensor x, Tensor scale, bool relu) "
      "-> (Tensor, Tensor, Tensor)");
  // max_pool2d(x), as at::max_pool2d computes it, without the int64 argmax that ATen's CPU kernel writes for every
  // output whether or not it is read: the CPU backend's pool after a fused stem in inference, and the forward of
  // bn_relu_max_pool_training (whose backward recomputes the argmax).
  m.def(
      "max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) "
      "-> Tensor");
  // y = conv2d(z, weight), z = act(x * scale[c] + shift[c]) (z = x without scale/shift; padded
  // positions of z are 0), and the per-channel batch statistics of y over N, H, W taken before y is
  // rounded: returns (y, mean, biased var), the statistics in float32 (float64 for a float64 x).
  m.def(
      "conv_stats(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu) -> (Tensor, Tensor, Tensor)");
  // out = relu(y * scale[c] + shift[c] + residual'), residual' = residual * residual_scale[c] + residual_shift[c]
  // (both or neither) or residual: a BN applied from its scale and shift, e.g. a block's exit on conv_stats.
  m.def(
      "bn_add_relu(Tensor y, Tensor scale, Tensor shift, Tensor? residual, Tensor? residual_scale, "
      "Tensor? residual_shift) -> Tensor");
  // Training-mode BN + ReLU run inside the op that follows it, keeping x rather than relu(batch_norm(x)) for the
  // backward, which recomputes it; the running statistics, when given, are updated in place as F.batch_norm
  // updates them. conv2d(relu(bn(x)), conv_weight); max_pool2d(relu(bn(x))); act(bn2(conv2d(relu(bn(x)),
  // conv_weight)) + residual), which with `recompute` recomputes the conv output in the backward too. Their autograd
  // node is C++ (recomputed_bn_relu.cpp), for the cpu backend's eager training; resnet_fused/ops/
  // recomputed_bn_relu.py says what they keep and calls them.
  m.def(
      "bn_relu_conv_training(Tensor x, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, Tensor conv_weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> Tensor");
  m.def(
      "bn_relu_max_pool_training(Tensor x, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> Tensor");
  m.def(
      "bn_relu_conv_bn_act_training(Tensor x, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, Tensor conv_weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, Tensor? bn2_weight, Tensor? bn2_bias, Tensor(c!)? bn2_running_mean, "
      "Tensor(d!)? bn2_running_var, Tensor? residual, float momentum2, float eps2, bool relu, bool recompute) "
      "-> Tensor");
}
