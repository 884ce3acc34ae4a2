"""The package installed from its wheel, away from the checkout: the wheel holds every config, and `rlhf --help`,
`rlhf configs --out`, a tiny `rlhf pipeline` on the embedded world and one on a folder of real English text with
Unicode (`--data-dir`) run from an empty folder with only the installed copy; the second's tokenizer reads every
text of that folder back exactly, with no unknown token.

Offline: the wheel is built without build isolation (the venv's setuptools, from the dev extra) and installed with
--no-index --no-deps into a fresh virtualenv that sees this venv's dependencies through a .pth file. Anything that
cannot be done here fails the test; nothing is skipped."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from unicode_corpus import write_unicode_data_dir

from rlhf_lightning.cli import SUBCOMMANDS
from rlhf_lightning.data import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "rlhf_lightning" / "configs"
QUIET = "--trainer.enable_progress_bar=false --trainer.enable_model_summary=false"
#: A pipeline of seconds: a one-layer policy, a few steps per phase.
TINY = {
    "sft": "--model.init_args.backbone.n_layer=1 --model.init_args.backbone.d_model=32 "
    "--model.init_args.backbone.n_head=2 --data.init_args.eval_prompts=4 --trainer.max_steps=2 "
    f"--trainer.val_check_interval=2 --trainer.limit_val_batches=1 {QUIET}",
    "rm": "--data.init_args.batch_size=8 --trainer.max_steps=2 --trainer.val_check_interval=2 "
    f"--trainer.limit_val_batches=1 --model.init_args.norm_samples=8 {QUIET}",
    "ppo": "--model.init_args.iterations=1 --model.init_args.rollout_batch=4 --model.init_args.minibatch_size=4 "
    "--model.init_args.ppo_epochs=1 --model.init_args.eval.every=1 --model.init_args.sampling.max_new_tokens=4 "
    f"--data.init_args.eval_prompts=4 --model.init_args.eval.groups=2 {QUIET}",
}


def run(cmd: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    """``cmd``'s output; a failure fails the test with that output."""
    done = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_runs_away_from_the_checkout(tmp_path):
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout (and race other runs).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("rlhf_lightning", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist",
         source], cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("rlhf_lightning-*.whl")
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("rlhf_lightning/configs/")}
    assert in_wheel == {f"rlhf_lightning/{p.relative_to(CONFIGS.parent).as_posix()}" for p in CONFIGS.rglob("*")
                        if p.is_file()}  # fmt: skip

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp_path)
    # The dependencies from this venv, as plain path lines: the .pth files there (the editable install's finder
    # among them) are not executed from a path added this way, so the checkout stays out of sight.
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(run([python, "-c", where], cwd=tmp_path).strip())
    (purelib / "dependencies.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    imported = run([python, "-c", "import rlhf_kernels, rlhf_lightning; print(rlhf_lightning.__file__); "
                    "print(rlhf_kernels.__file__)"], cwd=empty, env=env)  # fmt: skip
    assert all(Path(line).is_relative_to(purelib) for line in imported.split()), imported

    rlhf = venv / "bin" / "rlhf"
    listed = run([rlhf, "--help"], cwd=empty, env=env)
    assert all(f"  {name} " in listed for name in SUBCOMMANDS), listed
    run([rlhf, "configs", "--out", "cfg"], cwd=empty, env=env)
    copied = {p.relative_to(empty / "cfg") for p in (empty / "cfg").rglob("*") if p.is_file()}
    assert copied == {p.relative_to(CONFIGS) for p in CONFIGS.rglob("*") if p.is_file()}
    # A copied config by path, a preset by the README's checkout spelling (no such file here: the packaged one).
    run([rlhf, "pipeline", "--out", "run", "--sft-config", "cfg/sft.yaml", "--preset", "configs/fixes/adaptive_kl.yaml",
         *(arg for phase in TINY for arg in (f"--{phase}-args", TINY[phase]))], cwd=empty, env=env)  # fmt: skip
    assert (empty / "run" / "summary.json").is_file()
    assert (empty / "run" / "diagnose" / "report.md").is_file()

    # A user's own folder of real text, by the done-when's command: the lengths are sized to it, nothing else given.
    data = tmp_path / "data"
    write_unicode_data_dir(data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    run([rlhf, "pipeline", "--out", "own", "--data-dir", data,
         *(arg for phase in TINY for arg in (f"--{phase}-args", TINY[phase]))], cwd=empty, env=env)  # fmt: skip
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # nothing written into the user's folder
    summary = json.loads((empty / "own" / "summary.json").read_text())
    assert summary["gold_reward_ppo"] is None and summary["rm_accuracy"] is not None
    tokenizer = Tokenizer.load(empty / "own" / "runs" / "sft" / "checkpoints")
    assert tokenizer.unk_id is None
    texts = [value for path in data.glob("*.jsonl") for line in path.read_text(encoding="utf-8").splitlines()
             for value in json.loads(line).values()]  # fmt: skip
    assert any(ord(ch) > 0xFFFF for text in texts for ch in text) and any("東" in text for text in texts)
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
