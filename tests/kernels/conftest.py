"""Fixtures of the kernel tests."""

import pytest
from kernel_helpers import BACKEND_PARAMS

import rlhf_kernels


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend name ("torch", and "triton" where triton imports)."""
    return request.param


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Lowers the Triton vocabulary block to 128 so that a row spans many blocks (no-op without triton)."""
    block = 128
    if rlhf_kernels.triton_available():
        import rlhf_kernels.triton_backend as triton_backend

        monkeypatch.setattr(triton_backend, "MAX_BLOCK", block)
    return block
