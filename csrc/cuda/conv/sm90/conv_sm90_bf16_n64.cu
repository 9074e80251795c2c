// The Hopper conv for bfloat16, tile 128 x 64 x 64 (conv_sm90_kernel.cuh).
#include "conv_sm90_kernel.cuh"
RF_SM90_INSTANTIATE(kBFloat16, 64)
