"""Backend choice (argument, "auto", the environment override) and the argument checks of the public ops."""

import importlib.util
from collections.abc import Callable

import pytest
import torch
from kernel_helpers import make_logits

import rlhf_kernels
import rlhf_kernels.torch_backend as torch_backend
from rlhf_kernels import (
    ENV_VAR,
    bradley_terry_loss,
    kl_estimate,
    kl_from_logits,
    ppo_loss_from_logits,
    resolve_backend,
    token_logprobs,
)
from rlhf_kernels.reference import token_logprobs_reference
from rlhf_kernels.validate import CHECK_VALUES_ENV

CPU = torch.device("cpu")


def _test_device() -> torch.device:
    """Where the tests make tensors: CPU, or CUDA under RLHF_TEST_DEVICE=cuda (the default device then)."""
    return torch.empty(0).device


needs_triton = pytest.mark.skipif(not rlhf_kernels.triton_available(), reason="triton is not installed")


def test_triton_available_matches_installation() -> None:
    assert rlhf_kernels.triton_available() == (importlib.util.find_spec("triton") is not None)


@pytest.mark.cpu_only
def test_auto_picks_torch_on_cpu() -> None:
    assert resolve_backend("auto", CPU) is torch_backend
    assert resolve_backend("torch", CPU) is torch_backend


@pytest.mark.cpu_only
@needs_triton
def test_triton_backend_resolves_under_the_interpreter() -> None:
    import rlhf_kernels.triton_backend as triton_backend

    assert resolve_backend("triton", CPU) is triton_backend


def _spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Counts the calls of module.name (still calling through)."""
    calls: list[int] = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@needs_triton
@pytest.mark.parametrize("asked", ["torch", "auto", "triton"])
def test_environment_forces_triton(monkeypatch: pytest.MonkeyPatch, asked: str) -> None:
    import rlhf_kernels.triton_backend as triton_backend

    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend(asked, _test_device()) is triton_backend
    triton_calls = _spy(monkeypatch, triton_backend, "logprob_forward")
    torch_calls = _spy(monkeypatch, torch_backend, "logprob_forward")
    logits = make_logits(8, 37)
    targets = torch.randint(0, 37, (8,))
    logp = token_logprobs(logits, targets, backend=asked)
    assert triton_calls and not torch_calls
    torch.testing.assert_close(logp, token_logprobs_reference(logits, targets), rtol=1e-5, atol=1e-5)


@needs_triton
def test_environment_forces_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import rlhf_kernels.triton_backend as triton_backend

    monkeypatch.setenv(ENV_VAR, " torch ")  # surrounding blanks are ignored
    assert resolve_backend("triton", CPU) is torch_backend
    triton_calls = _spy(monkeypatch, triton_backend, "kl_forward")
    torch_calls = _spy(monkeypatch, torch_backend, "kl_forward")
    logits = make_logits(4, 37)
    kl_from_logits(logits, logits, backend="triton")
    assert torch_calls and not triton_calls


def test_empty_environment_value_is_no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "")
    assert resolve_backend("auto", CPU) is torch_backend


@pytest.mark.parametrize("value", ["cuda", "gpu", "torch,triton"])
def test_invalid_environment_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("torch", CPU)
    logits = make_logits(2, 7)
    with pytest.raises(ValueError, match=ENV_VAR):
        token_logprobs(logits, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name", ["cuda", "jax", "", "numpy"])
def test_invalid_backend_name(name: str) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(name, CPU)
    logits = make_logits(2, 7)
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logprobs(logits, torch.zeros(2, dtype=torch.long), backend=name)
    with pytest.raises(ValueError, match="backend must be one of"):
        kl_estimate(torch.zeros(3), torch.zeros(3), backend=name)


@pytest.mark.cpu_only
@needs_triton
def test_triton_on_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", CPU)
    logits = make_logits(2, 7)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        token_logprobs(logits, torch.zeros(2, dtype=torch.long), backend="triton")
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        token_logprobs(logits, torch.zeros(2, dtype=torch.long), backend="torch")
    # "auto" still works on CPU: it never picks Triton there.
    monkeypatch.delenv(ENV_VAR)
    assert resolve_backend("auto", CPU) is torch_backend


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks: a ValueError that names the argument.

N, V = 4, 11


def _logits() -> torch.Tensor:
    return torch.randn(N, V)


def _targets() -> torch.Tensor:
    return torch.randint(0, V, (N,))


def _ppo(**overrides) -> None:
    args = {
        "logits": _logits(),
        "targets": _targets(),
        "old_logp": -torch.rand(N),
        "advantages": torch.randn(N),
        "mask": torch.ones(N, dtype=torch.bool),
    }
    args.update(overrides)
    ppo_loss_from_logits(**args, backend="torch")


def _targets_with(index: int, value: int) -> torch.Tensor:
    t = _targets()
    t[index] = value
    return t


INVALID: dict[str, tuple[Callable[[], object], str]] = {
    "logits_1d": (lambda: token_logprobs(torch.randn(V), torch.tensor([0])), r"logits must have shape \(N, V\)"),
    "logits_3d": (lambda: token_logprobs(torch.randn(2, N, V), _targets()), r"logits must have shape \(N, V\)"),
    "logits_int": (lambda: token_logprobs(torch.randint(0, 5, (N, V)), _targets()), "logits must be float16"),
    "logits_not_tensor": (lambda: token_logprobs([[0.0, 1.0]], torch.tensor([0])), "logits must be a torch.Tensor"),
    "logits_empty_vocab": (lambda: token_logprobs(torch.randn(N, 0), _targets()), "logits has an empty vocabulary"),
    "targets_length": (
        lambda: token_logprobs(_logits(), torch.zeros(N + 1, dtype=torch.long)),
        "targets must have shape",
    ),
    "targets_2d": (lambda: token_logprobs(_logits(), torch.zeros(N, 1, dtype=torch.long)), "targets must have shape"),
    "targets_float": (lambda: token_logprobs(_logits(), torch.zeros(N)), "targets must be an integer tensor"),
    "targets_bool": (lambda: token_logprobs(_logits(), torch.zeros(N, dtype=torch.bool)), "targets must be an integer"),
    "targets_negative": (
        lambda: token_logprobs(_logits(), _targets_with(2, -1)),
        r"targets\[2\] = -1 is outside the vocabulary \[0, 11\)",
    ),
    "targets_too_large": (
        lambda: token_logprobs(_logits(), _targets_with(3, V)),
        r"targets\[3\] = 11 is outside the vocabulary",
    ),
    "ppo_targets_too_large": (lambda: _ppo(targets=_targets_with(1, V + 5)), r"targets\[1\] = 16 is outside"),
    "old_logp_shape": (lambda: _ppo(old_logp=torch.zeros(N + 1)), r"old_logp must have shape \(4,\)"),
    "old_logp_2d": (lambda: _ppo(old_logp=torch.zeros(N, 1)), "old_logp must have shape"),
    "old_logp_int": (lambda: _ppo(old_logp=torch.zeros(N, dtype=torch.long)), "old_logp must be a floating"),
    "advantages_shape": (lambda: _ppo(advantages=torch.zeros(N - 1)), "advantages must have shape"),
    "mask_shape": (lambda: _ppo(mask=torch.ones(N + 2, dtype=torch.bool)), "mask must have shape"),
    "ref_logp_shape": (lambda: _ppo(ref_logp=torch.zeros(2 * N), kl_coef=0.1), "ref_logp must have shape"),
    "ref_logp_missing": (lambda: _ppo(kl_coef=0.1), "ref_logp is required"),
    "ref_logits_shape": (lambda: kl_from_logits(_logits(), torch.randn(N, V + 1)), "ref_logits shape"),
    "ref_logits_rows": (lambda: kl_from_logits(_logits(), torch.randn(N + 1, V)), "ref_logits shape"),
    "ref_logits_dtype": (lambda: kl_from_logits(_logits(), _logits().double()), "ref_logits has dtype"),
    "ref_logits_1d": (lambda: kl_from_logits(_logits(), torch.randn(V)), "ref_logits must have shape"),
    "temperature_zero": (lambda: token_logprobs(_logits(), _targets(), 0.0), "temperature must be"),
    "temperature_negative": (lambda: kl_from_logits(_logits(), _logits(), -1.0), "temperature must be"),
    "temperature_nan": (lambda: token_logprobs(_logits(), _targets(), float("nan")), "temperature must be"),
    "temperature_inf": (lambda: _ppo(temperature=float("inf")), "temperature must be"),
    "clip_eps_low_negative": (lambda: _ppo(clip_eps_low=-0.1), "clip_eps_low must be"),
    "clip_eps_high_negative": (lambda: _ppo(clip_eps_high=-0.2), "clip_eps_high must be"),
    "clip_eps_nan": (lambda: _ppo(clip_eps_high=float("nan")), "clip_eps_high must be"),
    "kl_estimator_unknown": (lambda: _ppo(kl_estimator="k4"), "kl_estimator must be one of"),
    "estimator_unknown": (lambda: kl_estimate(torch.zeros(3), torch.zeros(3), "kl"), "estimator must be one of"),
    "kl_estimate_length": (lambda: kl_estimate(torch.zeros(3), torch.zeros(4)), "ref_logp must have shape"),
    "kl_estimate_2d": (lambda: kl_estimate(torch.zeros(3, 1), torch.zeros(3, 1)), "logp must have shape"),
    "r_rejected_length": (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(2)), "r_rejected must have shape"),
    "r_chosen_2d": (lambda: bradley_terry_loss(torch.zeros(3, 2), torch.zeros(3, 2)), "r_chosen must have shape"),
    "margin_length": (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2)), "margin must have"),
    "margin_type": (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), "1"), "margin must be a number"),
    "reduction_unknown": (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), reduction="sum"), "reduction"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_arguments(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")  # target ids are checked on a GPU only when asked (a host sync)
    call, message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_checks_run_before_any_kernel(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """A bad target id is reported by the checks, on either backend, before a kernel could read out of bounds."""
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")
    module = resolve_backend(backend, _test_device())
    calls = _spy(monkeypatch, module, "logprob_forward")
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        token_logprobs(_logits(), _targets_with(0, -3), backend=backend)
    assert not calls


def test_target_values_are_checked_on_cpu_or_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_kernels.validate import values_checked

    monkeypatch.delenv(CHECK_VALUES_ENV, raising=False)
    assert values_checked(torch.zeros(1, device="cpu"))
    assert not values_checked(torch.zeros(1, device="meta"))  # any non-CPU device: no host sync by default
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")
    assert values_checked(torch.zeros(1, device="meta"))
