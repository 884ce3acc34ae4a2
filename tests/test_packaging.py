"""Every package folder is installed: pyproject lists packages explicitly (kernels/ is mapped to rlhf_kernels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    found = set()
    for name, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join((name, *rel.parts)))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_kernels_folder_is_not_importable_as_kernels(monkeypatch):
    import importlib
    import sys

    import rlhf_kernels

    assert Path(rlhf_kernels.__file__).resolve().parent == ROOT / "kernels"
    monkeypatch.syspath_prepend(str(ROOT))  # as when a script runs from the repository root
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    with pytest.raises(ImportError, match="package rlhf_kernels"):
        importlib.import_module("kernels")
