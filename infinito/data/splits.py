"""Readers of the tokenize stage's output: ``meta.json``, the ``{split}.bin`` memmaps, windows.

``data/tokenized`` holds one ``{split}.bin`` of uint16 GPT-2 token ids per split, the token
offsets where its documents start (``{split}.docs.npy``) and a ``meta.json`` manifest
(tokenizer, ``vocab_size``, per-split token, byte, word and document counts).
Training, validation and the evaluate stage read the splits through these functions only, as
read-only memmaps that are never loaded whole.

A ``Window`` is a run of input tokens; its targets are the same run shifted by one, and only
its last ``scored`` targets count. ``nonoverlapping_windows`` and ``sliding_windows`` are the
two protocols the evaluate stage reports (docs/evaluation.md); training and validation use the
non-overlapping one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infinito.config import SPLITS, ConfigError
from infinito.data import documents_file

META_FILE = "meta.json"
SCAN_CHUNK = 1 << 24  # tokens per slice of the id check: 32 MB of uint16 at a time


def read_meta(data_dir: Path) -> dict[str, Any]:
    """Read and check ``data_dir/meta.json`` (the tokenize stage's manifest)."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: {data_dir} is not a tokenized data directory; "
            "run `dvc repro tokenize` (or pass --data pointing at one)"
        )
    try:
        with path.open(encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is damaged (not valid JSON: {e}); {_restore(path)}") from e
    if not isinstance(meta, dict):
        raise ConfigError(f"{path} is damaged (not a JSON object); {_restore(path)}")
    if meta.get("dtype") != "uint16":
        raise ConfigError(f"{path}: dtype {meta.get('dtype')!r} is not supported; expected uint16")
    for key in ("vocab_size", "splits"):
        if key not in meta:
            raise ConfigError(f"{path} has no {key!r}; re-run the tokenize stage")
    vocab, splits = meta["vocab_size"], meta["splits"]
    if not isinstance(vocab, int) or vocab < 1 or not isinstance(splits, dict):
        raise ConfigError(
            f"{path} is damaged (vocab_size {vocab!r}, splits {type(splits).__name__}); "
            f"{_restore(path)}"
        )
    return meta


def _restore(file: Path) -> str:
    """The fix for a damaged file of the tokenize stage's output directory."""
    return (
        f"restore it with `dvc checkout {file.parent}` if DVC tracks it, or re-create it "
        "(`dvc repro -f tokenize`)"
    )


def open_split(data_dir: Path, split: str, meta: dict[str, Any]) -> np.ndarray:
    """The split's token ids as a read-only memmap (never loaded whole)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise ConfigError(f"{path} not found; re-run the tokenize stage")
    n = path.stat().st_size // 2
    expected = meta["splits"].get(split, {}).get("tokens")
    if expected is not None and expected != n:
        raise ConfigError(
            f"{path} holds {n} tokens but meta.json says {expected}; re-run the tokenize stage"
        )
    if n < 2:
        raise ConfigError(f"{path} holds {n} tokens; a split needs at least 2 to score anything")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    check_token_ids(tokens, int(meta["vocab_size"]), path)
    return tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: Path) -> None:
    """Every id in ``tokens`` must be below ``vocab_size`` (meta.json's): one vectorised pass
    over the memmap in slices (WikiText-103's train split takes about a second)."""
    for lo in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.asarray(tokens[lo : lo + SCAN_CHUNK])
        top = int(chunk.max())
        if top >= vocab_size:
            at = lo + int(np.argmax(chunk >= vocab_size))
            raise ConfigError(
                f"{path} is damaged: token {at} has id {int(tokens[at])}, outside the "
                f"vocabulary of {vocab_size} that meta.json gives; {_restore(path)}"
            )


def read_documents(data_dir: Path, split: str, meta: dict[str, Any]) -> np.ndarray:
    """The token offsets where the split's documents start (int64, ascending; the tokenize
    stage's ``{split}.docs.npy``), for the stream memory, which is cleared there."""
    path = Path(data_dir) / documents_file(split)
    if "documents" not in meta["splits"].get(split, {}) or not path.is_file():
        raise ConfigError(
            f"{path} not found: {data_dir} was tokenized without document starts, which "
            "model.memory_scope=stream needs; re-run the download and tokenize stages (dvc "
            "repro tokenize)"
        )
    starts = np.load(path)
    if (
        starts.dtype != np.int64
        or starts.ndim != 1
        or len(starts) != meta["splits"][split]["documents"]
    ):
        raise ConfigError(f"{path} does not match meta.json; re-run the tokenize stage")
    return starts


def document_crossed(
    documents: np.ndarray, previous: Sequence[int] | np.ndarray, starts: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Per stream, whether a document starts in ``(previous, start]``: the stream entered a new
    document since its previous window began at ``previous`` (or this window begins one)."""
    before = np.searchsorted(documents, np.asarray(previous, dtype=np.int64), side="right")
    return np.searchsorted(documents, np.asarray(starts, dtype=np.int64), side="right") > before


def check_vocab(model_vocab: int, vocab_size: int, model: str, source: str) -> None:
    """Every token id ``source`` produces (``vocab_size`` of them) must index the embedding of
    ``model`` (the one the params describe, a checkpoint), which has ``model_vocab`` rows."""
    if model_vocab < vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the vocab_size={vocab_size} of "
            f"{source}, so {model} cannot score every token; train with model.vocab_size >= "
            f"{vocab_size}"
        )


@dataclass(frozen=True)
class Window:
    """Inputs ``tokens[start : start + length]``; targets shifted by one; the last ``scored``
    targets count."""

    start: int
    length: int
    scored: int


def nonoverlapping_windows(n_tokens: int, seq_len: int) -> list[Window]:
    """Consecutive windows of ``seq_len`` inputs (a shorter last one for the tail)."""
    n_targets = n_tokens - 1
    out = []
    for start in range(0, n_targets, seq_len):
        length = min(seq_len, n_targets - start)
        out.append(Window(start, length, length))
    return out


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Windows of ``seq_len`` inputs every ``stride`` tokens; each target is scored once."""
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"evaluate.sliding_stride={stride} must be in [1, seq_len={seq_len}]")
    n_targets = n_tokens - 1
    out = []
    scored_until = 0  # targets 1..scored_until are already scored
    for start in range(0, n_targets, stride):
        end = min(start + seq_len, n_targets)
        out.append(Window(start, end - start, end - scored_until))
        scored_until = end
        if end == n_targets:
            break
    return out


def window_batch(tokens: np.ndarray, starts: Sequence[int], length: int) -> torch.Tensor:
    """Stack ``tokens[s : s + length + 1]`` for each start into an int64 tensor (B, length+1)."""
    rows = np.stack([np.asarray(tokens[s : s + length + 1]) for s in starts])
    return torch.from_numpy(rows.astype(np.int64))
