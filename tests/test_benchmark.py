"""benchmark-inference stage: grid validation, timing summaries, and the keys on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_params

from infinito.benchmark import (
    METRICS,
    RunTimes,
    check_grid,
    main,
    run_benchmark,
    summarise,
)
from infinito.config import BenchmarkConfig, ConfigError, ModelConfig
from infinito.model import Infinito


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
    with pytest.raises(ConfigError, match="config.json not found: .* holds no checkpoint"):
        run_benchmark(GRID, 0, tmp_path, None, device="cpu")


def test_main_rejects_a_grid_that_overflows_the_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    Infinito(ModelConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, block_size=32)).save(ckpt)
    params = tmp_path / "params.yaml"
    write_params(params, {"benchmark.prompt_lengths": [16], "benchmark.new_tokens": 32})
    assert main(["--params", str(params), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "benchmark.new_tokens" in err and "model.block_size=32" in err


# ---------------------------------------------------------------- the stage on a tiny model

TINY = dict(vocab_size=128, d_model=32, n_layer=1, n_head=2, block_size=32, dropout=0.0,
            memory_slots=8, phi_chunk=8)  # fmt: skip
GRID = BenchmarkConfig(
    batch_sizes=(1, 2), prompt_lengths=(4, 8), new_tokens=3, repeats=2, warmup=1, hf_reference=True
)


def documented_keys(cfg: BenchmarkConfig) -> set[str]:
    keys = {"device", "dtype", "threads", "torch_version", "checkpoint_variant", "new_tokens",
            "repeats", "warmup", "peak_memory_mb", "peak_memory_kind"}  # fmt: skip
    for b in cfg.batch_sizes:
        for p in cfg.prompt_lengths:
            grid = f"b{b}_p{p}"
            prefixes = [f"{v}_{c}_{grid}" for v in ("iit", "ablation") for c in ("kv", "nokv")]
            if cfg.hf_reference:
                prefixes.append(f"hf_{grid}")
                keys.add(f"speedup_vs_hf_{grid}")
            keys |= {f"{pre}_{m}" for pre in prefixes for m in METRICS}
            keys |= {f"kv_speedup_iit_{grid}", f"kv_speedup_ablation_{grid}"}
            keys.add(f"iit_over_ablation_{grid}")
    return keys


def _save(path: Path, iit: bool = True) -> None:
    torch.manual_seed(0)
    Infinito(ModelConfig(**{**TINY, "iit": iit})).save(path)


def test_stage_writes_the_documented_keys(tmp_path: Path) -> None:
    _save(tmp_path / "best")
    out = tmp_path / "metrics/benchmark.json"
    returned = run_benchmark(GRID, 0, tmp_path / "best", out, device="cpu")
    written = json.loads(out.read_text())
    assert written == returned
    assert set(written) == documented_keys(GRID)
    assert written["device"] == "cpu" and written["dtype"] == "float32"
    assert written["checkpoint_variant"] == "iit" and written["peak_memory_kind"] == "rss"
    strings = {"device", "dtype", "torch_version", "checkpoint_variant", "peak_memory_kind"}
    for key, value in written.items():
        if key not in strings:  # every measurement is a positive number DVC can diff
            assert isinstance(value, int | float) and value > 0, key
    for key in (k for k in written if k.endswith("_ms")):
        assert written[key] < 60_000, key
    # tokens/s is batch x new tokens over the run time, so it cannot exceed that over TTFT
    assert written["iit_kv_b2_p8_tokens_per_sec"] <= 2 * 3 / (written["iit_kv_b2_p8_ttft_ms"] / 1e3)


def test_ablation_checkpoint_is_compared_with_an_iit_model(tmp_path: Path) -> None:
    _save(tmp_path / "abl", iit=False)
    cfg = BenchmarkConfig(batch_sizes=(1,), prompt_lengths=(4,), new_tokens=2, repeats=1,
                          warmup=0, hf_reference=False)  # fmt: skip
    m = run_benchmark(cfg, 0, tmp_path / "abl", None, device="cpu")
    assert m["checkpoint_variant"] == "ablation"
    assert set(m) == documented_keys(cfg)


def test_cli_quick_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "best")
    params = tmp_path / "params.yaml"
    write_params(params, {"benchmark.hf_reference": False})
    out = tmp_path / "b.json"
    argv = ["--params", str(params), "--model", str(tmp_path / "best"), "--metrics", str(out),
            "--quick"]  # fmt: skip
    assert main(argv) == 0
    assert "iit_kv_b1_p8_tokens_per_sec" in json.loads(out.read_text())
    assert "iit_kv_b1_p8_tokens_per_sec" in capsys.readouterr().out


# ---------------------------------------------------------------- CPU decoding variants


def variant_keys(cfg: BenchmarkConfig) -> set[str]:
    variants = ("fp32", *cfg.quantized_variants)
    keys = {"cpu_ppl_tokens"}
    for p in cfg.prompt_lengths:
        for prefix in [*(f"cpu_{v}" for v in variants), "cpu_hf_fp32"]:
            keys |= {f"{prefix}_b1_p{p}_{m}" for m in METRICS}
        for v in variants:
            keys |= {f"cpu_{v}_speedup_vs_hf_fp32_b1_p{p}", f"cpu_{v}_speedup_vs_fp32_b1_p{p}"}
    for v in variants:
        keys |= {f"cpu_{v}_test_ppl", f"cpu_{v}_weight_mb"}
    keys |= {f"cpu_{v}_test_ppl_rel_change" for v in cfg.quantized_variants}
    return keys


def test_quantized_variants_add_cpu_speed_and_perplexity_keys(
    tmp_path: Path, tokenized_data: Any
) -> None:
    _save(tmp_path / "best")
    data = tokenized_data({"train": 200, "validation": 200, "test": 300}, vocab_size=128)
    cfg = BenchmarkConfig(batch_sizes=(1,), prompt_lengths=(4,), new_tokens=3, repeats=1,
                          warmup=0, hf_reference=False, quantized_variants=("bf16", "int8"),
                          quantized_ppl_tokens=200)  # fmt: skip
    m = run_benchmark(cfg, 0, tmp_path / "best", None, device="cpu", data_dir=data)
    assert set(m) == documented_keys(cfg) | variant_keys(cfg)
    assert m["cpu_ppl_tokens"] == 199  # 200 tokens: 199 next-token targets
    assert m["cpu_fp32_speedup_vs_fp32_b1_p4"] == 1.0
    assert m["cpu_int8_weight_mb"] < m["cpu_fp32_weight_mb"]
    assert m["cpu_bf16_weight_mb"] == pytest.approx(m["cpu_fp32_weight_mb"] / 2, rel=0.01)
    # quantization moves perplexity a little, never to a different model
    for v in ("bf16", "int8"):
        assert 0 < abs(m[f"cpu_{v}_test_ppl_rel_change"]) < 0.05, v
        expected = m[f"cpu_{v}_test_ppl"] / m["cpu_fp32_test_ppl"] - 1
        assert m[f"cpu_{v}_test_ppl_rel_change"] == pytest.approx(expected)


def test_quantized_variants_need_the_tokenized_data(tmp_path: Path) -> None:
    _save(tmp_path / "best")
    cfg = BenchmarkConfig(quantized_variants=("int8",), prompt_lengths=(4,), new_tokens=2)
    with pytest.raises(ConfigError, match="--data data/tokenized"):
        run_benchmark(cfg, 0, tmp_path / "best", None, device="cpu")


def test_unknown_quantized_variant_is_rejected_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="benchmark.quantized_variants.*bf16, int8"):
        BenchmarkConfig(quantized_variants=("fp16",))
