"""The committed baseline: the quickstart's metrics and DVCLive series, in git, with no dvc.lock.

docs/experiments.md explains the design: a fresh clone runs the quickstart, so the quickstart's
own numbers are what `dvc metrics diff`, `dvc plots diff` and the Prefect diff artifacts compare
a new run with. A committed dvc.lock would have to describe the committed params.yaml (the seed
configuration, which nobody has run yet) or every clone would report stale stages, so none is
committed. tests/test_quickstart.py runs the quickstart in a fresh clone and checks that
`dvc metrics diff` then has numbers on both sides.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from infinito.config import load_params
from infinito.model import Infinito
from infinito.trainlog import read_series
from pipelines.quickstart import QUICKSTART_OVERRIDES

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def committed(path: str) -> str:
    """The file as committed at HEAD (not the workspace's copy)."""
    return subprocess.run(
        ["git", "show", f"HEAD:{path}"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout


def declared(kind: str) -> list[str]:
    return [
        p
        for stage in SPEC["stages"].values()
        for entry in stage.get(kind, [])
        for p in ([entry] if isinstance(entry, str) else entry)
    ]


def test_every_metrics_file_and_the_series_are_committed_and_no_lock() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "dvc.lock" not in tracked  # it would contradict the committed seed params.yaml
    for path in declared("metrics"):
        assert path in tracked, path
        data = json.loads(committed(path))
        assert any(isinstance(v, int | float) for v in data.values()), path
    (plots,) = declared("plots")
    series = [p for p in tracked if p.startswith(f"{plots}/")]
    assert f"{plots}/val_ppl.tsv" in series and f"{plots}/phi_mean.tsv" in series


def test_the_baseline_is_the_quickstart_s_run() -> None:
    params = load_params(REPO_ROOT / "params.yaml", QUICKSTART_OVERRIDES)
    train = json.loads(committed("metrics/train.json"))
    assert train["steps"] == params.train.max_steps
    assert train["n_params"] == Infinito(params.model).num_params()
    assert json.loads(committed("metrics/eval.json"))["seq_len"] == params.data.seq_len
    live = json.loads(committed("dvclive/metrics.json"))
    assert live["step"] == params.train.max_steps
    val = read_series(REPO_ROOT / "dvclive")["val_loss"]
    steps = range(params.train.eval_every_steps, params.train.max_steps + 1, 30)
    assert [s for s, _ in val] == list(steps)
    assert live["val_ppl"] == train["final_val_ppl"]
