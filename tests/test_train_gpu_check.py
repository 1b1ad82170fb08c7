"""scripts/gpu_check.py: its CPU smoke mode runs every measured path; budget; data preparation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1", "HF_HUB_OFFLINE": "1"}


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV, cwd=cwd
    )


def test_smoke_run_measures_each_variant(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "gpu-speed.json"
    variants = [
        "iit-full-default",
        "iit-chunked-default",
        "ablation-chunked-eager",
        "iit-liger-default",
    ]
    args = ["--smoke", "--data", str(tokenized_data()), "--out", str(out), "--steps", "8"]
    args += ["--warmup", "2", "--variants", *variants, "--profile", "iit-chunked-default"]
    proc = _run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["dtype"] == "float32"
    assert list(report["variants"]) == variants
    assert report["validation_pass_sec_iit"] > 0 and report["validation_pass_sec_ablation"] > 0
    runs: dict[str, Any] = report["variants"]
    for name in variants[:3]:
        r = runs[name]
        assert r["steps"] == 8 and len(r["losses"]) == 8
        assert r["tokens_per_sec"] == pytest.approx(4 * 32 / (r["step_ms"] / 1000))
        assert r["mfu"] is None and r["peak_memory_gib"] is None  # CUDA-only numbers
        assert r["projected_20_epochs_training_sec"] == pytest.approx(
            20 * report["steps_per_epoch"] * r["step_ms"] / 1000
        )
    # today's path and the chunked loss: same initialisation, batches and dropout draws
    same = runs["iit-chunked-default"]["loss_vs_baseline"]
    assert same["steps_compared"] == 8 and same["max_abs_diff"] < 1e-4, same
    assert runs["iit-full-default"]["speedup_vs_baseline"] == 1.0
    assert "liger-kernel is not installed" in runs["iit-liger-default"]["skipped"]
    top = runs["iit-chunked-default"]["profile_top_kernels"]
    assert top and all({"name", "calls", "self_ms_per_step", "share"} <= set(k) for k in top)
    assert "profile_top_kernels" not in runs["iit-full-default"]
    assert report["fastest_iit"] in variants and report["fastest_ablation"] in variants
    assert "iit-full-default" in proc.stdout  # the closing table


def test_budget_skips_later_variants(tokenized_data: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "gpu-speed.json"
    args = ["--smoke", "--data", str(tokenized_data()), "--out", str(out), "--steps", "3"]
    args += ["--warmup", "1", "--budget-sec", "0", "--variants", "iit-chunked-eager"]
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert "time budget" in report["variants"]["iit-chunked-eager"]["skipped"]


def test_unknown_variant_is_named(tokenized_data: Callable[..., Path]) -> None:
    proc = _run(["--smoke", "--data", str(tokenized_data()), "--variants", "iit-fused-default"])
    assert proc.returncode == 2
    assert "variant 'iit-fused-default' is not ARM-LOSS-COMPILE" in proc.stderr


def test_make_data_tokenizes_repeated_text(tmp_path: Path) -> None:
    text = tmp_path / "valid.txt"
    text.write_text(" = Heading = \n\nSome English text, twice over.\n\n Another line.\n")
    out = tmp_path / "data"
    proc = _run(["--make-data", str(out), "--text", str(text), "--repeat", "3"])
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    valid = np.fromfile(out / "validation.bin", dtype=np.uint16)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert meta["vocab_size"] == 50257 and len(valid) == meta["splits"]["validation"]["tokens"]
    assert np.array_equal(train[: len(valid)], valid)
    assert meta["splits"]["train"]["words"] == 3 * meta["splits"]["validation"]["words"]
