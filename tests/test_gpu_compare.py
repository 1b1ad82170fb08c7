"""scripts/gpu_compare.py and scripts/gpu_session.py: the seed comparison's report, budget, resume.

The end-to-end test runs the real train and evaluate stages on a tiny model and synthetic tokens
(CPU, about a minute); ``scripts/gpu_session.py run --tiny`` is the same on WikiText-2's first
lines (docs/speed.md), too slow for the test run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import write_params

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY_RUN = {
    "epochs": 3,
    "batch_size": 4,
    "data.seq_len": 32,
    "model.vocab_size": 64,
    "model.d_model": 32,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.block_size": 32,
    "model.memory_slots": 8,
    "model.phi_chunk": 8,
    "train.warmup_steps": 1,
    "train.device": "cpu",
    "train.compile": False,
    "train.patience": 1,
    "evaluate.batch_size": 4,
}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_compare = _load("gpu_compare")
gpu_session = _load("gpu_session")


def _compare(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_compare.py"), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )


def test_both_arms_through_the_stages(tokenized_data: Callable[..., Path], tmp_path: Path) -> None:
    data = tokenized_data({"train": 4000, "validation": 700, "test": 500})
    params = tmp_path / "params.yaml"
    write_params(params, TINY_RUN)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"dataset": "wikitext-2-v1"}))
    out, png, work = tmp_path / "seed.json", tmp_path / "seed.png", tmp_path / "runs"
    args = ["--params", str(params), "--data", str(data), "--work", str(work), "--out", str(out)]
    args += ["--plot", str(png), "--manifest", str(manifest), "--seeds", "1", "--parallel", "2"]
    args += ["--set", "train.max_steps=40", "evaluate.sliding_stride=16"]
    proc = _compare(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["data_manifest"] == {"dataset": "wikitext-2-v1"}
    assert report["overrides"] == {"train.max_steps": 40, "evaluate.sliding_stride": 16}
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["iit-seed1", "ablation-seed1"]
    train = json.loads((work / "iit-seed1" / "train.json").read_text())
    ev = json.loads((work / "iit-seed1" / "eval.json").read_text())
    iit, ablation = runs["iit-seed1"], runs["ablation-seed1"]
    assert {k: iit[k] for k in train} == train and {k: iit[k] for k in ev} == ev  # same keys
    assert (iit["arm"], iit["seed"], iit["device"]) == ("iit", 1, "cpu")
    assert iit["concurrent_runs"] == ablation["concurrent_runs"] == report["concurrent_runs"] == 2
    assert iit["torch"] and iit["run_wall_sec"] > 0
    for key in ("validation_ppl", "validation_sliding_ppl", "test_ppl", "test_sliding_ppl"):
        assert iit[key] > 1 and ablation[key] > 1
    for key in ("test_bits_per_byte", "test_word_ppl", "test_ppl_no_memory", "best_epoch"):
        assert key in iit and key in ablation
    assert (
        "iit_threshold" in iit and "iit_phi_integration" in iit and "iit_threshold" not in ablation
    )
    assert iit["validation_memory_candidates"] > 0  # the best checkpoint's writes, one pass
    assert 0 <= iit["validation_memory_write_rate"] <= 1
    assert "validation_memory_writes" not in ablation  # no memory
    assert iit["history"][0].keys() == {"epoch", "step", "train_loss", "val_loss", "val_ppl"}
    assert iit["stop_reason"].startswith(("early stopping", "train.max_steps=40", "ran all"))
    assert not (work / "iit-seed1" / "state").exists()  # the resumable state is dropped
    summary = report["summary"]["test_ppl"]
    assert summary["iit_n"] == summary["ablation_n"] == 1 and "welch_t" not in summary
    assert png.stat().st_size > 1000
    # a second call finds both runs done and reuses them
    again = _compare(args)
    assert again.returncode == 0 and "infinito.train" not in again.stderr
    assert json.loads(out.read_text())["runs"] == report["runs"]


def test_budget_skips_runs_that_do_not_fit(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    write_params(params, TINY_RUN)
    args = ["--params", str(params), "--data", str(tmp_path), "--out", str(tmp_path / "o.json")]
    proc = _compare([*args, "--budget-sec", "100", "--run-estimate-sec", "200", "--seeds", "1"])
    assert proc.returncode == 1  # nothing ran
    report = json.loads((tmp_path / "o.json").read_text())
    assert report["runs"] == [] and len(report["skipped"]) == 2
    assert "a run takes about 200 s" in report["skipped"][0]


def test_bad_override_is_named(tmp_path: Path) -> None:
    proc = _compare(["--params", "p", "--data", "d", "--out", "o", "--set", "epochs"])
    assert proc.returncode == 2 and "--set 'epochs' is not KEY=VALUE" in proc.stderr


def _history(losses: list[tuple[float, float]]) -> list[dict[str, Any]]:
    return [{"epoch": e, "val_loss": v} for e, v in losses]


def test_stop_reason_replays_early_stopping() -> None:
    params = {"epochs": 20, "train": {"patience": 2, "min_delta": 0.01}}
    history = _history([(1.0, 5.0), (1.5, 4.0), (2.0, 4.5), (3.0, 4.495), (4.0, 4.6)])
    train = {"early_stopped": 1, "epochs_completed": 4.0, "best_epoch": 1.5, "steps": 8}
    reason = gpu_compare.stop_reason(history, train, params)
    # 1.5 is not an epoch end; epoch 3's drop (0.005) is below min_delta: epoch 2 counts
    assert reason.startswith("early stopping after epoch 4: 2 epoch-end validations")
    assert "below epoch 2's 4.5000 (best epoch 1.5)" in reason
    done = {"early_stopped": 0, "steps": 80}
    assert gpu_compare.stop_reason(history, done, params) == "ran all 20 epochs"
    capped = {"epochs": 20, "train": {"max_steps": 80}}
    assert gpu_compare.stop_reason(history, done, capped).startswith("train.max_steps=80")


def test_summary_welch_test_needs_two_runs_per_arm() -> None:
    runs = [
        {"arm": "iit", "test_ppl": 100.0},
        {"arm": "iit", "test_ppl": 102.0},
        {"arm": "ablation", "test_ppl": 110.0},
        {"arm": "ablation", "test_ppl": 114.0},
    ]
    row = gpu_compare.summarise(runs)["test_ppl"]
    assert row["iit_mean"] == 101.0 and row["ablation_std"] == pytest.approx(2.8284271)
    assert row["welch_t"] < 0 and 0 < row["p_value"] < 1
    assert "welch_t" not in gpu_compare.summarise(runs[:3])["test_ppl"]


def test_session_run_estimate_from_the_speed_check() -> None:
    speed = {
        "steps_per_epoch": 591,
        "validation_pass_sec_iit": 1.5,
        "variants": {"iit-chunked-default": {"step_ms": 10.0, "compile_sec": 30.0}},
    }
    epoch = 591 * 0.010 + 1.5
    expected = 30.0 + gpu_session.EPOCHS_GUESS * epoch + 14 * 1.5 + 20.0
    assert gpu_session.run_estimate(speed) == pytest.approx(expected)
    assert gpu_session.run_estimate({}) == 240.0  # no speed check: a conservative guess


def test_prepare_tiny_runs_the_data_stages_on_real_text(wikitext_2: Path, tmp_path: Path) -> None:
    manifest = gpu_session.prepare(wikitext_2, tmp_path / "tiny", tiny=True)
    assert manifest["dataset"] is None  # a prefix of WikiText-2 is not WikiText-2
    assert manifest["splits"]["train"]["lines"] == gpu_session.TINY_LINES["train.txt"]
    meta = json.loads((tmp_path / "tiny" / "tokenized" / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["splits"]["validation"]["tokens"] > 10_000
    assert sorted(p.name for p in (tmp_path / "tiny" / "raw").iterdir()) == ["manifest.json"]
