"""Family level: each model of resnet_fused.family (torchvision's and timm's ResNets, SE/ECA/SK/pre-activation
variants, RegNet) as built, against rf.fuse of it with the same weights: inference (eval, no grad) and a
training step (forward, loss, backward, SGD). Every fused model is checked against a float64 copy first."""
import copy

import torch

import resnet_fused as rf
from resnet_fused import family
from resnet_fused.testing import parity

from .timing import measure


def run_family_model(name: str, batch: int, size: int, dtype, device, min_run_time: float, backend=None):
    """Yields the rows of one model: family.inference and family.train_step, eager then fused."""
    torch.manual_seed(0)
    eager = family.build(name).to(device).to(memory_format=torch.channels_last)
    fused = rf.fuse(eager, backend=backend)
    oracle = copy.deepcopy(eager).double()
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    row = {"shape": f"{name} {size}x{size}", "batch": batch, "dtype": str(dtype)[6:], "throughput_unit": "img/s"}

    for model in (eager, fused, oracle):
        model.eval()
    with torch.no_grad():
        expected = oracle(images.double())
        eager_out = eager(images)
    for provider, model in (("eager", eager), ("fused", fused)):
        def infer(model=model):
            with torch.no_grad(), autocast:
                return model(images)
        check = parity(infer().float(), eager_out.float(), expected)
        if not check.ok:
            yield {**row, "op": "family.inference", "provider": provider, "status": "wrong", "parity": str(check)}
            continue
        timing = measure(infer, device, min_run_time)
        yield {**row, "op": "family.inference", "provider": provider, "status": "ok", "parity": str(check),
               **timing, "throughput": batch / timing["median_ms"] * 1e3}

    start = copy.deepcopy(eager.state_dict())
    for model in (eager, fused, oracle):
        model.train()
    with torch.no_grad():
        expected = oracle(images.double())
        eager_out = eager(images)
    for provider, model in (("eager", eager), ("fused", fused)):
        model.load_state_dict(start)
        with torch.no_grad(), autocast:
            check = parity(model(images).float(), eager_out.float(), expected)
        model.load_state_dict(start)
        if not check.ok:
            yield {**row, "op": "family.train_step", "provider": provider, "status": "wrong", "parity": str(check)}
            continue
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

        timing = measure(step, device, min_run_time)
        yield {**row, "op": "family.train_step", "provider": provider, "status": "ok", "parity": str(check),
               **timing, "throughput": batch / timing["median_ms"] * 1e3}
