"""`rlhf frontier` end to end at tiny size, through the CLI."""

from __future__ import annotations

import json
import math

import pytest
from test_pipeline import QUIET, TINY

from rlhf_lightning.cli import main
from rlhf_lightning.frontier import METHODS

RL_TINY = ("--model.init_args.iterations=3 --model.init_args.rollout_batch=8 --model.init_args.minibatch_size=4 "
           "--model.init_args.ppo_epochs=1 --model.init_args.eval.every=1 --model.init_args.sampling.max_new_tokens=8 "
           "--model.init_args.lr=0.03 --model.init_args.kl.coef=0.001 "
           f"--data.init_args.eval_prompts=32 {QUIET}")  # fmt: skip
DPO_TINY = ("--data.init_args.batch_size=8 --trainer.max_steps=6 --trainer.val_check_interval=2 "
            "--trainer.limit_val_batches=1 --data.init_args.eval_prompts=32 --model.init_args.lr=0.03 "
            f"--model.init_args.sampling.max_new_tokens=8 --model.init_args.eval.groups=0 {QUIET}")  # fmt: skip

BON_TINY = "--prompts 8 --max-new-tokens 8"


def test_frontier_end_to_end(tmp_path, capsys):
    out = tmp_path / "frontier"
    main(["--debug", "frontier", "--out", str(out), "--quick", "--sft-args", TINY["sft"], "--rm-args", TINY["rm"],
          "--rl-args", RL_TINY, "--dpo-args", DPO_TINY, "--best-of-n-args", BON_TINY])  # fmt: skip
    for name in ("frontier.json", "frontier.md", "frontier.png", "runs/sft/checkpoints/last.ckpt"):
        assert (out / name).is_file(), name
    record = json.loads((out / "frontier.json").read_text())
    assert list(record["methods"]) == list(METHODS)
    for name, method in record["methods"].items():
        points = [p for run in method["runs"].values() for p in run["points"]]
        # --quick: one run per trained method, an evaluation per iteration or validation; best-of-n: n = 1..16
        assert len(points) == (5 if name == "best_of_n" else 3), name
        assert all(p["d"] == pytest.approx(math.sqrt(max(p["kl"], 0.0))) for p in points), name
        assert method["form"] == ("bon" if name == "best_of_n" else "rl")
        assert isinstance(method["fit_gold"]["r2"], float) and math.isfinite(method["fit_gold"]["r2"]), name
    # best-of-n's KL is the analytic one: 0 at n = 1, log 2 - 1/2 at n = 2
    bon = record["methods"]["best_of_n"]["runs"]["best_of_n"]["points"]
    assert [p["kl"] for p in bon[:2]] == pytest.approx([0.0, math.log(2) - 0.5])
    table = (out / "frontier.md").read_text()
    assert all(f"| {name} |" in table for name in METHODS)
    assert "rlhf frontier" in capsys.readouterr().out


def test_an_unknown_method_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frontier", "--out", str(tmp_path / "f"), "--methods", "ppo,sac"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf: error:") and "--methods ppo,sac" in err and "\n" not in err
    assert not (tmp_path / "f").exists()


def test_a_bad_override_of_the_last_method_fails_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "f"
    with pytest.raises(SystemExit) as exc:
        main(["frontier", "--out", str(out), "--quick", "--methods", "ppo,dpo", "--dpo-args=--model.init_args.beta=x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf: error: dpo beta_0.1:") and "beta" in err and "\n" not in err
    assert not out.exists()
