"""Model level: ResNet inference (eval, BN folded) at the batch size and at batch 1 (latency), and a training
step (forward, backward, SGD), fused (rf.models; for Bottleneck networks also with low_memory) against eager
torchvision and torch.compile of it, with the same weights; optionally each also replayed from a CUDA graph."""
import copy

import torch

import resnet_fused as rf
from resnet_fused.backends import resolve_backend
from resnet_fused.testing import parity

from .timing import measure_side_by_side

DEPTHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _peak_bytes(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def _autocast(device, dtype):
    """bf16/fp16 run as AMP (float32 weights, autocast), as a training script would."""
    enabled = dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def _train_logits(model, images, device, dtype, grad: bool = False):
    """Logits in training mode (batch statistics); with `grad`, recorded by autograd as in a training step,
    whose forward path the fused models take only then (they keep less for the backward). The running
    statistics this updates are reset by the caller, which reloads the starting state."""
    model.train()
    with torch.set_grad_enabled(grad), _autocast(device, dtype):
        return model(images).float().detach()


def cuda_graphed(fn):
    """fn captured in a CUDA graph, as a function that replays it and returns the captured output. Warm-up on
    a side stream first, as torch.cuda.graphs asks; fn's inputs must stay in place (static)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def run_model(depth: str, batch: int, size: int, dtype, device, compile_modes: list[str], min_run_time: float,
              backends=(None,), cuda_graphs: bool = False, train_size: int | None = None):
    """Yields the rows of each comparison (inference, batch-1 latency, training step) once its providers are
    measured side by side; one fused model per entry of `backends` (None: the ops' default backend). Inference
    runs on `size` px images, the training step on `train_size` px (default: the same). torch.compile of the
    inference model freezes the weights (Inductor folds the BN into the convs and prepacks them, as a deployment
    would) on a CPU, and with max-autotune on a GPU."""
    import torchvision

    torch.manual_seed(0)
    eager = getattr(torchvision.models, depth)().to(device).to(memory_format=torch.channels_last)
    fused = {}
    for backend in backends:
        fused[f"fused:{backend or 'default'}"] = model = getattr(rf.models, depth)(backend=backend).to(device).to(
            memory_format=torch.channels_last)
        model.load_state_dict(eager.state_dict())
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)

    # Inference: eval mode, no grad.
    eager.eval()
    for model in fused.values():
        model.eval()
    oracle_model = copy.deepcopy(eager).double()
    with torch.no_grad():
        oracle = oracle_model(images.double())
        with _autocast(device, dtype):
            eager_out = eager(images)
    candidates = [("eager", eager)]
    for mode in compile_modes:
        torch._dynamo.reset()
        if mode == "max-autotune" or device.type == "cpu":
            torch._inductor.config.freezing = True  # read when the model compiles, at its first call below
        candidates.append((f"compile:{mode}", torch.compile(eager, mode=mode)))
    candidates += list(fused.items())
    for op, x in (("model.inference", images), ("model.latency", images[:1].clone())):
        reference_out = eager_out if op == "model.inference" else eager_out[:1]
        graphed, rows, timed = {}, {}, {}
        for provider, model in candidates + [(f"{p}+graph", m) for p, m in candidates if cuda_graphs]:
            row = {"op": op, "shape": f"{depth} {size}x{size}", "provider": provider, "batch": x.shape[0],
                   "dtype": str(dtype)[6:], "throughput_unit": "img/s"}

            def infer(model=model, x=x):
                with torch.no_grad(), _autocast(device, dtype):
                    return model(x)

            if provider.endswith("+graph"):
                if provider.removesuffix("+graph") not in graphed:
                    continue  # its plain run was wrong
                infer = cuda_graphed(infer)
            rows[provider] = row
            if provider != "eager":
                check = parity(infer().float(), reference_out.float(), oracle[: x.shape[0]])
                row["parity"] = str(check)
                if not check.ok:
                    row["status"] = "wrong"
                    continue
            graphed[provider] = True
            timed[provider] = infer
        for provider, timing in measure_side_by_side(timed, device, min_run_time).items():
            rows[provider].update(status="ok", **timing, throughput=x.shape[0] / timing["median_ms"] * 1e3,
                                  peak_bytes=_peak_bytes(timed[provider], device))
        yield from rows.values()
    torch._inductor.config.freezing = False

    # Training step: forward, loss, backward, SGD step, from the same weights for each provider.
    if train_size is not None and train_size != size:
        images = torch.randn(batch, 3, train_size, train_size, device=device).contiguous(
            memory_format=torch.channels_last)
        size = train_size
    start_state = copy.deepcopy(eager.state_dict())
    eager_train_logits = _train_logits(eager, images, device, dtype)
    oracle_train_logits = _train_logits(oracle_model, images.double(), device, torch.float32).double()
    eager.load_state_dict(start_state)
    # low_memory (Bottleneck networks, a fused backend): conv3's output recomputed in the backward
    low_memory = {}
    if depth not in ("resnet18", "resnet34"):
        for provider, model in fused.items():
            if resolve_backend("bn_act", model.backend, device, dtype) != "reference":
                low_memory[f"{provider}+low_memory"] = rf.fuse(model, low_memory=True)  # a copy
    train_candidates = [("eager", eager)] + [(f"compile:{m}", None) for m in compile_modes if m == "default"]
    train_candidates += list(fused.items()) + list(low_memory.items())
    if cuda_graphs:
        train_candidates += [(f"{p}+graph", m) for p, m in train_candidates if not p.startswith("compile")]
    rows, steps = {}, {}
    for provider, model in train_candidates:
        if model is None:
            torch._dynamo.reset()
            model = torch.compile(eager)
        base = eager if provider.startswith("compile") else model
        base.load_state_dict(start_state)
        base.train()
        optimizer = torch.optim.SGD(base.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            return loss

        row = rows[provider] = {"op": "model.train_step", "shape": f"{depth} {size}x{size}", "provider": provider,
                                "batch": batch, "dtype": str(dtype)[6:], "throughput_unit": "img/s"}
        if provider != "eager":
            # Train-mode logits (batch statistics) from the starting weights, against eager and float64.
            check = parity(_train_logits(model, images, device, dtype, grad=not provider.startswith("compile")),
                           eager_train_logits, oracle_train_logits)
            base.load_state_dict(start_state)
            row["parity"] = str(check)
            if not check.ok:
                row["status"] = "wrong"
                continue
        row["first_loss"] = float(step())
        if provider.endswith("+graph"):
            step = cuda_graphed(step)  # the step on the static images and labels, replayed
        steps[provider] = step
    for provider, timing in measure_side_by_side(steps, device, min_run_time).items():
        rows[provider].update(status="ok", **timing, throughput=batch / timing["median_ms"] * 1e3,
                              peak_bytes=_peak_bytes(steps[provider], device))
    yield from rows.values()
