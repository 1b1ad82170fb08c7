"""Bigger data in bounded memory: tokenization streams, training reads the memmap in windows.

Each measurement runs in a fresh process and reads its own peak resident memory
(``ru_maxrss``); a small and a large input are compared, so the interpreter's and the libraries'
own footprint cancels out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from conftest import command_env, flatten, markov_tokens, write_params

from infinito.data import tokenize as tk

MIB = 1 << 20
WORDS = (  # a WikiText-like vocabulary: common words, numbers, its " @-@ " and punctuation
    "the of and in to was a is for on as with by he at from his that it an were are which this "
    "be or had first one their its after new who they two her she been has also album game "
    "season @-@ , . 1996 Valkyria Chronicles caf\u00e9 don't"
)


def write_corpus(path: Path, chars: int, seed: int = 0) -> None:
    """WikiText-like lines: ' = Heading = ', blank lines, paragraphs starting with a space."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS.split())
    size = 0
    with path.open("w", encoding="utf-8") as f:
        while size < chars:
            if rng.random() < 0.1:
                line = " = " + " ".join(words[rng.integers(0, len(words), 3)]) + " = \n\n"
            else:
                line = " " + " ".join(words[rng.integers(0, len(words), rng.integers(5, 120))])
                line += " \n"
            f.write(line)
            size += len(line)


def peak_of(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints a JSON dict, to which the peak RSS in MiB is
    added."""
    code += (
        "\nimport json, resource"
        "\nout['peak_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
        "\nprint(json.dumps(out))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=command_env({"OMP_NUM_THREADS": "1", "CI": "1"}),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tokenization_streams_a_corpus_many_batches_long_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """512 KiB batches (the stage's are 8 MiB, the same code): 4 MiB of text needs no more memory
    than 1 MiB, and its ids do not depend on where the text is cut into pieces and batches."""
    batch = MIB // 2
    peaks = {}
    for mib in (1, 4):
        src = tmp_path / f"corpus{mib}.txt"
        write_corpus(src, mib * MIB, seed=mib)
        peaks[mib] = peak_of(
            "from pathlib import Path\n"
            "from infinito.data.tokenize import tokenize_file\n"
            f"out = tokenize_file(Path({str(src)!r}), Path({str(src)!r} + '.bin'), "
            f"batch_chars={batch})"
        )
    big = tmp_path / "corpus4.txt"
    assert peaks[4]["bytes"] > 7 * batch and peaks[4]["bytes"] > 50 * tk.PIECE_CHARS
    # A whole-text pass would hold 3 MiB more text and its encodings (~100 bytes a token, over
    # 70 MiB here); streaming stays within allocator noise (measured: 2 to 5 MiB).
    assert peaks[4]["peak_mib"] - peaks[1]["peak_mib"] < 24, peaks

    ids = np.fromfile(str(big) + ".bin", dtype=np.uint16)
    assert len(ids) == peaks[4]["tokens"]
    text = "\n".join(tk.nonempty_lines(big))
    assert peaks[4]["bytes"] == len(text.encode("utf-8"))
    assert peaks[4]["words"] == len(text.split())
    # Other cuts (16x more pieces, other batch ends) give the same ids; that piecewise encoding
    # equals encoding the whole text is shown on real text in test_tokenize.py.
    other = tk.tokenize_file(big, tmp_path / "other.bin", piece_chars=4096, batch_chars=MIB // 3)
    assert other["tokens"] == len(ids)
    assert np.array_equal(np.fromfile(tmp_path / "other.bin", dtype=np.uint16), ids)


def _tokenized(path: Path, train_tokens: int) -> Path:
    """A tokenized directory whose train split is ``train_tokens`` zeros: a sparse file, so
    nothing is written to disk and only pages that are read take memory."""
    path.mkdir()
    with (path / "train.bin").open("wb") as f:
        f.truncate(2 * train_tokens)
    splits = {"train": train_tokens}
    for seed, (name, n) in enumerate((("validation", 600), ("test", 300)), start=1):
        markov_tokens(n, 64, seed).astype(np.uint16).tofile(path / f"{name}.bin")
        splits[name] = n
    meta = {
        "tokenizer": "synthetic",
        "vocab_size": 64,
        "eos_token_id": 63,
        "dtype": "uint16",
        "splits": {k: {"tokens": n, "bytes": 4 * n, "words": n} for k, n in splits.items()},
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_training_reads_a_large_train_split_without_loading_it(tmp_path: Path) -> None:
    """A 200 MB train split costs no more memory than a 2 MB one: windows come from the memmap."""
    params = {
        "epochs": 1,
        "batch_size": 4,
        "data": {"seq_len": 256},
        "model": {"vocab_size": 64, "d_model": 32, "n_layer": 1, "n_head": 2, "block_size": 256},
        "train": {"max_steps": 2, "warmup_steps": 1, "device": "cpu", "compile": False},
    }
    write_params(tmp_path / "params.yaml", flatten(params))
    peaks = {}
    for label, n in (("small", 1_000_000), ("large", 100_000_000)):
        data = _tokenized(tmp_path / label, n)
        root = tmp_path / f"run-{label}"
        peaks[label] = peak_of(
            "from pathlib import Path\n"
            "from infinito.config import load_params\n"
            "from infinito.train import train\n"
            f"params = load_params(Path({str(tmp_path / 'params.yaml')!r}))\n"
            f"root = Path({str(root)!r})\n"
            f"m = train(params, Path({str(data)!r}), root / 'best', root / 'state', "
            "root / 'train.json', root / 'live')\n"
            "out = {'steps': m['steps']}"
        )
        assert peaks[label]["steps"] == 2
    # Loaded whole, the large split alone would take 200 MB (800 MB as int64); what grows with
    # it is the epoch's window order (390k windows, 3 MB per copy).
    assert peaks["large"]["peak_mib"] - peaks["small"]["peak_mib"] < 48, peaks
