"""Shared fixtures: every kernel test runs on the CPU and, when one is present, on CUDA."""

import pytest
import torch

import llada_ext as lx

_DEVICES = ["cpu", "cuda"]


def cuda_ready() -> bool:
    return torch.cuda.is_available() and lx.has_cuda_kernels()


@pytest.fixture(params=_DEVICES)
def device(request) -> str:
    """'cpu' or 'cuda' (skipped when there is no GPU or no CUDA build)."""
    if request.param == "cuda" and not cuda_ready():
        pytest.skip("needs a CUDA device and a CUDA build of the kernels")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
