"""What rf.fuse did with each BatchNorm layer, per mode: fused (and how), or why not."""
from dataclasses import dataclass, field

MODES = ("train", "eval")
# In a training note: the BN + ReLU runs in the next conv's (or max pool's) op, which keeps the BN input for the
# backward instead of the ReLU output (resnet_fused/ops/recomputed_bn_relu.py), when the step runs eagerly with
# autograd on a fused backend; otherwise the step runs the same ops one after the other.
RECOMPUTED = "BN + ReLU recomputed in the backward"
# With low_memory, the BN after the next conv runs in the same op, which recomputes that conv's output as well.
TAIL_RECOMPUTED = "the conv output recomputed too"


@dataclass
class FuseReport:
    """notes[mode][bn path] = "fused (...)" or the reason it was not; untraceable[module path] = error."""
    notes: dict[str, dict[str, str]] = field(default_factory=lambda: {mode: {} for mode in MODES})
    untraceable: dict[str, str] = field(default_factory=dict)

    def fused(self, mode: str) -> list[str]:
        return [path for path, note in self.notes[mode].items() if note.startswith("fused")]

    def not_fused(self, mode: str) -> dict[str, str]:
        return {path: note for path, note in self.notes[mode].items() if not note.startswith("fused")}

    def recomputed(self, mode: str = "train") -> list[str]:
        """The BNs whose BN + ReLU runs in the next op, recomputed in the backward (see RECOMPUTED)."""
        return [path for path in self.fused(mode) if RECOMPUTED in self.notes[mode][path]]

    def coverage(self, mode: str) -> float:
        """The share of the model's BatchNorm layers computed inside a fused op."""
        total = len(self.notes[mode])
        return len(self.fused(mode)) / total if total else 1.0

    def __str__(self) -> str:
        lines = []
        for mode in MODES:
            recomputed = f", {len(self.recomputed(mode))} with {RECOMPUTED}" if self.recomputed(mode) else ""
            lines.append(f"{mode}: {len(self.fused(mode))} of {len(self.notes[mode])} BatchNorm layers fused "
                         f"({100 * self.coverage(mode):.1f}%){recomputed}")
            lines += [f"  not fused: {path}: {reason}" for path, reason in self.not_fused(mode).items()]
        lines += [f"untraceable: {path}: {error}" for path, error in self.untraceable.items()]
        return "\n".join(lines)
