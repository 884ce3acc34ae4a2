"""The configs and presets shipped inside the package (``rlhf_lightning/configs/``), and ``rlhf configs``.

A config argument (``rlhf fit -c``, ``rlhf pipeline --preset`` / ``--sft-config`` ...) is a file when that file
exists, else the name of a packaged one: ``sft``, ``sft.yaml``, ``hf/sft``, ``failures/no_kl`` or the checkout's
spelling ``configs/failures/no_kl.yaml``, so the README's commands work from any folder after a ``pip install``.

    rlhf configs            # the packaged names, each with its first comment line (a preset: its description)
    rlhf configs --out cfg  # copy them all into cfg/ for editing (--force to overwrite)
"""

from __future__ import annotations

import argparse
import shutil
from importlib.resources import files
from pathlib import Path

import yaml


def packaged_dir() -> Path:
    """The folder of the packaged configs."""
    # A wheel installs the package as plain files (setuptools never zips it), so the resource is a real folder that
    # LightningCLI and the pipeline can open by path.
    return Path(str(files("rlhf_lightning") / "configs"))


def packaged_names() -> list[str]:
    """Every packaged config's name: its path under the configs folder, without ``.yaml`` (``failures/no_kl``)."""
    root = packaged_dir()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def resolve_config(value: str | Path, setting: str) -> Path:
    """The file ``value`` names: itself when it exists, else the packaged config of that name. ``setting`` (e.g.
    ``--preset``) names the argument in the error."""
    path = Path(value)
    if path.is_file():
        return path
    return packaged_config(path.as_posix().removeprefix("configs/").removesuffix(".yaml"), f"{setting} {value}")


def packaged_config(name: str, what: str | None = None) -> Path:
    """The packaged config called ``name`` (``sft``, ``failures/no_kl``); ``what`` (default the name) leads the error
    message."""
    names = packaged_names()
    if name not in names:
        raise ValueError(f"{what or name}: no such file, nor a packaged config (packaged: {', '.join(names)})")
    return packaged_dir() / f"{name}.yaml"


def summary_line(path: Path) -> str:
    """What a config is, in one line: its first comment line, or for a preset (which has none) its description."""
    text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    loaded = yaml.safe_load(text)
    return str(loaded.get("description", "")).strip() if isinstance(loaded, dict) else ""


def copy_configs(out: Path, force: bool = False) -> list[Path]:
    """Copies every packaged config into ``out`` (subfolders kept) and returns the files written; refuses, writing
    nothing, when one exists already and ``force`` is off."""
    root = packaged_dir()
    targets = {out / f"{name}.yaml": root / f"{name}.yaml" for name in packaged_names()}
    existing = [str(target) for target in targets if target.exists()]
    if existing and not force:
        raise ValueError(f"configs --out {out}: would overwrite {', '.join(existing)}; pass --force to overwrite")
    for target, source in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return list(targets)


def configs_main(argv: list[str]) -> None:
    """``rlhf configs``: lists the packaged configs, or copies them into ``--out`` for editing."""
    parser = argparse.ArgumentParser(prog="rlhf configs", description="List the packaged configs and presets, or "
                                     "copy them into a folder for editing.")  # fmt: skip
    parser.add_argument("--out", type=Path, help="copy every packaged config into this folder (subfolders kept)")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist in --out")
    args = parser.parse_args(argv)
    if args.out is None:
        names = packaged_names()
        width = max(map(len, names))
        for name in names:
            print(f"{name:<{width}}  {summary_line(packaged_dir() / f'{name}.yaml')}")
        return
    for path in copy_configs(args.out, args.force):
        print(f"wrote {path}")
