"""scripts/gpu_check.py: its CPU smoke mode runs the whole measurement path; data preparation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}


def test_smoke_run_writes_the_report(tokenized_data: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    args = [
        "--smoke",
        "--data",
        str(tokenized_data()),
        "--out",
        str(out),
        "--steps",
        "8",
        "--ablation-steps",
        "6",
        "--eager-steps",
        "4",
    ]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["dtype"] == "float32"
    for phase, steps in (("iit", 8), ("ablation", 6), ("iit_eager", 4)):
        r = report[phase]
        assert r["steps"] == steps and r["compiled"] == 0  # no compilation on CPU
        assert r["tokens_per_sec_steady"] > 0
        assert r["sec_per_step"] == 4 * 32 / r["tokens_per_sec_steady"]
        assert r["mfu"] is None and r["peak_memory_gib"] is None  # CUDA-only numbers
        proj = r["projection_20_epochs"]
        assert proj["steps"] == 20 * ((2_390_000 - 1) // 32 // 4)
        assert proj["training_sec"] == proj["steps"] * r["sec_per_step"]
    assert report["ablation"]["n_params"] < report["iit"]["n_params"]
    assert report["ablation_speedup"] > 0


def test_budget_skips_later_phases(tokenized_data: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    args = [
        "--smoke",
        "--data",
        str(tokenized_data()),
        "--out",
        str(out),
        "--steps",
        "4",
        "--budget-sec",
        "0",
    ]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["iit"]["steps"] == 4
    assert "time budget" in report["ablation"]["skipped"]


def test_make_data_tokenizes_repeated_text(tmp_path: Path) -> None:
    text = tmp_path / "valid.txt"
    text.write_text(" = Heading = \n\nSome English text, twice over.\n\n Another line.\n")
    out = tmp_path / "data"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--make-data",
            str(out),
            "--text",
            str(text),
            "--repeat",
            "3",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    valid = np.fromfile(out / "validation.bin", dtype=np.uint16)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert meta["vocab_size"] == 50257 and len(valid) == meta["splits"]["validation"]["tokens"]
    assert np.array_equal(train[: len(valid)], valid)
    assert meta["splits"]["train"]["words"] == 3 * meta["splits"]["validation"]["words"]
