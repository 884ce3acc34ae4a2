"""The KL penalty's coefficient (beta) controllers and the per-token KL of a response.

Controllers share one small interface: ``value`` (the beta to use this iteration), ``update(kl, n_samples)`` once per
iteration with the measured per-sequence KL, and ``state_dict()`` / ``load_state_dict()`` so a resumed run continues
with the same beta.

- :class:`FixedKL`: beta never changes.
- :class:`AdaptiveKL`: Ziegler et al. (2019)'s proportional controller, as in openai/lm-human-preferences:
  ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_samples / horizon)``: beta grows while the
  policy drifts further than the target and shrinks while it stays closer, at a rate set by the horizon.
- :class:`AnnealedKL`: a schedule from a high start to a floor over a number of iterations: strong anchoring while
  the reward model's blind spots are still unexplored, more freedom later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

import rlhf_kernels

#: The adaptive controller's default horizon, in samples. Ziegler et al.'s 10,000 suits their runs of ~10^6 samples;
#: a run of this package's size (120 iterations x 64 responses = 7,680 samples) would let beta move by at most
#: exp(0.2 * 7680 / 10000) = 1.17x with it, i.e. not at all. With 1,000, beta can move by up to 1.28% per
#: 64-response iteration, about 4.6x over such a run, and settles within ~16 iterations of a change.
DEFAULT_KL_HORIZON = 1000

#: rlhf_kernels.KL_ESTIMATORS (re-exported by rlhf_lightning.rl): k1, k2, k3 from the sampled tokens, "full" the exact
#: KL over the vocabulary.
KLEstimator = Literal["k1", "k2", "k3", "full"]


def per_token_kl(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    estimator: KLEstimator = "k1",
    full_kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens, 0 at padding.

    Args:
        logp, ref_logp: (B, R) log-probs of the sampled tokens under the policy and the reference.
        mask: (B, R) real response tokens.
        estimator: "k1" (log ratio: unbiased, can be negative), "k2" (half squared log ratio), "k3"
            ((ratio - 1) - log ratio: unbiased, >= 0), or "full" (the exact KL over the whole vocabulary, given).
        full_kl: (B, R) exact per-position KL from the logits (:func:`rlhf_kernels.kl_from_logits`), for "full".

    Returns:
        (B, R) per-token KL; its sum over a row is the sequence KL.
    """
    if estimator == "full":
        if full_kl is None:
            raise ValueError("estimator 'full' needs full_kl, the exact KL computed from both models' logits")
        kl = full_kl
    else:
        kl = rlhf_kernels.kl_estimate(logp.flatten(), ref_logp.flatten(), estimator).view_as(logp)
    return kl * mask.to(kl.dtype)


class FixedKL:
    """A constant beta."""

    def __init__(self, value: float):
        if value < 0:
            raise ValueError(f"the KL coefficient must be >= 0, got {value}")
        self.value = float(value)

    def update(self, kl: float, n_samples: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKL(FixedKL):
    """Proportional controller towards a target per-sequence KL (Ziegler et al., 2019).

    Args:
        value: initial beta.
        target: the per-sequence KL (nats) to hold.
        horizon: samples over which a 20% error changes beta by a factor e^0.2 (larger = slower).
        min_value, max_value: bounds on beta (a beta stuck at a bound is a diagnostic).
    """

    def __init__(self, value: float, target: float, horizon: int = DEFAULT_KL_HORIZON, min_value: float = 1e-4,
                 max_value: float = 10.0):  # fmt: skip
        super().__init__(value)
        if target <= 0:
            raise ValueError(f"the target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"the KL horizon must be > 0, got {horizon}")
        if not 0 <= min_value <= max_value:
            raise ValueError(f"need 0 <= kl min_value <= max_value, got {min_value}, {max_value}")
        self.target, self.horizon = float(target), int(horizon)
        self.min_value, self.max_value = float(min_value), float(max_value)

    def update(self, kl: float, n_samples: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value = min(max(self.value * (1.0 + error * n_samples / self.horizon), self.min_value), self.max_value)


class AnnealedKL(FixedKL):
    """beta from ``start`` down to ``floor`` over ``iterations`` updates, then held at the floor.

    Args:
        start, floor: first and last beta (start >= floor).
        iterations: length of the decay.
        schedule: "cosine", "linear" or "exponential" (geometric: equal ratios per iteration; needs floor > 0).
    """

    def __init__(self, start: float, floor: float, iterations: int,
                 schedule: Literal["cosine", "linear", "exponential"] = "cosine"):  # fmt: skip
        super().__init__(start)
        if not 0 <= floor <= start:
            raise ValueError(f"need 0 <= kl floor <= start, got floor {floor}, start {start}")
        if iterations <= 0:
            raise ValueError(f"the annealing length must be > 0 iterations, got {iterations}")
        if schedule not in ("cosine", "linear", "exponential"):
            raise ValueError(f"kl schedule must be cosine, linear or exponential, got {schedule!r}")
        if schedule == "exponential" and floor == 0:
            raise ValueError("an exponential KL schedule needs floor > 0")
        self.start, self.floor, self.iterations, self.schedule = float(start), float(floor), int(iterations), schedule
        self.step = 0

    def _at(self, step: int) -> float:
        p = min(step / self.iterations, 1.0)
        if self.schedule == "linear":
            return self.start + (self.floor - self.start) * p
        if self.schedule == "exponential":
            return self.start * (self.floor / self.start) ** p
        return self.floor + (self.start - self.floor) * 0.5 * (1 + math.cos(math.pi * p))

    def update(self, kl: float, n_samples: int) -> None:
        self.step += 1
        self.value = self._at(self.step)

    def state_dict(self) -> dict:
        return {"value": self.value, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.step = float(state["value"]), int(state["step"])


KLController = FixedKL | AdaptiveKL | AnnealedKL


def kl_controller(
    kind: Literal["fixed", "adaptive", "annealed"],
    beta: float,
    target: float | None = None,
    horizon: int = DEFAULT_KL_HORIZON,
    floor: float = 0.0,
    anneal_iterations: int = 100,
    schedule: Literal["cosine", "linear", "exponential"] = "cosine",
    min_value: float = 1e-4,
    max_value: float = 10.0,
) -> KLController:
    """The controller a config names (see the classes for the arguments)."""
    if kind == "fixed":
        return FixedKL(beta)
    if kind == "adaptive":
        if target is None:
            raise ValueError("kl controller 'adaptive' needs a target KL (kl.target)")
        return AdaptiveKL(beta, target, horizon, min_value, max_value)
    if kind == "annealed":
        return AnnealedKL(beta, floor, anneal_iterations, schedule)
    raise ValueError(f"kl controller must be fixed, adaptive or annealed, got {kind!r}")


@dataclass
class KLConfig:
    """The KL penalty towards the reference: its coefficient beta and controller, its estimator and where it acts.

    coef: beta (the controller's start).
    controller: "fixed", "adaptive" (towards ``target`` nats per response over ``horizon`` samples, beta within
        [min_coef, max_coef]) or "annealed" (from ``coef`` to ``floor`` over ``anneal_iterations`` with ``schedule``).
    estimator: the per-token KL penalised. In the reward (``placement: reward``) only "k1": the reward is a constant
        to the policy gradient, whose score-function estimate then has the KL's own gradient only for k1 (k2 and k3
        give a biased one, "full" none at the sampled token). In the loss: "k2" (gradient of KL(pi || ref) in
        expectation), "k3" (of the reverse KL, GRPO's choice) or "full" (the exact KL over the vocabulary from both
        models' logits: one more reference forward per minibatch); k1 is refused there (zero gradient in expectation).
    metric: the estimator logged as ``objective/kl`` and fed to the controller: "k1", "k2", "k3" or "full" (k3 or
        full: a low-noise, non-negative measurement; full costs both models' (N, V) logits per rollout).
    placement: "reward" (``-beta * KL_t`` per token in the shaped reward) or "loss" (``beta * k(logp, ref_logp)`` in
        the policy loss, GRPO style).
    """

    coef: float = 0.05
    controller: Literal["fixed", "adaptive", "annealed"] = "fixed"
    target: float | None = None
    horizon: int = DEFAULT_KL_HORIZON
    min_coef: float = 1e-4
    max_coef: float = 10.0
    floor: float = 0.0
    anneal_iterations: int = 100
    schedule: Literal["cosine", "linear", "exponential"] = "cosine"
    estimator: KLEstimator = "k1"
    metric: KLEstimator = "k1"
    placement: Literal["reward", "loss"] = "reward"

    def __post_init__(self) -> None:
        for name in ("estimator", "metric"):
            if getattr(self, name) not in rlhf_kernels.KL_ESTIMATORS:
                raise ValueError(f"kl.{name} must be one of {rlhf_kernels.KL_ESTIMATORS}, got {getattr(self, name)!r}")
        if self.placement not in ("reward", "loss"):
            raise ValueError(f"kl.placement must be 'reward' or 'loss', got {self.placement!r}")
        if self.in_loss and self.estimator == "k1":
            # In the loss only the estimator's gradient acts: k1's is zero in expectation (no pull towards the
            # reference at all), k2's is that of KL(pi || ref), k3's that of KL(ref || pi), full's the exact one.
            raise ValueError("kl.estimator 'k1' cannot be used with kl.placement 'loss': its gradient is zero in "
                             "expectation; use k2, k3 or full")  # fmt: skip
        if not self.in_loss and self.estimator != "k1":
            # In the reward the penalty acts through the score-function gradient E[kl_t grad log pi(y_t)], which is
            # grad KL only for k1 (docs/kl_penalty.md).
            raise ValueError(f"kl.estimator {self.estimator!r} in the reward has a biased (or zero) policy gradient; "
                             "use k1 in the reward, or kl.placement: loss with it (set kl.metric to log another "
                             "estimator)")  # fmt: skip

    @property
    def in_loss(self) -> bool:
        return self.placement == "loss"

    def build_controller(self) -> KLController:
        """The controller this config describes."""
        return kl_controller(self.controller, self.coef, target=self.target, horizon=self.horizon, floor=self.floor,
                             anneal_iterations=self.anneal_iterations, schedule=self.schedule,
                             min_value=self.min_coef, max_value=self.max_coef)  # fmt: skip
