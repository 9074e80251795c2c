"""The distinct conv shapes of ResNet-50 (torchvision's v1.5: stride on the 3x3) and ResNet-18 at a 224x224
input, shared by the benchmarks and the GPU tests."""
from dataclasses import dataclass


@dataclass(frozen=True)
class ConvShape:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    size: int  # input height = width
    epilogue: str  # "relu": conv-BN-ReLU; "add_relu": conv-BN-add-ReLU (block output); "none": conv-BN (downsample)

    @property
    def padding(self) -> int:
        return self.kernel // 2

    def output_size(self, size: int | None = None) -> int:
        size = self.size if size is None else size
        return (size + 2 * self.padding - self.kernel) // self.stride + 1

    def flops(self, batch: int, size: int | None = None) -> int:
        """2 * MACs of the convolution alone."""
        out = self.output_size(size)
        return 2 * batch * out * out * self.c_out * self.c_in * self.kernel**2


RESNET50_CONVS = [
    ConvShape("stem", 3, 64, 7, 2, 224, "relu"),
    ConvShape("l1.reduce", 64, 64, 1, 1, 56, "relu"),
    ConvShape("l1.conv3x3", 64, 64, 3, 1, 56, "relu"),
    ConvShape("l1.expand", 64, 256, 1, 1, 56, "add_relu"),
    ConvShape("l1.downsample", 64, 256, 1, 1, 56, "none"),
    ConvShape("l1.reduce_256", 256, 64, 1, 1, 56, "relu"),
    ConvShape("l2.reduce_first", 256, 128, 1, 1, 56, "relu"),
    ConvShape("l2.conv3x3_s2", 128, 128, 3, 2, 56, "relu"),
    ConvShape("l2.expand", 128, 512, 1, 1, 28, "add_relu"),
    ConvShape("l2.downsample", 256, 512, 1, 2, 56, "none"),
    ConvShape("l2.reduce", 512, 128, 1, 1, 28, "relu"),
    ConvShape("l2.conv3x3", 128, 128, 3, 1, 28, "relu"),
    ConvShape("l3.reduce_first", 512, 256, 1, 1, 28, "relu"),
    ConvShape("l3.conv3x3_s2", 256, 256, 3, 2, 28, "relu"),
    ConvShape("l3.expand", 256, 1024, 1, 1, 14, "add_relu"),
    ConvShape("l3.downsample", 512, 1024, 1, 2, 28, "none"),
    ConvShape("l3.reduce", 1024, 256, 1, 1, 14, "relu"),
    ConvShape("l3.conv3x3", 256, 256, 3, 1, 14, "relu"),
    ConvShape("l4.reduce_first", 1024, 512, 1, 1, 14, "relu"),
    ConvShape("l4.conv3x3_s2", 512, 512, 3, 2, 14, "relu"),
    ConvShape("l4.expand", 512, 2048, 1, 1, 7, "add_relu"),
    ConvShape("l4.downsample", 1024, 2048, 1, 2, 14, "none"),
    ConvShape("l4.reduce", 2048, 512, 1, 1, 7, "relu"),
    ConvShape("l4.conv3x3", 512, 512, 3, 1, 7, "relu"),
]

# ResNet-18's (BasicBlock) shapes not already above (its stem and its 3x3 convs with ReLU are ResNet-50's).
RESNET18_CONVS = [
    ConvShape("r18.l1.conv3x3_add", 64, 64, 3, 1, 56, "add_relu"),
    ConvShape("r18.l2.conv3x3_s2", 64, 128, 3, 2, 56, "relu"),
    ConvShape("r18.l2.downsample", 64, 128, 1, 2, 56, "none"),
    ConvShape("r18.l2.conv3x3_add", 128, 128, 3, 1, 28, "add_relu"),
    ConvShape("r18.l3.conv3x3_s2", 128, 256, 3, 2, 28, "relu"),
    ConvShape("r18.l3.downsample", 128, 256, 1, 2, 28, "none"),
    ConvShape("r18.l3.conv3x3_add", 256, 256, 3, 1, 14, "add_relu"),
    ConvShape("r18.l4.conv3x3_s2", 256, 512, 3, 2, 14, "relu"),
    ConvShape("r18.l4.downsample", 256, 512, 1, 2, 14, "none"),
    ConvShape("r18.l4.conv3x3_add", 512, 512, 3, 1, 7, "add_relu"),
]
