"""Batched generation for rollouts and evaluation: left-padded prompts, a preallocated KV cache, temperature /
top-k / top-p, per-sequence stop at EOS.

Any backbone with the policy interface works (TinyGPT, the Hugging Face adapter):
``forward(input_ids, attention_mask, position_ids, cache) -> hidden``, ``lm_head_weight``, ``new_cache(B, max_len)``.

Sampling is Gumbel-max on the filtered, temperature-scaled logits, with noise drawn from the caller's generator: the
same seed gives the same tokens with and without the KV cache (tiny float differences between the two paths cannot
flip a multinomial draw's bucket the way they could flip inverse-CDF sampling).

The log-probs returned are those of the full temperature-scaled distribution (before top-k / top-p), computed with
:func:`rlhf_kernels.token_logprobs` — exactly what the PPO update recomputes, so the importance ratio starts at 1.
With top-k, top-p or greedy decoding the tokens come from another distribution, so PPO refuses those settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

import rlhf_kernels
from rlhf_lightning.data.collate import join_left_right
from rlhf_lightning.data.tokenizer import Tokenizer
from rlhf_lightning.models.tinygpt import positions_from_mask


class PolicyBackbone(Protocol):
    lm_head_weight: torch.Tensor

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor: ...

    def new_cache(self, batch: int, max_len: int): ...


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block and back in its previous mode after it: sampling and scoring passes
    must not run training-mode layers, and the caller's mode must survive them."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class SamplingConfig:
    """How to sample a response.

    max_new_tokens: response length cap (a response that hits it has no EOS: ``ended`` is False).
    temperature: > 0; logits are divided by it for sampling and for the returned log-probs. 0 means greedy.
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0: all).
    """

    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Generation(NamedTuple):
    """Sampled responses.

    response_ids: (B, R) token ids; EOS included where generated; pad_id after it.
    response_mask: (B, R) bool, True for generated tokens (EOS included).
    logprobs: (B, R) fp32 log-probs of the tokens under the temperature-scaled policy, 0 where masked.
    ended: (B,) bool, True where the response emitted EOS.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ended: torch.Tensor


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-k / top-p set at -inf.

    Args:
        logits: (B, V) temperature-scaled logits.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the most likely token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: PolicyBackbone,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: SamplingConfig,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    any_alive: Callable[[bool], bool] | None = None,
) -> Generation:
    """Samples one response per prompt.

    Args:
        model: the policy backbone (eval mode is the caller's choice).
        prompt_ids: (B, P) left-padded prompt token ids.
        prompt_mask: (B, P) 1 for real prompt tokens.
        config: sampling settings.
        eos_id, pad_id: special token ids.
        generator: RNG for the Gumbel noise (on the model's device); None uses the global RNG.
        use_cache: False recomputes the whole sequence every step (the naive reference the cache is tested against).
        any_alive: whether to go on, given whether a row of this batch is still generating. None: go on exactly
            then. A sharded (FSDP2) model's forward is a collective, so ranks sampling different prompts must stop
            together: they pass whether a row is alive on any rank (the finished ones add padding columns).

    Returns:
        Generation with R <= max_new_tokens columns (stops early once every row has ended).
    """
    b = prompt_ids.shape[0]
    device = prompt_ids.device
    temperature = config.temperature or 1.0
    mask = prompt_mask.bool()
    cache = model.new_cache(b, prompt_ids.shape[1] + config.max_new_tokens) if use_cache else None
    hidden = model(prompt_ids, mask, positions_from_mask(mask), cache)[:, -1]  # (B, D)
    weight = model.lm_head_weight  # after a forward: a sharded (FSDP2) model's root weights are whole from then on
    seq = prompt_ids
    tokens, logps, alive_steps = [], [], []
    alive = torch.ones(b, dtype=torch.bool, device=device)
    for _ in range(config.max_new_tokens):
        logits = (hidden @ weight.T).float()  # (B, V)
        scaled = rlhf_kernels.apply_temperature(logits, temperature)
        if config.temperature == 0:
            token = scaled.argmax(-1)
        else:
            filtered = filter_logits(scaled, config.top_k, config.top_p)
            u = torch.rand(filtered.shape, generator=generator, device=device).clamp_(min=1e-20)
            token = (filtered - torch.log(-torch.log(u))).argmax(-1)
        logp = rlhf_kernels.token_logprobs(logits, token, temperature)
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        tokens.append(token)
        logps.append(torch.where(alive, logp, torch.zeros_like(logp)))
        alive_steps.append(alive)
        alive = alive & (token != eos_id)
        if not (any_alive or bool)(bool(alive.any())):
            break
        mask = torch.cat([mask, alive_steps[-1].unsqueeze(1)], dim=1)  # finished rows' pads are masked keys
        pos = positions_from_mask(mask)[:, -1:]
        if cache is not None:
            hidden = model(token.unsqueeze(1), mask, pos, cache)[:, -1]
        else:
            seq = torch.cat([seq, token.unsqueeze(1)], dim=1)
            hidden = model(seq, mask, positions_from_mask(mask), None)[:, -1]
    response_mask = torch.stack(alive_steps, 1)
    response_ids = torch.stack(tokens, 1)
    ended = (response_ids == eos_id).any(-1)
    return Generation(response_ids, response_mask, torch.stack(logps, 1), ended)


@torch.no_grad()
def sample_prompt_responses(
    policy: nn.Module, dm: Any, tokenizer: Tokenizer, n: int, sampling: SamplingConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + response batches (n, T) of ``policy``'s responses to n training prompts: the prompts
    drawn by ``dm.train_prompt_batch(n, seed)``, the sampling noise from a private generator seeded with ``seed`` (the
    same policy, prompts and seed give the same batch). Sampled in eval mode on the policy's device (where
    configure_model built it: CUDA on a GPU); the mode is restored; the batch is returned on the CPU."""
    device = next(iter(policy.parameters())).device
    prompts = {k: v.to(device) for k, v in dm.train_prompt_batch(n, seed).items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(policy):
        out = generate(policy, prompts["prompt_ids"], prompts["prompt_mask"], sampling, tokenizer.eos_id,
                       tokenizer.pad_id, gen)  # fmt: skip
    ids, mask = join_left_right(prompts["prompt_ids"], prompts["prompt_mask"], out.response_ids, out.response_mask)
    return ids.cpu(), mask.cpu()


@torch.no_grad()
def sample_responses(
    policy: nn.Module, sampling: SamplingConfig, eos_id: int, pad_id: int, batches: list[dict[str, torch.Tensor]],
    seed: int,
) -> tuple[list[list[int]], list[bool]]:  # fmt: skip
    """One response per prompt of the collated ``batches`` (``prompt_ids``, ``prompt_mask``: (b, P) each,
    left-padded), the batches in turn with one private generator seeded with ``seed``: each row's response token ids
    (with EOS where it ended) and whether it ended. Sampled in eval mode on the policy's device (its mode is
    restored). A :data:`~rlhf_lightning.data.modules.ResponseSampler` once the first four arguments are bound."""
    device = next(iter(policy.parameters())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    responses, ended = [], []
    with eval_mode(policy):
        for batch in batches:
            ids, mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
            out = generate(policy, ids, mask, sampling, eos_id, pad_id, gen)
            rows, masks = out.response_ids.cpu(), out.response_mask.cpu()  # (b, R) each
            responses += [row[m].tolist() for row, m in zip(rows, masks, strict=True)]
            ended += out.ended.cpu().tolist()
    return responses, ended
