"""benchmark-inference stage: grid validation, timing summaries, and the keys on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infinito.benchmark import (
    METRICS,
    RunTimes,
    check_grid,
    main,
    read_model_config,
    summarise,
)
from infinito.config import BenchmarkConfig, ConfigError


def test_grid_must_fit_block_size_and_error_names_the_keys() -> None:
    check_grid(BenchmarkConfig(prompt_lengths=(16, 128), new_tokens=128), block_size=256)
    with pytest.raises(ConfigError) as err:
        check_grid(BenchmarkConfig(prompt_lengths=(16, 200), new_tokens=64), block_size=256)
    msg = str(err.value)
    assert "benchmark.prompt_lengths" in msg and "benchmark.new_tokens" in msg
    assert "model.block_size=256" in msg and "264" in msg


def test_summarise_from_known_timestamps() -> None:
    # Prefill 100 ms, then 4 steps of 10, 10, 10, 50 ms; two identical runs.
    run = RunTimes(start=0.0, token_ready=[0.1, 0.11, 0.12, 0.13, 0.18])
    s = summarise([run, run], batch=2, new_tokens=5)
    assert set(s) == set(METRICS)
    assert s["ttft_ms"] == pytest.approx(100.0)
    assert s["p50_ms"] == pytest.approx(10.0)
    assert 10.0 < s["p95_ms"] <= 50.0
    assert s["tokens_per_sec"] == pytest.approx(2 * 5 / 0.18)


def test_summarise_uses_median_run() -> None:
    fast = RunTimes(0.0, [0.01, 0.02])
    slow = RunTimes(0.0, [0.01, 1.0])
    s = summarise([fast, fast, slow], batch=1, new_tokens=2)
    assert s["tokens_per_sec"] == pytest.approx(2 / 0.02)


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        read_model_config(tmp_path)


def test_main_rejects_a_grid_that_overflows_the_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps({"vocab_size": 64, "d_model": 32, "n_layer": 1, "n_head": 2, "block_size": 32})
    )
    params = tmp_path / "params.yaml"
    params.write_text("benchmark:\n  prompt_lengths: [16]\n  new_tokens: 32\n")
    assert main(["--params", str(params), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "benchmark.new_tokens" in err and "model.block_size=32" in err
