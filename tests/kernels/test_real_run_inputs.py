"""The fused ops on inputs recorded from a real run, not random logits: a tiny SFT policy trained through the CLI,
then two PPO iterations against the world's gold judge (KL in the loss, entropy bonus). Every call the run makes to
token_logprobs_from_hidden and ppo_loss_from_hidden is recorded (the logits are hidden @ W.T of the recorded hidden
states and LM head); each backend's logits op must then agree with the fp64 reference, forward and gradient, and
with what the run itself computed. A trained policy's softmaxes, EOS tokens, ratios at 1 (the
first minibatch) and policy == reference (iteration 0) are what such inputs have and random ones lack."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from kernel_helpers import GRAD_TOL, VALUE_TOL, fp64_leaf, leaf, upstream, weighted_grad

import rlhf_kernels
from rlhf_kernels import PPOLossStats
from rlhf_kernels.reference import kl_from_logits_reference, ppo_loss_reference, token_logprobs_reference
from rlhf_lightning.modules import ppo_passes

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
FP32 = torch.float32


def recording(calls: list[dict], op, scoring: list[bool]):
    """``op`` wrapped to append {"scoring", "args", "kwargs", "out"} of every call to ``calls``: whether the call came
    from inside the rollout's scoring pass (``scoring[0]``, set by :func:`marking`), and tensors cloned before the
    call (an inplace PPO loss overwrites its logits) and detached."""

    def copy(x):
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        record = {"scoring": scoring[0], "args": [copy(a) for a in args],
                  "kwargs": {k: copy(v) for k, v in kwargs.items()}}  # fmt: skip
        out = op(*args, **kwargs)
        record["out"] = [copy(o) for o in (out if isinstance(out, tuple) else (out,))]
        calls.append(record)
        return out

    return wrapper


def marking(fn, scoring: list[bool]):
    """``fn`` wrapped to set ``scoring[0]`` while it runs: the kernel calls it makes are the scoring pass's."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        scoring[0] = True
        try:
            return fn(*args, **kwargs)
        finally:
            scoring[0] = False

    return wrapper


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, list[dict]]:
    from rlhf_lightning.cli import main

    root = tmp_path_factory.mktemp("real_run")
    calls: dict[str, list[dict]] = {"token_logprobs_from_hidden": [], "ppo_loss_from_hidden": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        # Enough SFT steps for the policy to be far from uniform on the grammar's next words.
        main(["fit", "-c", str(CONFIGS / "sft.yaml"), "--model.init_args.backbone.n_layer=1",
              "--model.init_args.backbone.d_model=32", "--model.init_args.backbone.n_head=2",
              "--model.init_args.warmup_steps=2", "--model.init_args.lr=1e-2", "--data.init_args.batch_size=16",
              "--trainer.max_steps=40", "--trainer.limit_val_batches=0", *QUIET])  # fmt: skip
        scoring = [False]
        for name in calls:
            mp.setattr(rlhf_kernels, name, recording(calls[name], getattr(rlhf_kernels, name), scoring))
        # The rollout scores its responses under the policy and the reference through this public function.
        mp.setattr(ppo_passes, "response_token_logprobs", marking(ppo_passes.response_token_logprobs, scoring))
        main(["fit", "-c", str(CONFIGS / "ppo.yaml"), "--model.init_args.reward_source=gold",
              "--model.init_args.reward_checkpoint=null", "--model.init_args.iterations=2",
              "--model.init_args.rollout_batch=8", "--model.init_args.minibatch_size=4",
              "--model.init_args.ppo_epochs=1", "--model.init_args.eval.every=100",
              "--model.init_args.sampling.max_new_tokens=12",
              "--model.init_args.kl.placement=loss", "--model.init_args.kl.estimator=k3",
              "--model.init_args.entropy_coef=0.01", "--model.init_args.lr=3e-3", "--data.init_args.eval_prompts=8",
              "--trainer.callbacks.init_args.every_n_train_steps=100", "--trainer.limit_val_batches=0",
              *QUIET])  # fmt: skip
    return calls


def rollout_logits(run: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(logits = hidden @ W.T, targets, the run's logp) of the rollouts' scoring calls: policy then reference, per
    iteration (calls outside the scoring pass, e.g. SFT's, are left out)."""
    calls = [c for c in run["token_logprobs_from_hidden"] if c["scoring"]]
    return [(c["args"][0] @ c["args"][1].T, c["args"][2], c["out"][0]) for c in calls]


def test_the_recorded_inputs_are_those_of_a_real_run(run):
    scored = rollout_logits(run)
    assert len(scored) == 4  # policy and reference, for each of the two iterations
    assert len(run["ppo_loss_from_hidden"]) == 4  # 2 iterations x 2 minibatches
    logits, _, logp = scored[0]
    assert logits.shape[0] > 8 * 2  # every real token of 8 responses, EOS included
    # Sampled from a trained policy: far likelier than uniform.
    assert logp.mean() > math.log(1 / logits.shape[1]) + 1.0
    # Iteration 0 scores with policy == reference; iteration 1 after two updates of the policy only.
    torch.testing.assert_close(scored[0][0], scored[1][0], rtol=0, atol=0)
    assert not torch.equal(scored[2][0], scored[3][0])


def test_token_logprobs_and_entropy_match_the_reference_and_the_run(run, backend):
    for logits, targets, logp_run in rollout_logits(run):
        x = leaf(logits)
        logp, entropy = rlhf_kernels.token_logprobs(x, targets, return_entropy=True, backend=backend)
        ref = fp64_leaf(logits)
        logp_e, entropy_e = token_logprobs_reference(ref, targets, return_entropy=True)
        torch.testing.assert_close(logp.double(), logp_e, **VALUE_TOL[FP32])
        torch.testing.assert_close(entropy.double(), entropy_e, **VALUE_TOL[FP32])
        torch.testing.assert_close(logp, logp_run, **VALUE_TOL[FP32])  # what the run's own backend gave
        weights = upstream(logp, entropy)
        grad = weighted_grad([logp, entropy], weights, x)
        grad_e = weighted_grad([logp_e, entropy_e], weights, ref)
        torch.testing.assert_close(grad.double(), grad_e, **GRAD_TOL[FP32])


def test_exact_kl_between_the_run_policy_and_its_reference(run, backend):
    scored = rollout_logits(run)
    for (policy, _, _), (reference, _, _) in zip(scored[0::2], scored[1::2], strict=True):
        x = leaf(policy)
        kl = rlhf_kernels.kl_from_logits(x, reference, backend=backend)
        ref = fp64_leaf(policy)
        kl_e = kl_from_logits_reference(ref, reference.double())
        # An exact zero where the policy is the reference (iteration 0); a rounding error there would pay a penalty.
        torch.testing.assert_close(kl.double(), kl_e, **VALUE_TOL[FP32])
        weights = upstream(kl)
        torch.testing.assert_close(
            weighted_grad([kl], weights, x).double(), weighted_grad([kl_e], weights, ref), **GRAD_TOL[FP32]
        )


@pytest.mark.parametrize("inplace", [False, True])
def test_ppo_loss_matches_the_reference_and_the_run(run, backend, inplace):
    for call in run["ppo_loss_from_hidden"]:
        hidden, weight, targets, old_logp, advantages, mask = call["args"]
        logits = hidden @ weight.T
        options = {k: v for k, v in call["kwargs"].items() if k not in ("ref_hidden", "ref_weight")}
        assert options["kl_coef"] > 0 and options["entropy_coef"] > 0 and options["ref_logp"] is not None
        x = leaf(logits)
        loss, stats = rlhf_kernels.ppo_loss_from_logits(
            x * 1, targets, old_logp, advantages, mask, **options, inplace=inplace, backend=backend
        )
        (grad,) = torch.autograd.grad(loss, x)
        ref = fp64_leaf(logits)
        loss_e, stats_e = ppo_loss_reference(ref, targets, old_logp, advantages, mask, **options)
        (grad_e,) = torch.autograd.grad(loss_e, ref)
        torch.testing.assert_close(loss.double(), loss_e, **VALUE_TOL[FP32])
        torch.testing.assert_close(loss, call["out"][0], **VALUE_TOL[FP32])
        for name in PPOLossStats._fields:
            torch.testing.assert_close(getattr(stats, name).double(), getattr(stats_e, name), **VALUE_TOL[FP32])
        torch.testing.assert_close(grad.double(), grad_e, **GRAD_TOL[FP32])
