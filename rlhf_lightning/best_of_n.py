"""``rlhf best-of-n``: best-of-n sampling from the SFT policy as a baseline policy.

For each held-out prompt, N = max(n) responses are sampled from the SFT policy once; for every n asked, the figures
are the exact expectation over n-subsets of those N samples of the reward model's favourite's gold and proxy scores
(:func:`~rlhf_lightning.rl.best_of_n.best_of_n_expectation`), beside the analytic KL ``log n - (n - 1) / n`` of the
best-of-n policy to the SFT policy. So a DPO or PPO run's held-out gold and KL read against what reranking alone
buys for the same KL. Writes ``OUT/best_of_n.json`` and ``OUT/best_of_n.md`` and prints the table.

    rlhf best-of-n --sft-checkpoint runs/sft/checkpoints/last.ckpt --rm-checkpoint runs/rm/checkpoints/last.ckpt \\
        --n 1,2,4,8,16,32,64 --out runs/best_of_n
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.data.tokenizer import check_same_tokenizer
from rlhf_lightning.errors import ArgumentParser
from rlhf_lightning.models.backbone import freeze, load_sft_backbone
from rlhf_lightning.models.reward import RewardModel, load_reward_model
from rlhf_lightning.models.sampling import SamplingConfig
from rlhf_lightning.modules.common import markdown_table, sample_eval
from rlhf_lightning.modules.ppo_eval import eval_proxy
from rlhf_lightning.rl.best_of_n import best_of_n_expectation, best_of_n_kl


@torch.no_grad()
def best_of_n(
    policy: torch.nn.Module, reward_model: RewardModel, dm: PromptDataModule, ns: list[int], sampling: SamplingConfig,
    seed: int, ensemble_k: float = 0.0,
) -> list[dict[str, float]]:  # fmt: skip
    """One row per n of ``ns``: ``n``, the expected ``gold`` (None without a gold judge) and ``proxy`` reward of the
    best-of-n response on ``dm``'s held-out prompts (means over the prompts), and the analytic ``kl`` (nats).

    Draw j of the max(ns) draws samples every prompt once with the seed ``seed + j``; the proxy is PPO's
    ``eval/proxy_reward`` (the reward model's normalised, conservative score), so the figures compare with a run's.
    """
    prompts, batch = dm.eval_prompts()
    device = next(policy.parameters()).device
    ids, mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
    proxies, golds = [], []
    for j in range(max(ns)):
        samples = sample_eval(policy, dm.tokenizer, prompts, ids, mask, sampling, seed + j, dm.judge)
        proxies.append(eval_proxy(reward_model, dm.tokenizer, samples, batch, ensemble_k, device))
        golds.append(samples.gold)
    proxy = torch.stack(proxies, 1)  # (B, N)
    gold = torch.stack(golds, 1) if dm.judge is not None else None
    rows = []
    for n in ns:
        row = {"n": n, "proxy": float(best_of_n_expectation(proxy, proxy, n).mean()), "kl": best_of_n_kl(n)}
        row["gold"] = float(best_of_n_expectation(proxy, gold, n).mean()) if gold is not None else None
        rows.append(row)
    return rows


def best_of_n_main(argv: list[str]) -> None:
    description = ("Best-of-n sampling from the SFT policy, reranked by the reward model: gold and proxy reward on "
                   "held-out prompts per n, and the analytic KL.")  # fmt: skip
    parser = ArgumentParser(prog="rlhf best-of-n", description=description)
    parser.add_argument("--sft-checkpoint", type=Path, default=Path("runs/sft/checkpoints/last.ckpt"))
    parser.add_argument("--rm-checkpoint", type=Path, default=Path("runs/rm/checkpoints/last.ckpt"))
    parser.add_argument("--data-dir", type=Path, default=Path("runs/world"),
                        help="the world (or data) folder of the held-out prompts (prompts_val)")  # fmt: skip
    parser.add_argument("--n", default="1,2,4,8,16,32,64", help="comma-separated sample counts (each >= 1)")
    parser.add_argument("--prompts", type=int, default=256, help="held-out responses per draw (cycling the prompts)")
    parser.add_argument("--max-prompt-len", type=int, default=16, help="the prompt budget (the configs' own)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, required=True, help="folder for best_of_n.json and best_of_n.md")
    args = parser.parse_args(argv)
    try:
        ns = sorted({int(x) for x in args.n.split(",")})
    except ValueError:
        parser.error(f"--n {args.n!r}: expected comma-separated integers")
    if ns[0] < 1:
        parser.error(f"--n {args.n!r}: every n must be >= 1")
    for name, path in (("--sft-checkpoint", args.sft_checkpoint), ("--rm-checkpoint", args.rm_checkpoint)):
        if not path.is_file():
            parser.error(f"{name} {path}: no such file")
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, tokenizer = load_sft_backbone(args.sft_checkpoint)
    reward_model, rm_tokenizer = load_reward_model(args.rm_checkpoint)
    check_same_tokenizer(rm_tokenizer, tokenizer, f"the tokenizers of {args.sft_checkpoint} and {args.rm_checkpoint}"
                         " differ")  # fmt: skip
    dm = PromptDataModule(data_dir=str(args.data_dir), generate_world=False, eval_prompts=args.prompts,
                          max_prompt_len=args.max_prompt_len)  # fmt: skip
    dm.setup("validate")
    check_same_tokenizer(dm.tokenizer, tokenizer, f"{args.data_dir}'s tokenizer differs from {args.sft_checkpoint}'s")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    rows = best_of_n(freeze(policy).to(device), freeze(reward_model).to(device), dm, ns, sampling, args.seed)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"sft_checkpoint": str(args.sft_checkpoint), "rm_checkpoint": str(args.rm_checkpoint),
              "prompts": args.prompts, "seed": args.seed, "seconds": seconds, "rows": rows}  # fmt: skip
    (args.out / "best_of_n.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = markdown_table(["n", "gold", "proxy", "KL (nats)"],
                           [[str(r["n"]), cell(r["gold"]), cell(r["proxy"]), cell(r["kl"])] for r in rows])  # fmt: skip
    (args.out / "best_of_n.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"[best-of-n] {max(ns)} samples x {args.prompts} prompts in {seconds:.0f} s; written to {args.out}")
