"""Fixtures and hooks of the whole test suite (the kernel tests' helpers are in tests/kernels/kernel_helpers.py:
test modules must not import a conftest by name, since every folder's conftest is a module called "conftest").

The Triton kernels run on CPU tensors under the Triton interpreter, which is switched on here, before anything
imports triton (the interpreter is chosen when triton is first imported).

``RLHF_TEST_DEVICE=cuda`` instead runs the tests on the GPU (tensors made on CUDA by default, Triton compiled, no
interpreter): ``RLHF_TEST_DEVICE=cuda pytest tests/kernels``. Tests about CPU-only behaviour carry the ``cpu_only``
marker and are skipped there.
"""

import os

os.environ["TRITON_INTERPRET"] = "0" if os.environ.get("RLHF_TEST_DEVICE") == "cuda" else "1"

import pytest
import torch

import rlhf_kernels

TEST_DEVICE = os.environ.get("RLHF_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"RLHF_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")

SEED = 1234


@pytest.fixture(autouse=True)
def _seed_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the same seed, and with no backend override in the environment: the tests name their
    backends explicitly (the override itself is tested in test_dispatch_and_validation.py)."""
    torch.manual_seed(SEED)
    monkeypatch.delenv(rlhf_kernels.ENV_VAR, raising=False)
    if TEST_DEVICE == "cuda":
        torch.set_default_device("cuda")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TEST_DEVICE == "cpu":
        return
    skip = pytest.mark.skip(reason="checks CPU-only behaviour (RLHF_TEST_DEVICE=cuda)")
    for item in items:
        if item.get_closest_marker("cpu_only"):
            item.add_marker(skip)
