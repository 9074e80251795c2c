"""Training-mode activation memory, fused (rf.nn, rf.models, rf.fuse) against eager (torchvision, timm): ResNet
blocks, the whole ResNet-50 (also with low_memory=True), and timm's ResNetV2-50 through rf.fuse's graph pass.

Counts the bytes autograd keeps for the backward (every distinct storage a saved-tensor hook sees, less the
parameters, which the model holds anyway), which is deterministic and the same on any device, and the peak
memory allocated during forward + backward above what was allocated before (the allocator's view: the
saved tensors, the gradients, every temporary; on a GPU cuDNN's workspaces, on a CPU oneDNN's). For
blocks, the unit "activations" is the block input's size."""
import importlib.util

import torch
import torchvision

import resnet_fused as rf
from resnet_fused import family

TV = torchvision.models.resnet


def saved_bytes(fn, *args, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while fn(*args) runs, less those of `exclude`."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def _forward_backward(module, x) -> None:
    out = module(x)
    out.backward(torch.ones_like(out))  # a dense gradient in the output's layout, as a next layer would give


def _peak_forward_backward(module, x) -> int:
    """The most memory allocated at once during forward + backward, above what was allocated before: from the
    CUDA allocator's statistics, or on a CPU from the profiler's allocation events in time order."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        _forward_backward(module, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _forward_backward(module, x)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    allocated = peak = 0
    for event in events:
        allocated += event.nbytes()  # negative for a free
        peak = max(peak, allocated)
    return peak


def _measure(candidates, x, row: dict, activation_bytes: int | None = None) -> list[dict]:
    """One row per (provider, module): saved bytes (and the ratio to the first, eager) and the peak of
    forward + backward."""
    rows = []
    for provider, module in candidates:
        saved = saved_bytes(module, x, exclude=list(module.parameters()))
        entry = {**row, "provider": provider, "saved_bytes": saved}
        entry["vs_eager"] = saved / rows[0]["saved_bytes"] if rows else 1.0
        if activation_bytes:
            entry["saved_activations"] = saved / activation_bytes
        entry["peak_bytes"] = _peak_forward_backward(module, x)
        module.zero_grad(set_to_none=True)
        rows.append(entry)
    return rows


# (name, torchvision block, fused block, constructor arguments): the first stage's blocks of ResNet-18/34 and
# of ResNet-50, whose input has args[0] channels.
BLOCKS = [("BasicBlock", TV.BasicBlock, rf.nn.BasicBlock, (64, 64)),
          ("Bottleneck", TV.Bottleneck, rf.nn.Bottleneck, (256, 64))]


# The graph pass's model: pre-activation blocks, whose BN -> ReLU -> conv rf.fuse finds with torch.fx and runs
# as recomputing ops in training (no block class of rf's own).
GRAPH_MODEL = "timm/resnetv2_50"


def run(batch, size, dtype, device, backends, model_size: int | None = None) -> list[dict]:
    """Block rows at `size` x `size`; with model_size, ResNet-50 rows (and GRAPH_MODEL's where timm is installed)
    at model_size x model_size as well."""
    channels_last = dict(device=device, dtype=dtype, memory_format=torch.channels_last)
    rows = []
    for name, torchvision_block, fused_block, args in BLOCKS:
        x = torch.randn(batch, args[0], size, size, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        torch.manual_seed(0)
        eager = torchvision_block(*args).to(**channels_last)
        candidates = [("eager", eager)]
        for backend in backends:
            block = fused_block(*args, backend=backend).to(**channels_last)
            block.load_state_dict(eager.state_dict())
            candidates.append((f"fused:{backend}", block))
        row = {"op": "block.memory", "block": name, "shape": f"{name} c{args[0]}@{size}", "batch": batch,
               "dtype": str(dtype)[6:], "activation_bytes": x.numel() * x.element_size()}
        rows += _measure(candidates, x, row, row["activation_bytes"])
    if model_size:
        torch.manual_seed(0)
        eager = torchvision.models.resnet50().to(**channels_last)
        candidates = [("eager", eager)]
        for backend in backends:
            for low_memory in (False, True) if backend != "reference" else (False,):  # no effect on reference
                model = rf.models.resnet50(backend=backend, low_memory=low_memory).to(**channels_last)
                model.load_state_dict(eager.state_dict())
                candidates.append((f"fused:{backend}" + ("+low_memory" if low_memory else ""), model))
        images = torch.randn(batch, 3, model_size, model_size, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        row = {"op": "model.memory", "block": "resnet50", "shape": f"resnet50 {model_size}x{model_size}",
               "batch": batch, "dtype": str(dtype)[6:]}
        rows += _measure(candidates, images, row)
        if importlib.util.find_spec("timm") is not None:
            torch.manual_seed(0)
            eager = family.build(GRAPH_MODEL).to(**channels_last)
            candidates = [("eager", eager)] + [(f"fused:{backend}", rf.fuse(eager, backend=backend))
                                               for backend in backends]
            name = GRAPH_MODEL.split("/")[1]
            row = {**row, "block": name, "shape": f"{GRAPH_MODEL} {model_size}x{model_size} (rf.fuse)"}
            rows += _measure(candidates, images, row)
    return rows
