"""The three phases under Lightning's DDP strategy: 2 CPU processes (gloo), through the real CLI in a subprocess
(Lightning's launcher starts the second rank by re-running the command), a few steps each.

Each run carries ``ddp_probe.DDPProbe``, which writes what every rank saw; the tests check that the ranks end with
bit-identical models, that the logged metrics are reduced across ranks rather than rank 0's own, that only rank 0
writes checkpoints and event files, that PPO's ranks roll out different prompts, and that every rank holds the same
beta and running score statistics. The same three runs sharded with FSDP2 (``shard: true`` under ModelParallelStrategy)
must end with the DDP runs' models. All six runs share one launch (ddp_runner.py): about 80 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from rlhf_lightning.checkpoint import load_checkpoint
from rlhf_lightning.diagnose.events import read_scalars
from rlhf_lightning.metrics import pairwise_accuracy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIGS = ROOT / "configs"
#: A generous bound for the six runs: a hung collective must fail the test, not hang the suite.
TIMEOUT_S = 600
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", *QUIET]
#: FSDP2 through ModelParallelStrategy: 2-way data parallel, checkpoints gathered into one file on rank 0.
FSDP2 = ["--trainer.strategy=ModelParallelStrategy", "--trainer.strategy.data_parallel_size=2",
         "--trainer.strategy.tensor_parallel_size=1", "--trainer.strategy.save_distributed_checkpoint=false",
         "--trainer.devices=2", "--trainer.accelerator=cpu", "--model.init_args.shard=true", *QUIET]  # fmt: skip
SFT_ARGS = ["--model.init_args.backbone.n_layer=1", "--model.init_args.backbone.d_model=32",
            "--model.init_args.backbone.n_head=2", "--data.init_args.batch_size=16", "--data.init_args.eval_prompts=8",
            "--model.init_args.eval_sampling.max_new_tokens=8", "--trainer.max_steps=4",
            "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1"]  # fmt: skip
RM_ARGS = ["--data.init_args.batch_size=8", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
           "--trainer.limit_val_batches=1", "--model.init_args.norm_samples=8"]  # fmt: skip
#: Adaptive beta with a short horizon (it moves every iteration), running score statistics, and the early stop on
#: the approximate KL: every state that must agree across ranks is in play.
PPO_ARGS = ["--model.init_args.iterations=2", "--model.init_args.rollout_batch=8", "--model.init_args.minibatch_size=4",
            "--model.init_args.ppo_epochs=2", "--model.init_args.eval.every=2", "--model.init_args.eval.groups=2",
            "--model.init_args.eval.samples_per_prompt=2", "--model.init_args.sampling.max_new_tokens=8",
            "--model.init_args.kl.controller=adaptive", "--model.init_args.kl.target=0.5",
            "--model.init_args.kl.horizon=100", "--model.init_args.rewards.norm=running",
            "--model.init_args.target_approx_kl=1.0", "--data.init_args.eval_prompts=8"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(runs: list[tuple[Path, str, list[str]]]) -> dict[Path, dict[int, dict]]:
    """``rlhf fit -c configs/<phase>.yaml ARGS`` in folder ``cwd`` for each ``(cwd, phase, args)`` in turn, on 2 ranks,
    in one launch (ddp_runner.py); returns each run's probe record per rank, by folder."""
    spec = []
    for cwd, phase, args in runs:
        probe = json.dumps({"class_path": "ddp_probe.DDPProbe", "init_args": {"out": str(cwd / "probe" / phase)}})
        config = str(CONFIGS / f"{phase}.yaml")
        spec.append({"cwd": str(cwd), "args": ["fit", "-c", config, *args, f"--trainer.callbacks+={probe}"]})
    spec_file = runs[0][0] / "runs.json"
    spec_file.write_text(json.dumps(spec))
    paths = [str(ROOT), str(ROOT / "kernels"), str(HERE)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, str(HERE / "ddp_runner.py"), str(spec_file)]
    # Its own session, so that a timeout kills the launched rank too.
    proc = subprocess.Popen(cmd, cwd=runs[0][0], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the distributed runs did not finish in {TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-6000:]
    return {cwd / phase: {r: json.loads((cwd / "probe" / phase / f"rank{r}.json").read_text()) for r in (0, 1)}
            for cwd, phase, _ in runs}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, dict[int, dict]]]:
    """Under DDP: SFT, then the reward model and PPO from its checkpoints, in one folder (the configs' relative
    paths); and the same runs sharded with FSDP2 in a second folder, on the first one's world and checkpoints."""
    root = tmp_path_factory.mktemp("ddp")
    sharded = root / "fsdp2"
    sharded.mkdir()
    world = f"--data.init_args.data_dir={root / 'runs/world'}"
    starts = [f"--model.init_args.{name}_checkpoint={root / 'runs' / phase / 'checkpoints/last.ckpt'}"
              for name, phase in (("sft", "sft"), ("reward", "rm"))]  # fmt: skip
    records = run_distributed([
        (root, "sft", [*DDP, *SFT_ARGS]), (sharded, "sft", [*FSDP2, *SFT_ARGS, world]),
        (root, "rm", [*DDP, *RM_ARGS]), (sharded, "rm", [*FSDP2, *RM_ARGS, world, starts[0]]),
        (root, "ppo", [*DDP, *PPO_ARGS]), (sharded, "ppo", [*FSDP2, *PPO_ARGS, world, *starts]),
    ])  # fmt: skip
    return root, {f"{phase}{suffix}": records[folder / phase] for phase in ("sft", "rm", "ppo")
                  for folder, suffix in ((root, ""), (sharded, "_fsdp2"))}  # fmt: skip


def check_common(root: Path, phase: str, ranks: dict[int, dict], checkpoint: str = "last.ckpt") -> None:
    """Two ranks that trained the same model, with rank 0 alone writing."""
    assert [ranks[r]["rank"] for r in (0, 1)] == [0, 1] and ranks[0]["world_size"] == 2
    assert ranks[0]["digest_end"] != ranks[0]["digest_start"], "no training happened"
    assert ranks[0]["digest_end"] == ranks[1]["digest_end"], "the ranks' models diverged"
    assert checkpoint in ranks[0]["saved"] and ranks[1]["saved"] == []
    assert len(list((root / "runs" / phase).glob("events.out.tfevents.*"))) == 1
    # Logged metrics went through the same reductions on both ranks.
    assert ranks[0]["metrics"] == pytest.approx(ranks[1]["metrics"], nan_ok=True)


def test_sft_under_ddp(runs):
    root, records = runs
    ranks = records["sft"]
    check_common(root, "sft", ranks)
    local = [ranks[r]["val"]["loss_sum"] / ranks[r]["val"]["tokens"] for r in (0, 1)]
    assert local[0] != local[1]  # the ranks validated different shards
    pooled = sum(ranks[r]["val"]["loss_sum"] for r in (0, 1)) / sum(ranks[r]["val"]["tokens"] for r in (0, 1))
    assert ranks[0]["metrics"]["sft/val_loss"] == pytest.approx(pooled, rel=1e-5)


def test_reward_model_under_ddp(runs):
    root, records = runs
    ranks = records["rm"]
    check_common(root, "rm", ranks)
    margins = {i: m for r in (0, 1) for i, m in zip(ranks[r]["val"]["index"], ranks[r]["val"]["margin"], strict=True)}
    assert len(margins) > len(ranks[0]["val"]["index"])  # the ranks held different pairs
    margin = torch.tensor(list(margins.values()))
    assert ranks[0]["metrics"]["rm/accuracy"] == pytest.approx(pairwise_accuracy(margin, torch.zeros_like(margin)))
    assert ranks[0]["metrics"]["rm/margin"] == pytest.approx(float(margin.mean()), rel=1e-5, abs=1e-6)


def test_ppo_under_ddp(runs):
    root, records = runs
    ranks = records["ppo"]
    check_common(root, "ppo", ranks, "best.ckpt")  # RLHFDiagnostics' (ModelCheckpoint saves every 80 steps)
    its = [ranks[r]["iterations"] for r in (0, 1)]
    assert [x["iteration"] for x in its[0]] == [x["iteration"] for x in its[1]] == [0, 1]
    logged = read_scalars(root / "runs/ppo")
    for it, (a, b) in enumerate(zip(*its, strict=True)):
        assert not set(a["prompts"]) & set(b["prompts"])  # each rank its own slice of the prompts
        assert a["beta"] == b["beta"] and a["score_moments"] == b["score_moments"]
        assert a["score_moments"]["count"] == 2 * 8 * (it + 1)  # both ranks' scores in both ranks' statistics
        for tag, key in (("objective/kl", "kl"), ("objective/proxy_reward", "objective/proxy_reward"),
                         ("rollout/length_mean", "rollout/length_mean")):  # fmt: skip
            assert logged[tag][it] == pytest.approx((a["local"][key] + b["local"][key]) / 2, rel=1e-5, abs=1e-6)
    assert its[0][1]["beta"] != its[0][0]["beta"]  # the adaptive controller moved, by the same step everywhere


def check_sharded_matches_ddp(
    root: Path, records: dict, phase: str, checkpoint: str, metric: str, noise: tuple[str, ...] = ()
) -> None:
    """The sharded run's gathered checkpoint is the DDP run's model (up to the order of the gradient reductions),
    an ordinary single file with whole tensors, so the next phases load it unsharded. ``noise``: parameters whose
    gradient is zero up to rounding, which Adam normalises into steps of rounding noise (not compared)."""
    ranks = records[f"{phase}_fsdp2"]
    check_common(root / "fsdp2", phase, ranks, checkpoint)
    assert ranks[0]["metrics"][metric] == pytest.approx(records[phase][0]["metrics"][metric], rel=1e-4)
    ddp, sharded = (load_checkpoint(folder / "runs" / phase / "checkpoints" / checkpoint)["state_dict"]
                    for folder in (root, root / "fsdp2"))  # fmt: skip
    assert ddp.keys() == sharded.keys()
    for key, value in ddp.items():
        assert not isinstance(sharded[key], DTensor)
        if key not in noise:
            torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_sft_sharded_with_fsdp2_matches_ddp(runs):
    root, records = runs
    check_sharded_matches_ddp(root, records, "sft", "last.ckpt", "sft/val_loss")
    # Sampling (validation) works on the sharded model and draws what the DDP model draws.
    assert records["sft_fsdp2"][0]["metrics"]["eval/gold_reward"] == records["sft"][0]["metrics"]["eval/gold_reward"]


def test_reward_model_sharded_with_fsdp2_matches_ddp(runs):
    root, records = runs
    # The trunk's final-norm bias shifts the chosen and the rejected score alike: the pair loss does not see it.
    check_sharded_matches_ddp(root, records, "rm", "last.ckpt", "rm/margin", ("reward_model.backbones.0.ln_f.bias",))


def test_ppo_sharded_with_fsdp2_matches_ddp(runs):
    """Manual optimisation under FSDP2: rollouts of different lengths per rank (generation stops together), the
    minibatch backward passes, and best.ckpt saved by RLHFDiagnostics."""
    root, records = runs
    check_sharded_matches_ddp(root, records, "ppo", "best.ckpt", "kl")
    its = [records[run][0]["iterations"] for run in ("ppo", "ppo_fsdp2")]
    assert [x["beta"] for x in its[0]] == pytest.approx([x["beta"] for x in its[1]], rel=1e-6)
