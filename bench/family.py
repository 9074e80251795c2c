"""Family level: each model of resnet_fused.family (torchvision's and timm's ResNets, SE/ECA/SK/pre-activation
variants, RegNet) as built, against rf.fuse of it with the same weights: inference (eval, no grad) and a
training step (forward, loss, backward, SGD; on a fused backend also rf.fuse(..., low_memory=True)), timed side
by side. Every fused model is checked against a float64 copy first."""
import copy

import torch

import resnet_fused as rf
from resnet_fused import family
from resnet_fused.backends import resolve_backend
from resnet_fused.testing import parity

from .timing import measure_side_by_side


def run_family_model(name: str, batch: int, size: int, dtype, device, min_run_time: float, backend=None):
    """Yields the rows of one model: family.inference and family.train_step, eager and fused."""
    torch.manual_seed(0)
    eager = family.build(name).to(device).to(memory_format=torch.channels_last)
    models = {"eager": eager, "fused": rf.fuse(eager, backend=backend)}
    low_memory = {}  # training only: the recomputed conv outputs change what is kept, not the eval graph
    if resolve_backend("bn_act", backend, device, dtype) != "reference":
        low_memory["fused+low_memory"] = rf.fuse(eager, backend=backend, low_memory=True)
    oracle = copy.deepcopy(eager).double()
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    start = copy.deepcopy(eager.state_dict())

    def logits(model, training: bool):
        """From the starting state (a training-mode forward updates the running statistics)."""
        model.load_state_dict(start)
        model.train(training)
        with torch.no_grad(), autocast:
            return model(images).float()

    def infer(model):
        with torch.no_grad(), autocast:
            return model(images)

    def train_step(model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    for op, training in (("family.inference", False), ("family.train_step", True)):
        oracle.train(training)
        with torch.no_grad():
            expected = oracle(images.double())
        eager_logits = logits(eager, training)
        rows, timed = {}, {}
        for provider, model in {**models, **(low_memory if training else {})}.items():
            rows[provider] = {"op": op, "shape": f"{name} {size}x{size}", "provider": provider, "batch": batch,
                              "dtype": str(dtype)[6:], "throughput_unit": "img/s"}
            check = parity(logits(model, training), eager_logits, expected)
            rows[provider]["parity"] = str(check)
            if not check.ok:
                rows[provider]["status"] = "wrong"
                continue
            model.load_state_dict(start)
            if training:
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                timed[provider] = lambda m=model, o=optimizer: train_step(m, o)
            else:
                timed[provider] = lambda m=model: infer(m)
        for provider, timing in measure_side_by_side(timed, device, min_run_time).items():
            rows[provider].update(status="ok", **timing, throughput=batch / timing["median_ms"] * 1e3)
        yield from rows.values()
