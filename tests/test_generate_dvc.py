"""generate-samples and benchmark-inference through ``dvc repro`` on a tiny whole pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from infinito.config import write_params

pytestmark = pytest.mark.slow

TINY = {
    "data.source": "builtin",
    "data.seq_len": 32,
    "epochs": 1,
    "batch_size": 4,
    "model.d_model": 32,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.block_size": 64,
    "model.memory_slots": 8,
    "model.phi_chunk": 8,
    "train.max_steps": 3,
    "train.warmup_steps": 1,
    "train.compile": False,
    "train.device": "cpu",
    "generate.max_new_tokens": 8,
    "benchmark.batch_sizes": [1],
    "benchmark.prompt_lengths": [8],
    "benchmark.new_tokens": 4,
    "benchmark.repeats": 1,
    "benchmark.warmup": 0,
}
STAGES = ["generate-samples", "benchmark-inference"]


def _edit(repo: Path, key: str, value: object) -> None:
    write_params(repo / "params.yaml", {key: value})


def test_dvc_repro_generate_and_benchmark(dvc_repo: Callable[..., Path], run_cmd: Callable) -> None:
    repo = dvc_repo(overrides=TINY)
    out = run_cmd(["dvc", "repro", *STAGES], repo).stdout
    for stage in ("train", *STAGES):
        assert f"Running stage '{stage}'" in out

    gen = json.loads((repo / "metrics/generate.json").read_text())
    assert gen["n_samples"] == 8  # 4 prompts x 2 samples
    assert 0 < gen["mean_length_tokens"] <= 8
    samples = (repo / "samples/samples.md").read_text()
    assert "Artificial intelligence is" in samples and samples.count("## Sample") == 8
    bench = json.loads((repo / "metrics/benchmark.json").read_text())
    assert bench["iit_kv_b1_p8_tokens_per_sec"] > 0 and bench["speedup_vs_hf_b1_p8"] > 0

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    gen_params = lock["generate-samples"]["params"]["params.yaml"]
    assert set(gen_params) == {"seed", "generate", "train.device", "train.precision"}
    bench_params = lock["benchmark-inference"]["params"]["params.yaml"]
    assert set(bench_params) == {"seed", "benchmark", "train.device", "train.precision"}

    # A generation setting re-runs generation only; a benchmark setting, the benchmark only.
    _edit(repo, "generate.temperature", 0.5)
    out = run_cmd(["dvc", "repro", *STAGES], repo).stdout
    assert "Running stage 'generate-samples'" in out
    assert "Running stage 'benchmark-inference'" not in out
    assert "Running stage 'train'" not in out
    _edit(repo, "benchmark.new_tokens", 3)
    out = run_cmd(["dvc", "repro", *STAGES], repo).stdout
    assert "Running stage 'benchmark-inference'" in out
    assert "Running stage 'generate-samples'" not in out
    assert json.loads((repo / "metrics/benchmark.json").read_text())["new_tokens"] == 3
