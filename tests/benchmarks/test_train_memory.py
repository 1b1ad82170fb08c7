"""Peak resident memory of one training step at the seed's dimensions, against Hugging Face.

Batch 16 x 256 tokens, forward + backward + AdamW step (+ the memory write), for INFINITO (IIT
model and ablation) and Hugging Face's ``GPT2LMHeadModel`` of the same dimensions, each in a
process of its own (``train_step_process.py``): the peak is ``getrusage``'s ``ru_maxrss`` of that
process, over two steps, so the optimizer's state is there as in steady training. Target:
INFINITO's peak <= 0.6x Hugging Face's. The gap is the output head: Hugging Face forms the
16 x 256 x 50,257 logits (823 MB in float32), their log-softmax and their gradient; INFINITO's
training loss never forms them (``infinito/losses.py``). Run with ``make bench``; the default
test run skips it. About five minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("train_step_process.py")
TARGET = 0.6


def _peak(model: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), model, "--batch", "16", "--seq", "256", "--steps", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_step_peak_memory_vs_hf_gpt2(benchmark: Any) -> None:
    reports: dict[str, dict[str, Any]] = {}

    def run_all() -> None:
        for model in ("hf_gpt2", "ablation", "iit"):
            reports[model] = _peak(model)

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    hf = reports["hf_gpt2"]["peak_rss_mib"]
    ratios = {f"{m}_over_hf": reports[m]["peak_rss_mib"] / hf for m in ("ablation", "iit")}
    benchmark.extra_info.update(
        {f"{m}_peak_rss_mib": r["peak_rss_mib"] for m, r in reports.items()} | ratios
    )
    print(
        "\npeak RSS of a 16x256 training step (MiB): "
        + ", ".join(f"{m} {r['peak_rss_mib']:.0f}" for m, r in reports.items())
        + f"; {ratios} (target <= {TARGET})"
    )
    assert reports["ablation"]["n_params"] == reports["hf_gpt2"]["n_params"]
    for r in reports.values():  # the same step: loss near ln(50257) = 10.8 at initialisation
        assert all(10.0 < loss < 11.5 for loss in r["losses"]), r
    assert max(ratios.values()) <= TARGET, ratios
