"""Best-of-n sampling as a baseline policy: the expected score of the reward model's favourite of n samples, and the
analytic KL of that policy to the base one. Pure functions of sampled scores (the ``rlhf best-of-n`` command samples
them)."""

from __future__ import annotations

import math

import torch


def best_of_n_expectation(proxy: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The expected ``values`` of the response best-of-n keeps (the proxy's favourite of n drawn without replacement
    from the N samples of each prompt), exactly, from all N samples at once: far less noisy than one draw of n.

    Sorted by proxy in ascending order, the i-th sample (1-based) is the favourite of a random n-subset exactly when
    the subset holds it and n - 1 of the i - 1 below it: probability C(i - 1, n - 1) / C(N, n). Ties in the proxy are
    broken by position.

    Args:
        proxy: (B, N) the reward model's scores of N samples for each of B prompts.
        values: (B, N) what to average (the gold score, the proxy itself).
        n: 1 <= n <= N.

    Returns:
        (B,) the expectation for each prompt.
    """
    big_n = proxy.shape[-1]
    if not 1 <= n <= big_n:
        raise ValueError(f"n must be in [1, {big_n}], got {n}")
    order = proxy.argsort(dim=-1, stable=True)
    sorted_values = values.gather(-1, order).double()
    i = torch.arange(1, big_n + 1, dtype=torch.float64)
    # log C(i - 1, n - 1) - log C(N, n) through lgamma (the binomials overflow a float for N in the hundreds).
    log_w = (torch.lgamma(i) - torch.lgamma(torch.tensor(float(n))) - torch.lgamma((i - n + 1).clamp(min=1))
             - (math.lgamma(big_n + 1) - math.lgamma(n + 1) - math.lgamma(big_n - n + 1)))  # fmt: skip
    weights = torch.where(i >= n, log_w.exp(), torch.zeros_like(log_w))
    return (sorted_values * weights).sum(-1).to(values.dtype)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base policy) in nats, the analytic bound ``log n - (n - 1) / n`` (Stiennon et al. 2020; exact
    when the proxy has no ties)."""
    return math.log(n) - (n - 1) / n
