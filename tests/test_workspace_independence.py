"""The tests do not depend on the workspace: ``make quickstart && make test`` on a fresh clone.

The quickstart (``dvc exp run -S ...``) leaves its overrides in the workspace's params.yaml; the
tests read the committed file instead (``conftest.COMMITTED_PARAMS``), so a checkout whose
params.yaml holds the quickstart's overrides passes the tests that read params.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_dvc_repo

from infinito.config import load_params, write_params
from pipelines.quickstart import QUICKSTART_OVERRIDES

# The test files that read params.yaml (fast ones; the DVC ones build repositories from the same
# committed file through conftest.make_dvc_repo).
PARAMS_READERS = ("tests/test_config.py", "tests/test_flows.py", "tests/test_params_guard.py")


@pytest.mark.slow
def test_tests_pass_in_a_checkout_whose_params_hold_the_quickstart_s_overrides(
    tmp_path: Path, run_cmd: Callable[..., Any]
) -> None:
    extra = ("tests", "docs", "scripts", "README.md", "pyproject.toml", "Makefile", "prefect.yaml")
    repo = make_dvc_repo(tmp_path / "clone", extra=extra)  # the seed params, committed
    write_params(repo / "params.yaml", QUICKSTART_OVERRIDES)  # what make quickstart leaves
    assert load_params(repo / "params.yaml").model.d_model == 64
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            *PARAMS_READERS,
        ],  # fmt: skip
        repo,
        env={"PYTHONPATH": str(repo)},
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
