"""Finding conv -> BN [-> + residual] [-> ReLU] and BN [-> + residual] -> ReLU in a torch.fx graph, and
replacing each by one call of a GraphFusedStep; and the [a * gate ->] + b -> ReLU left over (an SE/ECA block's
tail), each replaced by one call of a GraphFusedAddReLU.

Only what can be proven safe from the graph is fused: the conv output (the BN input) and each value the
fused step swallows have no other user, the conv and BN modules are called once in the graph and appear
once in the model (a module called elsewhere must keep computing alone), and none of the modules whose
call disappears has hooks (they would no longer run). Every BN met gets a note: how it was fused, or why not.

In a training graph, a BN -> ReLU whose only user is a conv (or an nn.MaxPool2d) also takes that next op
(`Match.then`): its step runs them as one recomputing op (bn_relu_conv, bn_relu_max_pool), and the match of
the BN after that conv, if any, gives its conv up to it. In an eval graph such a match takes a max pool only,
which its step runs without indices (FusedModule._max_pool); the same modules in both modes make one step.
With `low_memory`, that match (when it has no next op of its own) joins the step as well (`Match.tail`): the step
runs BN -> ReLU -> conv -> BN [-> + residual] [-> ReLU] as one op (bn_relu_conv_bn_act), which recomputes the
conv output in the backward too.
"""
import operator
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.fused import is_fusable_conv, is_fusable_norm
from .report import RECOMPUTED, TAIL_RECOMPUTED

_ADDS = {operator.add, operator.iadd, torch.add}
_MULS = {operator.mul, torch.mul}
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}


@dataclass
class Match:
    bn: fx.Node
    conv: fx.Node | None
    add: fx.Node | None
    relu: fx.Node | None
    relu_in_bn: bool  # timm's BatchNormAct2d with a ReLU: the ReLU is part of the BN module
    then: fx.Node | None = None  # the conv or max pool after the ReLU that the step runs (eval graphs: a max pool)
    tail: "Match | None" = None  # low_memory training graphs: the match of the BN after `then` (a conv), run here too

    @property
    def residual(self) -> fx.Node | None:
        """The add's other operand, read from the graph as it is now: an earlier rewrite may have replaced it
        (a residual that is another match's output)."""
        return _residual_of(self.add, self.bn) if self.add else None

    @property
    def last(self) -> fx.Node:
        return self.tail.last if self.tail else self.then or self.relu or self.add or self.bn

    def targets(self, root: nn.Module) -> tuple:
        """The modules the step of this match computes, in the order its step holds them: (conv or None, bn),
        then the next conv or pool when there is one, then the tail's BN when there is one."""
        conv = _module(root, self.conv) if self.conv else None
        bn = _module(root, self.bn)
        if not self.then:
            return conv, bn
        then = _module(root, self.then)
        return (conv, bn, then, _module(root, self.tail.bn)) if self.tail else (conv, bn, then)

    def describe(self) -> str:
        parts = (["conv"] if self.conv else []) + ["bn"] + (["add"] if self.add else [])
        return "+".join(parts + (["relu"] if self.relu or self.relu_in_bn else []))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _batch_norm_act_class():
    norm_act = sys.modules.get("timm.layers.norm_act")
    return None if norm_act is None else norm_act.BatchNormAct2d


def norm_kind(module: nn.Module) -> tuple[bool, bool, str]:
    """(fusable, has its own ReLU, reason when not fusable) for a BN-like module."""
    if is_fusable_norm(module):
        return True, False, ""
    if type(module) is _batch_norm_act_class():
        if type(module.drop) is not nn.Identity or _has_hooks(module.drop) or _has_hooks(module.act):
            return False, False, "BatchNormAct2d with a drop layer or hooks on its parts"
        if type(module.act) is nn.ReLU:
            return True, True, ""
        if type(module.act) is nn.Identity:
            return True, False, ""
        return False, False, f"BatchNormAct2d with a {type(module.act).__name__} activation (only ReLU fuses)"
    return False, False, f"{type(module).__name__} is not BatchNorm2d, SyncBatchNorm or timm's BatchNormAct2d"


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = _module(root, node)
        return type(module) is nn.ReLU and not _has_hooks(module)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs


def _residual_of(add: fx.Node, value: fx.Node) -> fx.Node | None:
    """The other operand of `value + other` (a tensor-valued node), or None if add is not such an add.
    An in-place add must write into `value` (which the fused step replaces), not into the other operand."""
    if add.op != "call_function" or add.target not in _ADDS or len(add.args) != 2 or add.kwargs:
        return None
    a, b = add.args
    other = b if a is value else a if b is value and add.target is not operator.iadd else None
    return other if isinstance(other, fx.Node) and other is not value else None


def remove_identities(root: nn.Module, graph: fx.Graph) -> None:
    """nn.Identity calls (timm's disabled drop_block, aa, drop layers) would hide a BN's ReLU: drop them."""
    for node in list(graph.nodes):
        module = _module(root, node)
        if type(module) is nn.Identity and not _has_hooks(module) and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def find_matches(root: nn.Module, graph: fx.Graph, shared: set[int], training: bool, low_memory: bool = False):
    """(the BN patterns of `graph` (traced from `root` in training or eval mode), a note per BN call by module
    path, the add -> ReLU pairs no BN pattern took). `low_memory`: training graphs take tails (Match.tail)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    matches, notes, claimed = [], {}, set()  # claimed: adds and ReLUs already inside a match
    for node in graph.nodes:
        module = _module(root, node)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        fusable, relu_in_bn, reason = norm_kind(module)
        if fusable and (calls[node.target] > 1 or id(module) in shared):
            fusable, reason = False, "the BN module is called more than once"
        elif fusable and _has_hooks(module):
            fusable, reason = False, "the BN module has hooks"
        elif fusable and (len(node.args) != 1 or node.kwargs):
            fusable, reason = False, "called with more than one argument"
        if not fusable:
            notes[node.target] = reason
            continue
        match = Match(node, _fusable_conv(root, node.args[0], node, calls, shared), None, None, relu_in_bn)
        if not relu_in_bn:
            user = _only_user(node)
            if user is not None and _residual_of(user, node) is not None and user not in claimed:
                match.add = user
            user = _only_user(match.last)
            if user is not None and user not in claimed and _is_relu(root, user) and user.args[0] is match.last:
                match.relu = user
            claimed.update(n for n in (match.add, match.relu) if n is not None)
        if match.conv is None and match.add is None and match.relu is None and not relu_in_bn:
            notes[node.target] = f"a BN alone: {_why_no_conv(root, node.args[0], calls, shared)}, no add or ReLU after it"
            continue
        notes[node.target] = f"fused ({match.describe()})"
        matches.append(match)
    afters = _take_next_ops(root, matches, notes, calls, shared, training)
    if training and low_memory:
        _take_tails(root, matches, notes, afters)
    return matches, notes, _add_relu_matches(root, graph, claimed)


def _take_next_ops(root: nn.Module, matches: list[Match], notes: dict[str, str], calls, shared,
                   training: bool) -> dict:
    """Gives each BN -> ReLU match whose ReLU output feeds only a conv or max pool that op (Match.then; in an eval
    graph a max pool only), and takes that conv from the match of the BN after it. Returns {id(match): the match
    that gave its conv up to it}."""
    by_conv = {match.conv: match for match in matches if match.conv is not None}
    afters = {}
    for match in matches:
        if match.add is not None or not (match.relu or match.relu_in_bn):
            continue  # the recomputing ops take a BN + ReLU only, no residual
        then = _only_user(match.last)
        if (then is None or then.op != "call_module" or then.args != (match.last,) or then.kwargs
                or not _runs_in_recomputing_op(root, then, calls, shared)):
            continue
        kind = "conv" if isinstance(_module(root, then), nn.Conv2d) else "max_pool"
        if not training and kind == "conv":
            continue  # in eval the BN folds into its own conv: the next conv is another step's
        match.then = then
        notes[match.bn.target] = f"fused ({match.describe()}+{kind}; {RECOMPUTED})" if training else \
            f"fused ({match.describe()}+{kind})"
        after = by_conv.get(then)
        if after is not None:
            after.conv = None
            afters[id(match)] = after
            notes[after.bn.target] = f"fused ({after.describe()}; its conv runs in {match.bn.target}'s step)"
    return afters


def _take_tails(root: nn.Module, matches: list[Match], notes: dict[str, str], afters: dict) -> None:
    """Moves each match that gave its conv up to a recomputing match, and has no next op of its own, into that
    match (Match.tail), where both BNs synchronize alike (the op runs both with one process group)."""
    for match in list(matches):
        after = afters.get(id(match))
        if after is None or after.then is not None:
            continue
        first, second = _module(root, match.bn), _module(root, after.bn)
        if (isinstance(first, nn.SyncBatchNorm), getattr(first, "process_group", None)) != (
                isinstance(second, nn.SyncBatchNorm), getattr(second, "process_group", None)):
            continue
        match.tail = after
        matches.remove(after)
        notes[match.bn.target] = notes[match.bn.target].replace(RECOMPUTED, f"{RECOMPUTED}, then {after.bn.target}; "
                                                                             f"{TAIL_RECOMPUTED}")
        notes[after.bn.target] = f"fused ({after.describe()}; in {match.bn.target}'s step, with its conv)"


def _runs_in_recomputing_op(root: nn.Module, node: fx.Node, calls, shared) -> bool:
    """Whether the op after a BN -> ReLU can run inside the recomputing op: a conv as bn_relu_conv takes it
    (zero padding given as numbers, no bias; called once, no hooks), or an nn.MaxPool2d without indices or
    hooks (bn_relu_max_pool)."""
    module = _module(root, node)
    if type(module) is nn.MaxPool2d:
        return not module.return_indices and not _has_hooks(module)
    return (is_fusable_conv(module) and not isinstance(module.padding, str) and module.bias is None
            and calls[node.target] == 1 and id(module) not in shared and not _has_hooks(module))


def _add_relu_matches(root: nn.Module, graph: fx.Graph, claimed: set) -> list[tuple]:
    """(add, relu, product) triples left over by the BN matches: a + b whose only user is a ReLU of it, where
    product is None, or an operand a * g of the add (an SE or ECA block's gate applied) that the fused step takes
    too. An in-place a += b qualifies when nothing else reads a (the write then cannot be seen)."""
    triples = []
    for node in graph.nodes:
        if (node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs
                or not all(isinstance(a, fx.Node) for a in node.args) or node in claimed):
            continue
        a, b = node.args
        if node.target is operator.iadd and list(a.users) != [node]:
            continue
        user = _only_user(node)
        if user is None or user in claimed or not _is_relu(root, user) or user.args[0] is not node:
            continue
        # An in-place add writes into its first operand: only that one may be the product it replaces.
        products = (a,) if node.target is operator.iadd else (a, b)
        triples.append((node, user, next((p for p in products if _is_product(p, node)), None)))
    return triples


def _is_product(node: fx.Node, add: fx.Node) -> bool:
    """Whether node is p * q of two tensor-valued nodes whose only user is `add`."""
    return (node.op == "call_function" and node.target in _MULS and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args) and list(node.users) == [add])


def _fusable_conv(root, node, bn: fx.Node, calls, shared) -> fx.Node | None:
    if not isinstance(node, fx.Node) or _why_no_conv(root, node, calls, shared) is not None:
        return None
    return node if list(node.users) == [bn] else None


def _why_no_conv(root, node, calls, shared) -> str | None:
    module = _module(root, node) if isinstance(node, fx.Node) else None
    if module is None or not isinstance(module, nn.Conv2d):
        return "its input is not a conv's output"
    if not is_fusable_conv(module):
        return f"its conv is a {type(module).__name__} with padding_mode={module.padding_mode!r}"
    if calls[node.target] > 1 or id(module) in shared:
        return "its conv module is called more than once"
    if _has_hooks(module):
        return "its conv has hooks"
    if len(node.users) > 1:
        return "the conv output has another user"
    return None


def rewrite(graph: fx.Graph, matches: list[Match], step_names: dict[fx.Node, str], add_relus, add_relu_name) -> None:
    """Each match becomes one call_module of its step, step(x, residual, relu), or step(x) for a match with a
    next op (step(x, residual, relu) of the tail's add and ReLU with a tail); each [multiply ->] add -> ReLU one
    call of the module named add_relu_name."""
    for add, relu, product in add_relus:
        # step(a, b) for relu(a + b); step(p, residual, q) for relu(p * q + residual)
        args = add.args if product is None else (product.args[0], _residual_of(add, product), product.args[1])
        with graph.inserting_before(relu):
            fused = graph.call_module(add_relu_name, args)
        relu.replace_all_uses_with(fused)
        for node in (relu, add, product):
            if node is not None:
                graph.erase_node(node)
    for match in matches:
        source, tail = match.conv or match.bn, match.tail
        if tail is not None:
            args = (source.args[0], tail.residual, tail.relu is not None or tail.relu_in_bn)
        else:
            args = (source.args[0],) if match.then else (source.args[0], match.residual,
                                                           match.relu is not None or match.relu_in_bn)
        with graph.inserting_before(match.last):
            fused = graph.call_module(step_names[match.bn], args)
        match.last.replace_all_uses_with(fused)
        tail_nodes = (tail.relu, tail.add, tail.bn) if tail is not None else ()
        for node in (*tail_nodes, match.then, match.relu, match.add, match.bn, match.conv):
            if node is not None:
                graph.erase_node(node)
