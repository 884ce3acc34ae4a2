"""Pieces every phase's LightningModule shares: the policy's token log-probs, evaluation by sampling, the AdamW +
warmup/cosine optimiser, and the tokenizer/backbone bookkeeping a self-contained checkpoint needs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

import rlhf_kernels
from rlhf_lightning.data.tokenizer import Tokenizer
from rlhf_lightning.metrics import distinct_n
from rlhf_lightning.models.hf import HFCausalLM
from rlhf_lightning.models.lora import LoRABackbone, require_peft
from rlhf_lightning.models.sampling import SamplingConfig, eval_mode, generate


def response_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log p(target) at the masked positions, the LM head fused into the kernel (no (N, V) logits tensor).

    Args:
        input_ids: (B, T) token ids; attention_mask: (B, T) real tokens.
        targets: (B, T) next-token ids; mask: (B, T) bool, positions whose target counts.

    Returns:
        (N,) log-probs, N = mask.sum().
    """
    hidden = model(input_ids, attention_mask)  # (B, T, D)
    return rlhf_kernels.token_logprobs_from_hidden(hidden[mask], model.lm_head_weight, targets[mask])


def unflatten_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of ``x[mask]``: a (B, R) tensor with ``values`` (N,) at the True entries of ``mask`` (B, R), in
    row-major order, and 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def response_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, p: int, r: int) -> torch.Tensor:
    """(B, R, D) hidden states that predict the R response tokens of prompt + response sequences ``ids`` (B, P + R)
    with attention ``mask`` (B, P + R): positions P - 1 .. P + R - 2."""
    return model(ids, mask)[:, p - 1 : p + r - 1]


def adapted_lm_head(model: nn.Module) -> nn.Module | None:
    """The LM head module when LoRA adapts it, else None.

    The fused ops compute ``hidden @ lm_head_weight.T`` themselves; an adapted head (a Hugging Face ``lm_head`` in
    ``lora.target_modules``) adds its adapter's term to that, so its logits must come from the module itself. A
    TinyGPT's head is its embedding matrix, used directly, so its logits are ``hidden @ lm_head_weight.T`` anyway.
    """
    if not isinstance(model, LoRABackbone) or not isinstance(model.base, HFCausalLM):
        return None
    head = model.base.model.get_output_embeddings()
    return head if isinstance(head, require_peft().tuners.lora.LoraLayer) else None


def response_token_logprobs(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, response_ids: torch.Tensor,
    response_mask: torch.Tensor, temperature: float, keep_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(B, R) log-probs of the response tokens under ``model`` at ``temperature`` (0 at padding), and the (N, D)
    hidden states at the real response positions when ``keep_hidden``. They equal :func:`generate`'s log-probs, so
    PPO's importance ratio starts at 1. The LM head is fused into the kernel: no (N, V) logits (unless LoRA adapts
    the head, see :func:`adapted_lm_head`).

    Args:
        ids, mask: (B, P + R) left-padded prompts then right-padded responses.
        response_ids, response_mask: (B, R).
    """
    p = ids.shape[1] - response_ids.shape[1]
    hidden = response_hidden(model, ids, mask, p, response_ids.shape[1])[response_mask]  # (N, D)
    targets = response_ids[response_mask]
    head = adapted_lm_head(model)
    if head is None:
        logp = rlhf_kernels.token_logprobs_from_hidden(hidden, model.lm_head_weight, targets, temperature)
    else:
        logp = rlhf_kernels.token_logprobs(head(hidden), targets, temperature)
    return unflatten_masked(logp.float(), response_mask), hidden if keep_hidden else None


def on_every_rank(module: L.LightningModule, flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (itself in a single process). A decision that leads to a collective
    (the gradient all-reduce of a backward pass, a checkpoint's barrier) must be the same on all ranks, or the ranks
    that took the other branch wait for the rest forever. A module outside a Trainer is one process."""
    if module._trainer is None:
        return flag
    agreed = module.trainer.strategy.reduce(torch.tensor(float(flag), device=module.device), reduce_op="min")
    return bool(agreed)


def mean_over_ranks(module: L.LightningModule, values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the ranks, in one all-reduce (the values themselves in a single process): PPO's
    iteration metrics.

    Under DDP the logger writes on rank 0 only, and a rollout's statistics are one rank's share: the mean over
    the ranks' equal-sized rollouts is the statistic of the whole batch for means (rewards, lengths, losses) and
    the mean of the ranks' values for the others (diversity, correlations). Every rank gets the same numbers,
    so the online detectors agree too. The keys depend on the configuration only, never on the data, so every
    rank sends the same vector.
    """
    keys = list(values)
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=module.device)
    return dict(zip(keys, module.trainer.strategy.reduce(local, reduce_op="mean").tolist(), strict=True))


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
    gen = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    with eval_mode(model):
        out = generate(model, prompt_ids, prompt_mask, sampling, tokenizer.eos_id, tokenizer.pad_id, gen)
    token_ids = [ids[m].tolist() for ids, m in zip(out.response_ids, out.response_mask, strict=True)]
    responses = tokenizer.decode_batch(token_ids)
    gold = well_formed = None
    if judge is not None:
        ended = out.ended.cpu().numpy()
        gold = torch.as_tensor(judge.score(prompts, responses, ended), dtype=torch.float32)
        well_formed = torch.as_tensor(judge.well_formed(responses))
    return EvalSamples(prompts, responses, out.ended, out.response_mask.sum(1), token_ids, gold, well_formed)


def eval_metrics(samples: EvalSamples, prefix: str = "eval") -> dict[str, float]:
    """Scalar summaries of a set of samples: gold reward, well-formedness, EOS rate, length, distinct-1/2 of the
    decoded words (``distinct_n_words``: PPO's ``eval/distinct_2`` counts token ids, a different figure)."""
    words = [r.split() for r in samples.responses]
    metrics = {
        f"{prefix}/eos_rate": samples.ended.float().mean().item(),
        f"{prefix}/length_mean": samples.lengths.float().mean().item(),
        f"{prefix}/distinct_1_words": distinct_n(words, 1),
        f"{prefix}/distinct_2_words": distinct_n(words, 2),
    }
    if samples.gold is not None:
        metrics[f"{prefix}/gold_reward"] = samples.gold.mean().item()
        metrics[f"{prefix}/well_formed"] = samples.well_formed.float().mean().item()
    return metrics


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table for TensorBoard's text tab; a ``|`` inside a cell is escaped."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def samples_table(samples: EvalSamples, rows: int, extra: dict[str, torch.Tensor] | None = None) -> str:
    """A markdown table of the first ``rows`` samples: prompt, response, ended, gold and ``extra`` scores."""
    cols = {"gold": samples.gold} if samples.gold is not None else {}
    cols.update(extra or {})
    body = [
        [samples.prompts[i], samples.responses[i], str(bool(samples.ended[i])), *(f"{float(v[i]):.2f}" for v in
         cols.values())] for i in range(min(rows, len(samples.prompts)))
    ]  # fmt: skip
    return markdown_table(["prompt", "response", "ended", *cols], body)


def comparison_table(
    sft: EvalSamples, cur: EvalSamples, sft_proxy: torch.Tensor | None, proxy: torch.Tensor | None, rows: int
) -> str:
    """Markdown table: prompt, SFT response and its scores, current response and its scores."""

    def scores(i: int, gold: torch.Tensor | None, prox: torch.Tensor | None) -> str:
        parts = [f"proxy {float(prox[i]):.2f}" if prox is not None else "",
                 f"gold {float(gold[i]):.2f}" if gold is not None else ""]  # fmt: skip
        return ", ".join(x for x in parts if x)

    body = [[cur.prompts[i], sft.responses[i], scores(i, sft.gold, sft_proxy), cur.responses[i],
             scores(i, cur.gold, proxy)] for i in range(min(rows, len(cur.prompts)))]  # fmt: skip
    return markdown_table(["prompt", "SFT response", "SFT scores", "policy response", "policy scores"], body)


def check_optimizer_settings(h: Mapping[str, Any], lrs: tuple[str, ...] = ("lr",)) -> None:
    """Checks a phase module's optimiser settings (``h``: its hyperparameters; ``lrs``: its learning-rate names) when
    it is constructed: torch rejects a bad one only when the optimiser is built, after the data and the models have
    loaded, in words that do not name the setting ("Invalid learning rate: -0.1")."""
    for name in lrs:
        if not h[name] > 0:  # also NaN
            raise ValueError(f"model.init_args.{name} must be > 0, got {h[name]}")
    if not h["weight_decay"] >= 0:
        raise ValueError(f"model.init_args.weight_decay must be >= 0, got {h['weight_decay']}")
    if len(h["betas"]) != 2 or not all(0 <= b < 1 for b in h["betas"]):
        raise ValueError(f"model.init_args.betas must be two numbers in [0, 1), got {list(h['betas'])}")
    if h["warmup_steps"] < 0:
        raise ValueError(f"model.init_args.warmup_steps must be >= 0, got {h['warmup_steps']}")
    if not 0 <= h["min_lr_ratio"] <= 1:
        raise ValueError(f"model.init_args.min_lr_ratio must be in [0, 1], got {h['min_lr_ratio']}")


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
    return with_lr_schedule(opt, warmup_steps, max(int(total_steps), 1), min_lr_ratio, "cosine")


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay: Literal["cosine", "linear"]
) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of the peak: linear warmup over ``warmup_steps``,
    then a cosine or linear decay to ``min_lr_ratio`` at ``total_steps`` (held there after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def with_lr_schedule(
    opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float,
    decay: Literal["cosine", "linear"],
) -> dict:  # fmt: skip
    """Lightning's optimizer config: ``opt`` with a per-step :func:`lr_factor` schedule."""

    def factor(step: int) -> float:  # a function, not a partial: LambdaLR would put a callable object's state in the
        return lr_factor(step, warmup_steps, total_steps, min_lr_ratio, decay)  # checkpoint

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
