"""Every package folder is installed: pyproject lists packages explicitly (kernels/ is mapped to rlhf_kernels), and
its package data (rlhf_lightning/configs/, data without Python and so no package) is every packaged config."""

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


def test_package_data_holds_every_packaged_config():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = ROOT / config["package-dir"]["rlhf_lightning"]
    shipped = {path for pattern in config["package-data"]["rlhf_lightning"] for path in package.glob(pattern)}
    files = {path for path in (package / "configs").rglob("*") if path.is_file()}
    assert files - shipped == set(), f"not in [tool.setuptools.package-data]: {sorted(map(str, files - shipped))}"


def test_kernels_folder_never_passes_for_the_hugging_face_kernels_package(monkeypatch):
    import importlib.util
    import sys

    import rlhf_kernels

    assert Path(rlhf_kernels.__file__).resolve().parent == ROOT / "kernels" / "rlhf_kernels"
    assert not (ROOT / "kernels" / "__init__.py").exists()
    monkeypatch.syspath_prepend(str(ROOT))  # as when Python runs from the repository root
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is not None:
        pytest.skip(f"a real package called kernels is installed ({spec.origin})")
    # At most a namespace package, which transformers' availability check ignores.
    from transformers.utils import import_utils

    assert import_utils._is_package_available("kernels", return_version=True)[0] is False
