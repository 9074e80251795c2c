"""The graph pass of rf.fuse: conv -> BN [-> + residual] [-> ReLU] and BN [-> + residual] -> ReLU wherever
they occur in a module's computation, found with torch.fx, one module at a time, swapped in place.

For each module that is not already fused (a block rf.fuse converts by its class, or a module this pass
rewrote before) and not one of PyTorch's or timm's layers: trace it shallowly in both modes (trace.py),
find the patterns (match.py), register one GraphFusedStep per pattern under it (a GraphRecomputingStep for a
BN -> ReLU -> conv or max pool of the training graph, a GraphRecomputingTailStep for one that takes the BN after
that conv too, with low_memory; no parameters of its own, so state_dict keys do not change) and make it run the
rewritten graphs (trace.install). A module that cannot be traced is left as it is and reported; its children are
still visited.
"""
from collections import Counter

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.fused import FusedModule
from .match import find_matches, remove_identities, rewrite
from .report import FuseReport
from .step import GraphFusedAddReLU, GraphFusedStep, GraphRecomputingStep, GraphRecomputingTailStep, sync_group
from .trace import install, is_atomic, is_container, is_graph_fused, is_inlined, trace_both_modes

__all__ = ["FuseReport", "GraphFusedAddReLU", "GraphFusedStep", "GraphRecomputingStep", "GraphRecomputingTailStep",
           "fuse_graphs", "sync_group"]

_MODE_NAMES = {True: "train", False: "eval"}


def fuse_graphs(model: nn.Module, backend: str | None = None, low_memory: bool = False) -> FuseReport:
    """Rewrites `model`'s modules in place (see the module docstring) and says what became of each BN.
    `low_memory`: the training graphs' recomputing steps take the BN after their conv too (match.py)."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = {key for key, count in counts.items() if count > 1}
    report, graph_notes = FuseReport(), {mode: {} for mode in _MODE_NAMES.values()}
    _visit(model, "", backend, low_memory, shared, report, graph_notes, inlined=False)
    _note_every_norm(model, report, graph_notes)
    return report


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _visit(module, path, backend, low_memory, shared, report, graph_notes, inlined: bool) -> None:
    if isinstance(module, FusedModule) or is_atomic(module):
        return
    traced = inlined
    if is_graph_fused(module):
        notes, traced = module._rf_graph_notes, True
    elif not inlined and not is_container(module):
        try:
            graphs = trace_both_modes(module)
        except Exception as error:  # noqa: BLE001 - any failure to trace means: leave this module alone
            report.untraceable[path or "(root)"] = f"{type(module).__name__}: {type(error).__name__}: " \
                                                   f"{str(error).splitlines()[0] if str(error) else ''}"
            notes = {}
        else:
            notes, traced = _fuse_module(module, graphs, backend, low_memory, shared), True
    else:
        notes = {}  # inlined into its parent's graph (noted there), or a container without forward
    for mode, mode_notes in notes.items():
        graph_notes[mode].update({_join(path, target): note for target, note in mode_notes.items()})
    for name, child in list(module.named_children()):
        _visit(child, _join(path, name), backend, low_memory, shared, report, graph_notes,
               inlined=traced and is_inlined(child))


def _new_step(targets: tuple, backend) -> GraphFusedStep:
    kind = {2: GraphFusedStep, 3: GraphRecomputingStep, 4: GraphRecomputingTailStep}[len(targets)]
    return kind(*targets, backend)


def _step_name(module: nn.Module, match) -> str:
    parts = [match.bn] + ([match.then] if match.then else []) + ([match.tail.bn] if match.tail else [])
    return _free_name(module, "_".join(["fused"] + [node.target for node in parts]).replace(".", "_"))


def _fuse_module(module: nn.Module, graphs: dict[bool, fx.Graph], backend, low_memory: bool,
                 shared) -> dict[str, dict[str, str]]:
    notes, steps, found, add_relu_name = {}, {}, False, None
    for training, graph in sorted(graphs.items()):  # eval first: its steps keep the plain names (fused_bn1)
        remove_identities(module, graph)
        matches, notes[_MODE_NAMES[training]], add_relus = find_matches(module, graph, shared, training, low_memory)
        if add_relus and add_relu_name is None:  # one stateless module serves every add -> ReLU of the graph
            add_relu_name = _free_name(module, "fused_add_relu")
            module.add_module(add_relu_name, GraphFusedAddReLU(backend))
        names = {}
        for match in matches:
            targets = match.targets(module)
            key = tuple(map(id, targets))  # the same modules in both modes: one step
            if key not in steps:
                steps[key] = _step_name(module, match)
                module.add_module(steps[key], _new_step(targets, backend))
            names[match.bn] = steps[key]
        rewrite(graph, matches, names, add_relus, add_relu_name)
        graph.lint()
        found = found or bool(matches) or bool(add_relus)
    if found:
        install(module, graphs)
        module._rf_graph_notes = notes  # what a later rf.fuse reports without tracing again
    return notes


def rebuild_graph_fused(cls: type, state: dict) -> nn.Module:
    """Unpickling a graph-fused module: the original class with the pickled state (its fused steps among its
    children), traced and rewritten again onto those very steps."""
    module = cls.__new__(cls)
    module.__dict__.update(state)
    children = dict(module.named_children())
    steps = {tuple(map(id, c._targets)): name for name, c in children.items() if isinstance(c, GraphFusedStep)}
    add_relu_name = next((name for name, c in children.items() if isinstance(c, GraphFusedAddReLU)), None)
    graphs = trace_both_modes(module)
    low_memory = any(isinstance(c, GraphRecomputingTailStep) for c in children.values())  # as it was fused
    for training, graph in graphs.items():
        remove_identities(module, graph)
        matches, _, add_relus = find_matches(module, graph, set(), training, low_memory)
        key = lambda m: tuple(map(id, m.targets(module)))  # noqa: E731
        kept = [m for m in matches if key(m) in steps]  # those fused before (the model's sharing is not known here)
        rewrite(graph, kept, {m.bn: steps[key(m)] for m in kept}, add_relus if add_relu_name else [], add_relu_name)
        graph.lint()
    install(module, graphs)
    return module


def _free_name(module: nn.Module, name: str) -> str:
    candidate, i = name, 1
    while hasattr(module, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _note_every_norm(model: nn.Module, report: FuseReport, graph_notes) -> None:
    blocks = {}  # id(bn) -> note, for the blocks fused by their class
    for path, module in model.named_modules():
        if isinstance(module, FusedModule) and not isinstance(module, GraphFusedStep):
            for bn in module._fused_norms():
                blocks.setdefault(id(bn), f"fused (in {type(module).__name__} {path or '(root)'})")
    for path, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        for mode in report.notes:
            note = blocks.get(id(module)) or graph_notes[mode].get(path) or _why_unseen(model, path, report)
            report.notes[mode][path] = note


def _why_unseen(model: nn.Module, path: str, report: FuseReport) -> str:
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i]) or "(root)"
        if prefix in report.untraceable:
            return f"inside {prefix}, which torch.fx cannot trace ({report.untraceable[prefix]})"
        module = model.get_submodule(".".join(parts[:i]))
        if isinstance(module, FusedModule):
            return f"inside the fused block {prefix}, which computes it unfused"
    return "not called by any traced forward"
