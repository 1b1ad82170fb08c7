"""The install is quiet and the workspace clean: pyproject.toml in the form setuptools wants
(no deprecation warnings on every install), and what the tools write is ignored by git."""

from __future__ import annotations

import subprocess
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = REPO_ROOT / "pyproject.toml"


def test_pyproject_loads_without_setuptools_warnings() -> None:
    """The table form ``license = { text = "MIT" }`` made every install warn (twice) that builds
    break in 2027; the SPDX string is the current form."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), PYPROJECT)
    assert [str(w.message) for w in caught if "license" in str(w.message).lower()] == []
    assert dist.metadata.license_expression == "MIT"


def test_the_build_requires_a_setuptools_that_reads_the_spdx_license() -> None:
    build = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    (setuptools,) = [Requirement(r) for r in build if Requirement(r).name == "setuptools"]
    assert "76.1" not in setuptools.specifier and "77.0" in setuptools.specifier


@pytest.mark.parametrize("path", ["dvc_plots/index.html", "reports/experiments.md"])
def test_tool_outputs_are_ignored_by_git(path: str) -> None:
    """``dvc plots show`` writes dvc_plots/, ``infinito report`` reports/."""
    proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT, check=False)
    assert proc.returncode == 0, f"{path} is not git-ignored"
