"""Shared fixtures. Without a GPU, Triton kernels run in the interpreter on CPU tensors; the flag has to
be set before any module that defines Triton kernels is imported, hence here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



def pytest_report_header(config):
    """Which resnet_fused the tests import (an editable checkout or an installed copy) and what it loaded."""
    import resnet_fused as rf

    info = rf.build_info()
    return [f"resnet_fused: {os.path.dirname(rf.__file__)} (cpu_compiled={info['cpu_compiled']}, "
            f"cuda_compiled={info['cuda_compiled']}, backends={rf.available_backends()})"]
