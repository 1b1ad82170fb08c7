"""Shared artifacts: `dvc push` to a remote, `dvc pull` in a second clone, which is up to date.

The remote is a local directory; S3, GCS and the others take the same commands with their URLs
(docs/scaling.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import ALWAYS_CHANGED, UP_TO_DATE_STATUS

# What the pipeline's cached outputs hold: each must come back byte for byte.
PULLED = (
    "data/raw/train.txt",
    "data/tokenized/train.bin",
    "data/tokenized/meta.json",
    "models/best/model.safetensors",
    "models/best/config.json",
    "samples/samples.md",
    "dvclive/params.yaml",
)


@pytest.mark.slow
def test_a_second_clone_pulls_the_results_and_is_up_to_date(
    pipeline_repo: Path, tmp_path: Path, run_cmd: Any
) -> None:
    remote = tmp_path / "storage"
    run_cmd(["dvc", "remote", "add", "-d", "storage", remote], pipeline_repo)
    run_cmd(["git", "commit", "-q", "-m", "DVC remote", ".dvc/config"], pipeline_repo)
    pushed = run_cmd(["dvc", "push"], pipeline_repo).stdout
    assert "pushed" in pushed
    assert any(p.is_file() for p in remote.rglob("*"))
    synced = run_cmd(["dvc", "status", "--cloud"], pipeline_repo).stdout
    assert "in sync" in synced

    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", pipeline_repo, clone], tmp_path)
    assert not (clone / "models" / "best").exists()  # git holds the pipeline, not the results
    before = run_cmd(["dvc", "status"], clone).stdout
    assert "deleted" in before and "up to date" not in before

    run_cmd(["dvc", "pull"], clone)
    for rel in PULLED:
        assert (clone / rel).read_bytes() == (pipeline_repo / rel).read_bytes(), rel
    for rel in ("metrics/train.json", "metrics/eval.json", "dvclive/plots/metrics/val_loss.tsv"):
        # in git, unchanged
        assert (clone / rel).read_text() == (pipeline_repo / rel).read_text(), rel
    status = json.loads(run_cmd(["dvc", "status", "--json"], clone).stdout)
    assert status == UP_TO_DATE_STATUS  # only the init stage, which DVC always re-checks
    repro = run_cmd(["dvc", "repro"], clone).stdout
    ran = re.findall(r"Running stage '([^']+)'", repro)
    assert ran == list(ALWAYS_CHANGED) and "Stage 'train' didn't change, skipping" in repro
