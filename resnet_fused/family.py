"""The ResNet family rf.fuse is measured and tested on (coverage table, bench rows, tests): torchvision's
and timm's models by name, built without weights. Importing torchvision or timm happens on first use."""
import importlib

TORCHVISION = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf")
TIMM = ("resnet18", "resnet50", "resnet50d", "resnet26t", "resnetblur50", "resnext50_32x4d", "seresnet50",
        "ecaresnet50d", "resnetrs50", "skresnet18", "resnetv2_50")
MODELS = tuple(f"torchvision/{n}" for n in TORCHVISION) + tuple(f"timm/{n}" for n in TIMM)


def build(name: str, num_classes: int = 1000):
    """A model of MODELS ("torchvision/resnet50", "timm/seresnet50"), randomly initialized."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    library, arch = name.split("/")
    if library == "torchvision":
        return getattr(importlib.import_module("torchvision.models"), arch)(num_classes=num_classes)
    return importlib.import_module("timm").create_model(arch, pretrained=False, num_classes=num_classes)
