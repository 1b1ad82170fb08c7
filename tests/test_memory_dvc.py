"""``dvc exp run -S model.memory_scope=stream``: the whole pipeline with stream memories, in a
temporary repository on the quickstart's tiny settings (fewer steps)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipelines.quickstart import QUICKSTART_OVERRIDES

pytestmark = pytest.mark.slow

SETTINGS = {**QUICKSTART_OVERRIDES, "train.max_steps": 20, "train.eval_every_steps": 10}


def test_exp_run_with_stream_memories_runs_every_stage(
    dvc_repo: Callable[..., Path], run_cmd: Callable
) -> None:
    repo = dvc_repo(overrides=SETTINGS)
    out = run_cmd(
        ["dvc", "exp", "run", "-n", "stream", "-S", "model.memory_scope=stream"],
        repo,
        env={"OMP_NUM_THREADS": "1"},
        timeout=1200,
    ).stdout
    assert "Ran experiment(s): stream" in out
    for stage in ("download", "tokenize", "train", "evaluate", "generate-samples"):
        assert f"Running stage '{stage}'" in out
    config = json.loads((repo / "models" / "best" / "config.json").read_text())
    assert config["memory_scope"] == "stream"
    meta = json.loads((repo / "data" / "tokenized" / "meta.json").read_text())
    documents = np.load(repo / "data" / "tokenized" / "train.docs.npy")
    assert len(documents) == meta["splits"]["train"]["documents"] > 10  # the builtin topics
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert train["steps"] == 20
    assert 0 < train["iit_memory_accepted_fraction"] <= 1
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    for split in ("validation", "test"):
        assert math.isfinite(ev[f"{split}_ppl"]) and math.isfinite(ev[f"{split}_ppl_no_memory"])
        assert 0 < ev[f"{split}_memory_accepted_fraction"] <= 1
    assert json.loads((repo / "metrics" / "generate.json").read_text())["n_samples"] > 0
    assert (repo / "metrics" / "benchmark.json").is_file()
