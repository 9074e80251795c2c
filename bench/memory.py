"""Training-mode activation memory of ResNet blocks, fused (rf.nn) against eager (torchvision's blocks).

Counts the bytes autograd keeps for the backward (every distinct storage a saved-tensor hook sees),
which is deterministic and the same on any device, and on a GPU also the peak allocated memory of
forward + backward. The unit "activations" is the block input's size."""
import torch
import torchvision

import resnet_fused as rf

TV = torchvision.models.resnet


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


# (name, torchvision block, fused block, constructor arguments): the first stage's blocks of ResNet-18/34 and
# of ResNet-50, whose input has args[0] channels.
BLOCKS = [("BasicBlock", TV.BasicBlock, rf.nn.BasicBlock, (64, 64)),
          ("Bottleneck", TV.Bottleneck, rf.nn.Bottleneck, (256, 64))]


def run(batch, size, dtype, device, backends) -> list[dict]:
    rows = []
    for name, torchvision_block, fused_block, args in BLOCKS:
        x = torch.randn(batch, args[0], size, size, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        activation = x.numel() * x.element_size()
        torch.manual_seed(0)
        eager = torchvision_block(*args).to(device=device, dtype=dtype, memory_format=torch.channels_last)
        candidates = [("eager", eager)]
        for backend in backends:
            block = fused_block(*args, backend=backend).to(device=device, dtype=dtype, memory_format=torch.channels_last)
            block.load_state_dict(eager.state_dict())
            candidates.append((f"fused:{backend}", block))
        for provider, block in candidates:
            row = {"op": "block.memory", "block": name, "shape": f"{name} c{args[0]}@{size}", "provider": provider,
                   "batch": batch, "dtype": str(dtype)[6:], "saved_bytes": saved_bytes(block, x),
                   "activation_bytes": activation}
            row["saved_activations"] = row["saved_bytes"] / activation
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
                block(x).sum().backward()
                torch.cuda.synchronize()
                row["peak_bytes"] = torch.cuda.max_memory_allocated() - start
            rows.append(row)
    return rows
