"""train and evaluate through `dvc repro` in a temporary repository, on the builtin corpus."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infinito.config import write_params
from infinito.trainlog import read_series

TINY_PIPELINE: dict[str, Any] = {
    "data.source": "builtin",
    "data.seq_len": 32,
    "epochs": 1,
    "batch_size": 8,
    "lr": 3e-3,
    "model.d_model": 32,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.block_size": 32,
    "model.memory_slots": 16,
    "model.phi_chunk": 8,
    "model.threshold_init": 1.0,
    "train.max_steps": 30,
    "train.warmup_steps": 5,
    "train.eval_every_steps": 10,
    "train.device": "cpu",
    "evaluate.batch_size": 8,
    "evaluate.splits": ["test"],
    "evaluate.sliding_stride": 16,
}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 shared cores: tiny models run faster on one


@pytest.mark.slow
def test_dvc_repro_trains_evaluates_and_reruns_only_on_change(
    dvc_repo: Callable[..., Path], run_cmd: Any
) -> None:
    repo = dvc_repo(overrides=TINY_PIPELINE)
    out = run_cmd(["dvc", "repro", "evaluate"], repo, env=ONE_THREAD).stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out

    val = read_series(repo / "dvclive")["val_loss"]  # DVCLive's series, one row per validation
    assert [step for step, _ in val] == [10, 20, 30]
    assert val[-1][1] < val[0][1] - 0.5  # it learns
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert train["steps"] == 30 and train["best_val_loss"] < math.log(50257)
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    assert ev["test_tokens"] > 1000 and math.isfinite(ev["test_sliding_ppl"])
    assert (repo / "models" / "best" / "model.safetensors").is_file()
    assert (repo / "checkpoints" / "state.pt").is_file()

    again = run_cmd(["dvc", "repro", "evaluate"], repo, env=ONE_THREAD).stdout
    assert "Running stage 'train'" not in again and "Running stage 'evaluate'" not in again
    assert "Stage 'train' didn't change, skipping" in again  # init re-ran, its manifest the same

    plots = json.loads(run_cmd(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    assert {"Loss (nats per token)", "dvclive/plots/metrics/phi_mean.tsv"} <= set(plots)
    assert not any(name.endswith(".png") for name in plots)

    # A changed training param: training re-runs from scratch (the persisted state is from
    # other params), evaluation follows, the data stages do not.
    write_params(repo / "params.yaml", {"lr": 1e-3})
    out = run_cmd(["dvc", "repro", "evaluate"], repo, env=ONE_THREAD).stdout
    assert "discarding checkpoints/state.pt" in out and "lr: 0.003 -> 0.001" in out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'tokenize'" not in out and "Running stage 'download'" not in out
    diff = run_cmd(["dvc", "metrics", "diff", "--json"], repo).stdout
    assert "best_val_loss" in diff and "test_ppl" in diff
