"""Shallow torch.fx tracing of one module, in training and in eval mode, and running the rewritten graphs
in place of the module's forward while the module keeps its class (a subclass of it), methods and state.

Shallow: every submodule is a leaf (called, not traced into), except nn.Sequential containers that run
nn.Sequential's own forward and have no hooks (plain ones, and subclasses such as torchvision's
Conv2dNormActivation and RegNet's BottleneckTransform), whose calls are inlined so that a pattern spanning
containers and their parent (a deep stem and the BN after it; RegNet's conv -> BN -> ReLU in one
Conv2dNormActivation and the next conv in another) is seen, and timm's SE and ECA gates (SEModule, EcaModule),
whose multiply by the gate then meets the block's add and ReLU. Each module that holds a pattern is rewritten on
its own, one at a time.
Training branches are baked into a trace (`if self.training`, `F.dropout(training=self.training)`), so
the module is traced in both modes and runs the graph of its current mode.
"""
import copy
import sys

from torch import fx, nn

_FUSED_CLASSES: dict[type, type] = {}


class ShallowTracer(fx.Tracer):
    def __init__(self):
        timm_fx = sys.modules.get("timm.layers._fx")
        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()) if timm_fx else ())

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return not is_inlined(module)


def is_inlined(module: nn.Module) -> bool:
    """Whether a traced parent inlines this submodule's call, when it has no hooks of its own (they would not run
    once inlined): an nn.Sequential whose forward is nn.Sequential's (its children called in order, nothing else),
    or one of timm's squeeze-and-excitation and ECA gates, whose forward ends in `x * gate`: inlined, that multiply
    joins the block's add and ReLU after it as one scale_add_act step."""
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return False
    if isinstance(module, nn.Sequential):
        return type(module).forward is nn.Sequential.forward
    return type(module) in _timm_gates()


def _timm_gates() -> tuple[type, ...]:
    """timm's SEModule and EcaModule, where timm is imported (a model holding them imported it)."""
    se, eca = sys.modules.get("timm.layers.squeeze_excite"), sys.modules.get("timm.layers.eca")
    return tuple(m for m in (getattr(se, "SEModule", None), getattr(eca, "EcaModule", None)) if m is not None)


def is_container(module: nn.Module) -> bool:
    """Not traced, but their children are visited: ModuleList and ModuleDict (no forward), and PyTorch's
    wrappers (DataParallel, DistributedDataParallel), whose forward is not the model's computation."""
    return type(module) in (nn.ModuleList, nn.ModuleDict) or type(module).__module__.startswith("torch.nn.parallel")


def is_atomic(module: nn.Module) -> bool:
    """Modules never traced themselves, nor their children: PyTorch's own layers and timm's untraceable ones."""
    if type(module).__module__.startswith("torch.nn.modules.") and type(module) not in (
            nn.Sequential, nn.ModuleList, nn.ModuleDict):
        return True
    timm_fx = sys.modules.get("timm.layers._fx")
    return timm_fx is not None and type(module) in timm_fx.get_notrace_modules()


def trace_both_modes(module: nn.Module) -> dict[bool, fx.Graph]:
    """{training: graph}; the modules' train/eval flags are restored afterwards. Raises what tracing raises."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        return {mode: ShallowTracer().trace(module.train(mode)) for mode in (True, False)}
    finally:
        for m, training in flags:
            m.training = training


def is_graph_fused(module: nn.Module) -> bool:
    return "_rf_graph_forwards" in module.__dict__


def install(module: nn.Module, graphs: dict[bool, fx.Graph]) -> None:
    """module runs graphs[module.training] from now on, as an instance of a subclass of its class."""
    forwards = {}
    for mode, graph in graphs.items():
        code = graph.python_code(root_module="self")
        forwards[mode] = fx.graph_module._forward_from_src(code.src, code.globals)
    module._rf_graph_forwards = forwards
    module.__class__ = fused_class(type(module))


def fused_class(cls: type) -> type:
    """One subclass per class: isinstance checks and every method but forward stay the original's."""
    if cls not in _FUSED_CLASSES:
        def forward(self, *args, **kwargs):
            return self._rf_graph_forwards[self.training](self, *args, **kwargs)

        def __deepcopy__(self, memo):  # what deepcopy does by default, without pickle's __reduce_ex__ below
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
            return new

        def __reduce_ex__(self, protocol):
            # This class is made at run time, so pickle cannot find it by name, nor the generated forwards:
            # pickle an instance of the original class, and rewrite it again on load with the same steps.
            from . import rebuild_graph_fused
            state = {k: v for k, v in self.__dict__.items() if k != "_rf_graph_forwards"}
            return rebuild_graph_fused, (cls, state)

        _FUSED_CLASSES[cls] = type(f"GraphFused{cls.__name__}", (cls,),
                                   {"forward": forward, "__deepcopy__": __deepcopy__, "__reduce_ex__": __reduce_ex__,
                                    "__module__": cls.__module__,
                                    "__doc__": f"{cls.__name__} whose forward runs its conv/BN patterns fused "
                                               f"(resnet_fused.fuse).\n\n{cls.__doc__ or ''}"})
    return _FUSED_CLASSES[cls]
