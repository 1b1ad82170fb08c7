"""Tokenize stage throughput against the tokenizer's own batch encode on the same text.

The stage (read the split, pieces, parallel batch encode, uint16 ``.bin``, byte and word
counts) should reach at least 0.9x the throughput of ``Tokenizer.encode_batch`` over the same
non-empty lines already in memory. Text: WikiText-2's validation split from ../shared, four
times over (about 4.5 MB), in a temporary directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from infinito.data import tokenize as tk

REPEATS = 4
ROUNDS = 5
TARGET = 0.9


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, wikitext_valid: Path) -> Path:
    text = wikitext_valid.read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("bench") / "train.txt"
    path.write_text(text * REPEATS, encoding="utf-8")
    return path


def test_tokenize_stage_vs_raw_encode_batch(benchmark: Any, corpus: Path, tmp_path: Path) -> None:
    backend = tk.load_tokenizer().backend_tokenizer
    lines = list(tk.nonempty_lines(corpus))
    nbytes = len("\n".join(lines).encode("utf-8"))

    backend.encode_batch(lines[:1000], add_special_tokens=False)  # warm the thread pool
    raw: list[float] = []

    def time_raw_then_stage() -> tuple[tuple[Path, Path], dict[str, Any]]:
        """Before each timed stage round, time one raw round: the two alternate under any load."""
        start = time.perf_counter()
        backend.encode_batch(lines, add_special_tokens=False)
        raw.append(time.perf_counter() - start)
        return (corpus, tmp_path / "train.bin"), {}

    stats = benchmark.pedantic(
        tk.tokenize_file, setup=time_raw_then_stage, rounds=ROUNDS, warmup_rounds=1
    )
    stage_s = benchmark.stats.stats.min
    ratio = min(raw) / stage_s
    benchmark.extra_info.update(
        {
            "mb": round(nbytes / 1e6, 2),
            "tokens": stats["tokens"],
            "stage_mb_per_s": round(nbytes / 1e6 / stage_s, 2),
            "encode_batch_mb_per_s": round(nbytes / 1e6 / min(raw), 2),
            "throughput_ratio": round(ratio, 3),
        }
    )
    print(f"\ntokenize: {benchmark.extra_info}")
    assert ratio >= TARGET, f"stage throughput {ratio:.2f}x of raw encode_batch (target {TARGET}x)"
