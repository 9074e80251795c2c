"""Training-mode activation memory of a residual block, fused against eager.

Counts the bytes autograd keeps for the backward (every distinct storage a saved-tensor hook sees),
which is deterministic and the same on any device, and on a GPU also the peak allocated memory of
forward + backward."""
import torch
import torch.nn.functional as F

import resnet_fused as rf
from resnet_fused import reference


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd saves while fn(*args) runs."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


class BasicBlockOps:
    """conv-BN-ReLU-conv-BN-add-ReLU (ResNet-18/34's block) in training mode, from plain tensors."""

    def __init__(self, channels, device, dtype):
        conv = lambda: (torch.randn(channels, channels, 3, 3, device=device, dtype=dtype) * 0.05  # noqa: E731
                        ).contiguous(memory_format=torch.channels_last).requires_grad_()
        self.w1, self.w2 = conv(), conv()
        self.bn = [(torch.ones(channels, device=device, requires_grad=True),
                    torch.zeros(channels, device=device, requires_grad=True),
                    torch.zeros(channels, device=device), torch.ones(channels, device=device)) for _ in range(2)]

    def forward(self, x, bn_act):
        y = bn_act(F.conv2d(x, self.w1, padding=1), *self.bn[0])
        return bn_act(F.conv2d(y, self.w2, padding=1), *self.bn[1], x)


def eager_bn_act(x, weight, bias, mean, var, residual=None):
    return reference.bn_act(x, weight, bias, mean, var, residual, training=True)


def fused_bn_act(backend):
    def bn_act(x, weight, bias, mean, var, residual=None):
        return rf.bn_act(x, weight, bias, mean, var, residual, training=True, backend=backend)
    return bn_act


def run(batch, channels, size, dtype, device, backends) -> list[dict]:
    block = BasicBlockOps(channels, device, dtype)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    activation = x.numel() * x.element_size()
    rows = []
    for provider, bn_act in [("eager", eager_bn_act)] + [(f"fused:{b}", fused_bn_act(b)) for b in backends]:
        row = {"op": "basic_block.memory", "shape": f"c{channels}@{size}", "provider": provider, "batch": batch,
               "dtype": str(dtype)[6:], "saved_bytes": saved_bytes(block.forward, x, bn_act),
               "activation_bytes": activation}
        row["saved_activations"] = row["saved_bytes"] / activation
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            block.forward(x, bn_act).sum().backward()
            torch.cuda.synchronize()
            row["peak_bytes"] = torch.cuda.max_memory_allocated() - start
        rows.append(row)
    return rows
