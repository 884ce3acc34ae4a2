"""Pieces every phase's LightningModule shares: the policy's token log-probs, evaluation by sampling, the AdamW +
warmup/cosine optimiser, and the tokenizer/backbone bookkeeping a self-contained checkpoint needs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

import rlhf_kernels
from rlhf_lightning.data.tokenizer import Tokenizer
from rlhf_lightning.metrics import distinct_n
from rlhf_lightning.models.sampling import SamplingConfig, generate


def response_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log p(target) at the masked positions, through the fused kernel (no (B, T, V) logits tensor).

    Args:
        input_ids: (B, T) token ids; attention_mask: (B, T) real tokens.
        targets: (B, T) next-token ids; mask: (B, T) bool, positions whose target counts.

    Returns:
        (N,) log-probs, N = mask.sum().
    """
    hidden = model(input_ids, attention_mask)  # (B, T, D)
    logits = hidden[mask] @ model.lm_head_weight.T  # (N, V)
    return rlhf_kernels.token_logprobs(logits, targets[mask])


def on_every_rank(module: L.LightningModule, flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (itself in a single process). A decision that leads to a collective
    (the gradient all-reduce of a backward pass, a checkpoint's barrier) must be the same on all ranks, or the ranks
    that took the other branch wait for the rest forever. A module outside a Trainer is one process."""
    if module._trainer is None:
        return flag
    agreed = module.trainer.strategy.reduce(torch.tensor(float(flag), device=module.device), reduce_op="min")
    return bool(agreed)


def finite_rank_mean(module: L.LightningModule, loss: torch.Tensor, name: str) -> torch.Tensor:
    """The loss's mean over the ranks, to log (the loss itself, detached, in one process), in one all-reduce that
    also serves the check: NaN and inf carry through the mean, so every rank raises FloatingPointError together when
    the loss is not finite on some rank."""
    mean = loss.detach() if module._trainer is None else module.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
    if not bool(torch.isfinite(mean)):
        step = module.global_step
        raise FloatingPointError(f"{name} is not finite at step {step} (this rank's value: {loss.item()}): stopping")
    return mean


def shard_backbone(module: L.LightningModule, model: nn.Module) -> None:
    """FSDP2 (``fully_shard``) over the data-parallel dimension of ModelParallelStrategy's device mesh: each block of
    the backbone's transformer stack (its largest ModuleList: TinyGPT's ``blocks``, a Hugging Face model's layers),
    then the backbone itself (embeddings, final norm, the tied head); a model without a ModuleList (a head) is sharded
    whole. Each rank then holds a 1/N slice of every parameter, of its gradient and of the optimizer state; a
    block's weights are gathered only while it runs.

    Lightning's classic FSDPStrategy is not used: it breaks ``manual_backward``. Needs
    ``trainer.strategy: ModelParallelStrategy`` with ``data_parallel_size`` = the number of processes and
    ``save_distributed_checkpoint: false`` (checkpoints stay one file, loadable by the next phase unsharded).
    """
    strategy = module.trainer.strategy
    if not isinstance(strategy, ModelParallelStrategy):
        raise ValueError(f"shard: true needs trainer.strategy ModelParallelStrategy, got {type(strategy).__name__}")
    if module.device_mesh["tensor_parallel"].size() != 1:
        # Every rank is a data-parallel rank here (its own data, its own PPO prompts): nothing is split by tensor.
        raise ValueError("shard: true needs ModelParallelStrategy(tensor_parallel_size=1, data_parallel_size=N)")
    mesh = module.device_mesh["data_parallel"]
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for block in max(stacks, key=len, default=[]):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


@dataclass
class EvalSamples:
    """Responses sampled for a fixed set of prompts, decoded, with per-response gold scores when a judge exists."""

    prompts: list[str]
    responses: list[str]
    ended: torch.Tensor  # (B,) bool
    lengths: torch.Tensor  # (B,) response tokens
    token_ids: list[list[int]]
    gold: torch.Tensor | None  # (B,) or None without a gold judge
    well_formed: torch.Tensor | None  # (B,) bool or None


@torch.no_grad()
def sample_eval(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: SamplingConfig,
    seed: int,
    judge=None,
) -> EvalSamples:
    """Samples one response per prompt with a private RNG (so evaluation never moves the training RNG streams).

    Args:
        prompt_ids: (B, P) left-padded; prompt_mask: (B, P).
        judge: the world's GoldJudge, or None.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    out = generate(model, prompt_ids, prompt_mask, sampling, tokenizer.eos_id, tokenizer.pad_id, gen)
    model.train(was_training)
    token_ids = [ids[m].tolist() for ids, m in zip(out.response_ids, out.response_mask, strict=True)]
    responses = tokenizer.decode_batch(token_ids)
    gold = well_formed = None
    if judge is not None:
        ended = out.ended.cpu().numpy()
        gold = torch.as_tensor(judge.score(prompts, responses, ended), dtype=torch.float32)
        well_formed = torch.as_tensor(judge.well_formed(responses))
    return EvalSamples(prompts, responses, out.ended, out.response_mask.sum(1), token_ids, gold, well_formed)


def eval_metrics(samples: EvalSamples, prefix: str = "eval") -> dict[str, float]:
    """Scalar summaries of a set of samples: gold reward, well-formedness, EOS rate, length, distinct-1/2."""
    words = [r.split() for r in samples.responses]
    metrics = {
        f"{prefix}/eos_rate": samples.ended.float().mean().item(),
        f"{prefix}/length_mean": samples.lengths.float().mean().item(),
        f"{prefix}/distinct_1": distinct_n(words, 1),
        f"{prefix}/distinct_2": distinct_n(words, 2),
    }
    if samples.gold is not None:
        metrics[f"{prefix}/gold_reward"] = samples.gold.mean().item()
        metrics[f"{prefix}/well_formed"] = samples.well_formed.float().mean().item()
    return metrics


def samples_table(samples: EvalSamples, rows: int, extra: dict[str, torch.Tensor] | None = None) -> str:
    """A markdown table of the first ``rows`` samples for TensorBoard's text tab."""
    cols = {"gold": samples.gold} if samples.gold is not None else {}
    cols.update(extra or {})
    head = "| prompt | response | ended | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for i in range(min(rows, len(samples.prompts))):
        vals = " | ".join(f"{float(v[i]):.2f}" for v in cols.values())
        resp = samples.responses[i].replace("|", "\\|")
        lines.append(f"| {samples.prompts[i]} | {resp} | {bool(samples.ended[i])} | {vals} |")
    return "\n".join(lines)


def adamw_with_warmup_cosine(
    module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int,
    total_steps: int, min_lr_ratio: float,
) -> dict:  # fmt: skip
    """AdamW (weight decay on matrices only) with linear warmup then cosine decay to ``min_lr_ratio * lr``.

    The fused AdamW kernel updates all parameters in one pass (on CPU too): the per-parameter loop of the default
    implementation costs a tenth of a small model's training step.

    Returns:
        Lightning's optimizer config dict with a per-step scheduler.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        fused=True,
    )
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
