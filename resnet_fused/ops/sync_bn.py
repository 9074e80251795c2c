"""Synchronized batch norm (+ residual) (+ ReLU) across processes, as nn.SyncBatchNorm does it.

Forward: each process computes its per-channel count, mean and biased variance; one all_gather brings
every process's triple, which are combined with Chan's parallel formula (exact, and safe where
E[x^2] - E[x]^2 cancels); the running statistics are updated from the global ones; then the fused op
normalizes with the global statistics in one pass (rf.bn_act in eval mode). Backward: the per-channel
sums of g and g * xhat are all-reduced, so grad_x uses the global batch, while grad_weight and
grad_bias stay local (DDP averages parameter gradients itself, as with nn.SyncBatchNorm).
"""
import torch
import torch.distributed as dist

from ._no_double_backward import differentiable_once


def _local_stats(x: torch.Tensor, stats_dtype: torch.dtype) -> torch.Tensor:
    """(3, C): count, mean, biased variance of this process's batch (zeros for an empty batch)."""
    channels, count = x.shape[1], x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        return torch.zeros(3, channels, dtype=stats_dtype, device=x.device)
    var, mean = torch.var_mean(x.to(stats_dtype), dim=(0, 2, 3), correction=0)
    return torch.stack([torch.full_like(mean, count), mean, var])


def combine_stats(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan's parallel combination of (W, 3, C) per-process (count, mean, biased var) into the global
    (count, mean, biased var)."""
    counts, means, variances = gathered.unbind(1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = (counts * (variances + (means - mean) ** 2)).sum(0)
    return total, mean, m2 / total


def batch_stats(x: torch.Tensor, running_mean, running_var, momentum: float, group=None):
    """(mean, biased var, count) per channel of the batch, over every process of `group` (None: this
    process only), in float32 (float64 for a float64 x); updates the running statistics from them as
    F.batch_norm does (unbiased variance). All on the device, no host sync, so CUDA-graph capture stays
    possible. Channels that saw at most one value anywhere keep their running statistics."""
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    local = _local_stats(x, stats_dtype)
    if group is None:
        gathered = local.unsqueeze(0)
    else:
        gathered = torch.empty((dist.get_world_size(group), *local.shape), dtype=local.dtype, device=local.device)
        dist.all_gather(list(gathered.unbind(0)), local, group=group)
    total, mean, var = combine_stats(gathered)
    if x.shape[0] * x.shape[2] * x.shape[3] == 1 and gathered.shape[0] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    if running_mean is not None:
        seen = total > 1  # one value has no unbiased variance: leave the statistics
        unbiased = var * total / (total - 1)
        running_mean.copy_(torch.where(seen, running_mean + momentum * (mean.to(running_mean.dtype) - running_mean),
                                       running_mean))
        running_var.copy_(torch.where(seen, running_var + momentum * (unbiased.to(running_var.dtype) - running_var),
                                      running_var))
    return mean, var, total


def bn_backward(grad_out, out, x, weight, mean, invstd, total, relu: bool, group=None):
    """(grad_x, grad_weight, grad_bias, grad_pre) of act(batch_norm(x) + residual) with batch statistics
    (mean, invstd) over `total` values: the per-channel sums of g and g * xhat are all-reduced over
    `group` (None: this process only), so grad_x uses the global batch, while grad_weight and grad_bias
    stay local (DDP averages parameter gradients itself, as with nn.SyncBatchNorm). grad_pre is the
    gradient before the BN (the residual's)."""
    stats_dtype = mean.dtype
    g = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
    shape = (1, -1, 1, 1)
    xhat = (x.to(stats_dtype) - mean.reshape(shape)) * invstd.reshape(shape)
    g_acc = g.to(stats_dtype)
    local_sums = torch.stack([g_acc.sum((0, 2, 3)), (g_acc * xhat).sum((0, 2, 3))])
    global_sums = local_sums.clone()
    if group is not None:
        dist.all_reduce(global_sums, group=group)
    sum_g, sum_gxhat = (global_sums / total.clamp(min=1)).reshape(2, *shape).unbind(0)
    scale = (weight.to(stats_dtype) * invstd).reshape(shape)
    grad_x = (scale * (g_acc - sum_g - xhat * sum_gxhat)).to(x.dtype)
    grad_weight, grad_bias = (s.to(weight.dtype) for s in (local_sums[1], local_sums[0]))
    return grad_x, grad_weight, grad_bias, g


def bn_forward(x, weight, bias, residual, running_mean, running_var, momentum: float, eps: float, relu: bool,
               group, backend):
    """act(batch_norm(x) + residual) with the batch statistics over `group`, running statistics updated as in
    batch_stats: (out, mean, invstd, count)."""
    from .bn_act import bn_act

    mean, var, total = batch_stats(x, running_mean, running_var, momentum, group)
    # Normalizing with given statistics is eval mode's math: one fused pass. The statistics stay in
    # float32 (float64 for float64 x), so the parameters go with them.
    out = bn_act(x, weight.to(mean.dtype), bias.to(mean.dtype), mean, var, residual, training=False,
                 eps=eps, relu=relu, backend=backend)
    return out, mean, torch.rsqrt(var + eps), total


class SyncBNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, momentum, eps, relu, group, backend):
        out, mean, invstd, total = bn_forward(x, weight, bias, residual, running_mean, running_var, momentum, eps,
                                              relu, group, backend)
        ctx.save_for_backward(x, weight, mean, invstd, out if relu else None, total)  # out: ReLU's mask only
        ctx.relu, ctx.group, ctx.has_residual = relu, group, residual is not None
        return out

    @staticmethod
    @differentiable_once("bn_act with process_group")  # the statistics are saved as constants
    def backward(ctx, grad_out):
        x, weight, mean, invstd, out, total = ctx.saved_tensors
        grad_x, grad_weight, grad_bias, g = bn_backward(grad_out, out, x, weight, mean, invstd, total, ctx.relu,
                                                        ctx.group)
        return (grad_x, grad_weight, grad_bias, g if ctx.has_residual else None,
                None, None, None, None, None, None, None)
