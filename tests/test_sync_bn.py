"""Synchronized BN: two processes on the gloo backend (CPU) against one process on the whole batch, for the
op and for a fused ResNet under DistributedDataParallel."""
import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from samples import BNCase, assert_parity, backends_for, bn_sample, to_float64

import resnet_fused as rf
from resnet_fused import reference

WORLD = 2
# Uneven split on purpose: rank 0 gets 3 images, rank 1 gets 1.
SPLIT = [3, 1]
CASE = BNCase("sync", (sum(SPLIT), 5, 3, 4))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_batch_sample(dtype):
    torch.manual_seed(0)
    sample = bn_sample(CASE, dtype, requires_grad=True)
    grad_out = torch.randn(CASE.shape, dtype=torch.float64).to(dtype)
    return sample, grad_out


def worker(rank, port, backend, dtype, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        (x, weight, bias, running_mean, running_var, residual), grad_out = full_batch_sample(dtype)
        rows = slice(sum(SPLIT[:rank]), sum(SPLIT[: rank + 1]))
        x_local = x.detach()[rows].clone().requires_grad_()
        residual_local = residual.detach()[rows].clone().requires_grad_()
        out = rf.bn_act(x_local, weight, bias, running_mean, running_var, residual_local, training=True,
                        process_group=dist.group.WORLD, backend=backend)
        out.backward(grad_out[rows])
        torch.save({"out": out.detach(), "grad_x": x_local.grad, "grad_residual": residual_local.grad,
                    "grad_weight": weight.grad, "grad_bias": bias.grad, "running_mean": running_mean,
                    "running_var": running_var}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_two_processes_match_one_big_batch(backend, dtype, tmp_path):
    if backend not in backends_for("bn_act", "cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    mp.spawn(worker, args=(free_port(), backend, dtype, str(tmp_path / "rank")), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank.{r}") for r in range(WORLD)]

    # The oracle: the whole batch in one process, in float64; and PyTorch in the same dtype.
    (x, weight, bias, running_mean, running_var, residual), grad_out = full_batch_sample(dtype)
    results = {}
    for name, sample in (("oracle", to_float64([x, weight, bias, running_mean, running_var, residual])),
                         ("torch", [x, weight, bias, running_mean, running_var, residual])):
        xs, ws, bs, rm, rv, rs = sample
        out = reference.bn_act(xs, ws, bs, rm, rv, rs, training=True)
        grads = torch.autograd.grad(out, (xs, ws, bs, rs), grad_out.to(out.dtype))
        results[name] = dict(out=out, grad_x=grads[0], grad_weight=grads[1], grad_bias=grads[2],
                             grad_residual=grads[3], running_mean=rm, running_var=rv)

    for key in ("out", "grad_x", "grad_residual"):
        assert_parity(torch.cat([r[key] for r in ranks]), results["torch"][key], results["oracle"][key], what=key)
    for key in ("grad_weight", "grad_bias"):  # local contributions: DDP sums (averages) them
        assert_parity(sum(r[key] for r in ranks), results["torch"][key], results["oracle"][key], what=key)
    for key in ("running_mean", "running_var"):
        for r in ranks:
            assert_parity(r[key], results["torch"][key], results["oracle"][key], what=key)


# ---- a fused ResNet-18 with convert_sync_batchnorm under DDP ----

MODEL_BATCH, MODEL_CLASSES = 4, 3  # two images per rank: DDP's gradient average is then the full-batch mean


# ResNet-18; ResNet-50 with low_memory, whose Bottleneck tails synchronize two BNs in one op
MODELS = {"resnet18": {}, "resnet50_low_memory": {"low_memory": True}}


def model_and_batch(name, backend):
    torch.manual_seed(0)
    depth = name.split("_")[0]
    model = getattr(rf.models, depth)(num_classes=MODEL_CLASSES, backend=backend, **MODELS[name]).double()
    images = torch.randn(MODEL_BATCH, 3, 32, 32, dtype=torch.float64)
    labels = torch.randint(0, MODEL_CLASSES, (MODEL_BATCH,))
    return model, images, labels


def train_step(model, images, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logits = model(images)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    optimizer.step()
    return logits.detach()


def ddp_worker(rank, port, name, backend, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model, images, labels = model_and_batch(name, backend)
        model = torch.nn.parallel.DistributedDataParallel(rf.nn.convert_sync_batchnorm(model))
        rows = slice(rank * MODEL_BATCH // WORLD, (rank + 1) * MODEL_BATCH // WORLD)
        logits = train_step(model, images[rows], labels[rows])
        torch.save({"logits": logits, "state": model.module.state_dict()}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,backend", [("resnet18", "reference"), ("resnet18", "cpu"),
                                          ("resnet50_low_memory", "cpu")])
def test_ddp_sync_bn_resnet_matches_one_process(name, backend, tmp_path):
    """A training step of a fused ResNet with synchronized BN on two processes equals the step of one
    process on the whole batch: the logits, every parameter after SGD, the running statistics."""
    if backend not in backends_for("bn_act", "cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    mp.spawn(ddp_worker, args=(free_port(), name, backend, str(tmp_path / "rank")), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank.{r}") for r in range(WORLD)]
    model, images, labels = model_and_batch(name, backend)
    start = copy.deepcopy(model.state_dict())
    logits = train_step(model, images, labels)
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), logits, rtol=1e-9, atol=1e-12)
    for rank in ranks:
        assert rank["state"].keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            # Up to the summation order, relative to the tensor's largest change in this step (ResNet-50's
            # first-step updates reach 1e2, and its float64 sums differ in the 1e-9s)
            change = (value - start[key]).abs().max().item() if value.is_floating_point() else 0
            torch.testing.assert_close(rank["state"][key], value, rtol=1e-9, atol=1e-12 + 1e-9 * change, msg=key)


def test_process_group_needs_initialized_distributed():
    x, weight, bias, running_mean, running_var, _ = bn_sample(CASE)
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        rf.bn_act(x, weight, bias, running_mean, running_var, training=True, process_group=object())
