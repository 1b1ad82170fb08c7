"""evaluate stage: perplexity, bits per byte, word-level perplexity and IIT statistics.

``python -m infinito.evaluate --model models/best --data data/tokenized
--metrics metrics/eval.json`` loads the best checkpoint and scores every split in
``evaluate.splits`` under two protocols:

* **non-overlapping** (the seed's): the split is cut into consecutive windows of ``seq_len``
  inputs; window ``i`` reads tokens ``[i*seq_len, (i+1)*seq_len)`` and predicts the next token at
  each position. A shorter last window covers the tail, so every token but the first is scored
  exactly once; early positions in each window see little context.
* **sliding**: windows of ``seq_len`` inputs advance by ``stride`` (``evaluate.sliding_stride``,
  default ``seq_len // 2``). The first window scores all its targets, each later one only the
  targets not yet scored (its last ``stride``), so every token is again scored exactly once, now
  with at least ``seq_len - stride`` tokens of context.

Perplexity is ``exp(sum NLL / tokens scored)`` over the whole split (token-weighted, never a mean
of batch means); bits per byte divides the same NLL sum by ``ln 2`` and the split's UTF-8 byte
count, word-level perplexity by its whitespace word count (both from ``meta.json``).

Memory: the model runs in eval mode, its memory is reset at the start of each pass and the
windows stream in order; after each batch the model writes that batch's candidates, so later
windows read what earlier ones wrote (the model's normal operation; a write only becomes
readable in a later call, so no window reads its own future). Windows in one batch read the same
memory, so with the memory on, results depend on ``evaluate.batch_size``. Each pass is repeated
with memory reads disabled: the difference is the memory's contribution. For a model without
memory (the ablation) reads are already off and the ``*_no_memory`` keys repeat the main numbers.

This module also owns the evaluation loop the trainer uses for validation (``score``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from infinito.atomic import write_json
from infinito.config import SPLITS, ConfigError, Params, load_params
from infinito.runtime import autocast, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- tokenized data


def read_meta(data_dir: Path) -> dict[str, Any]:
    """Read and check ``data_dir/meta.json`` (the tokenize stage's manifest)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: {data_dir} is not a tokenized data directory; "
            "run `dvc repro tokenize` (or pass --data pointing at one)"
        )
    with path.open() as f:
        meta = json.load(f)
    if meta.get("dtype") != "uint16":
        raise ConfigError(f"{path}: dtype {meta.get('dtype')!r} is not supported; expected uint16")
    for key in ("vocab_size", "splits"):
        if key not in meta:
            raise ConfigError(f"{path} has no {key!r}; re-run the tokenize stage")
    return meta


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
    return np.memmap(path, dtype=np.uint16, mode="r")


def check_vocab(model_vocab: int, meta: dict[str, Any], data_dir: Path) -> None:
    """Every id in the data must index the model's embedding."""
    if model_vocab < meta["vocab_size"]:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocab_size="
            f"{meta['vocab_size']} in {Path(data_dir) / 'meta.json'}; set model.vocab_size >= "
            f"{meta['vocab_size']}"
        )


# ----------------------------------------------------------------------------- windows


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


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive runs of windows with the same shape, at most ``batch_size`` each, in order."""
    batch: list[Window] = []
    for w in windows:
        if batch and (
            len(batch) == batch_size
            or (w.length, w.scored)
            != (
                batch[0].length,
                batch[0].scored,
            )
        ):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def window_batch(tokens: np.ndarray, starts: Sequence[int], length: int) -> torch.Tensor:
    """Stack ``tokens[s : s + length + 1]`` for each start into an int64 tensor (B, length+1)."""
    rows = np.stack([np.asarray(tokens[s : s + length + 1]) for s in starts])
    return torch.from_numpy(rows.astype(np.int64))


# ----------------------------------------------------------------------------- scoring


@dataclass
class Score:
    """The result of one pass over a token stream."""

    nll_sum: float
    tokens: int
    stats: dict[str, float] = field(default_factory=dict)  # model stats, window-weighted means
    memory: dict[str, float] = field(default_factory=dict)  # model.memory_stats() at the end
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))


@torch.no_grad()
def score(
    model: Any,
    tokens: np.ndarray,
    windows: Sequence[Window],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    memory_reads: bool = True,
) -> Score:
    """Sum the NLL of every scored target, streaming the windows in order through ``model``.

    Puts the model in eval mode and resets its memory first; writes each batch's memory
    candidates after the batch. Use ``preserved_state`` to undo both afterwards.
    """
    model.eval()
    model.reset_memory()
    reads = contextlib.nullcontext() if memory_reads else model.memory_reads_disabled()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    stat_sums: dict[str, torch.Tensor] = {}
    n_tokens = 0
    n_windows = 0
    t0 = time.perf_counter()
    with reads:
        for batch in _batches(windows, batch_size):
            w = batch[0]
            xy = window_batch(tokens, [b.start for b in batch], w.length).to(device)
            x, y = xy[:, :-1], xy[:, 1:]
            with autocast(device, dtype):
                out = model(x, y)
            logits = out.logits[:, -w.scored :].float()  # (B, scored, V)
            nll += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y[:, -w.scored :].reshape(-1), reduction="sum"
            ).double()
            n_tokens += w.scored * len(batch)
            n_windows += len(batch)
            for k, v in out.stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v.detach().float() * len(batch)
            model.write_memory(out.candidates)
    total = float(nll)
    return Score(
        nll_sum=total,
        tokens=n_tokens,
        stats={k: float(v) / n_windows for k, v in stat_sums.items()},
        memory=dict(model.memory_stats()),
        seconds=time.perf_counter() - t0,
    )


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[None]:
    """Restore the model's buffers (its memory) and train/eval mode after the block.

    The trainer validates mid-run: evaluation resets and rewrites the memory, which must not
    leak into training.
    """
    was_training = model.training
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
        model.train(was_training)


# ----------------------------------------------------------------------------- the stage


def _split_metrics(
    prefix: str, main: Score, no_memory: Score, split_meta: dict[str, Any]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for suffix, s in (("", main), ("_no_memory", no_memory)):
        out[f"{prefix}loss{suffix}"] = s.loss
        out[f"{prefix}ppl{suffix}"] = s.ppl
        if split_meta.get("bytes"):
            out[f"{prefix}bits_per_byte{suffix}"] = s.nll_sum / LN2 / split_meta["bytes"]
        if split_meta.get("words"):
            out[f"{prefix}word_ppl{suffix}"] = math.exp(min(s.nll_sum / split_meta["words"], 700))
    # Positive: the memory lowers the loss.
    out[f"{prefix}memory_contribution_loss"] = no_memory.loss - main.loss
    out[f"{prefix}memory_contribution_ppl"] = no_memory.ppl - main.ppl
    return out


def evaluate(params: Params, model_dir: Path, data_dir: Path, metrics_path: Path) -> dict[str, Any]:
    """Score ``evaluate.splits`` under both protocols and write flat metrics to ``metrics_path``."""
    from infinito.model import Infinito

    cfg = params.evaluate
    seq_len = params.data.seq_len
    stride = cfg.sliding_stride or max(1, seq_len // 2)
    meta = read_meta(data_dir)
    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(
            f"{model_dir} holds no checkpoint (config.json missing); run the train stage first"
        )
    device = resolve_device(params.train.device)
    dtype = resolve_dtype(params.train.precision, device)
    model = Infinito.from_checkpoint(model_dir, map_location="cpu").to(device)
    mcfg = model.config
    if seq_len > mcfg.block_size:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds the checkpoint's model.block_size={mcfg.block_size}"
        )
    check_vocab(mcfg.vocab_size, meta, data_dir)
    splits = {s: open_split(data_dir, s, meta) for s in cfg.splits}

    metrics: dict[str, Any] = {"seq_len": seq_len, "sliding_stride": stride}
    seconds = 0.0
    scored = 0
    for split, tokens in splits.items():
        split_meta = meta["splits"].get(split, {})
        protocols = {
            "": nonoverlapping_windows(len(tokens), seq_len),
            "sliding_": sliding_windows(len(tokens), seq_len, stride),
        }
        metrics[f"{split}_tokens"] = len(tokens) - 1
        for infix, windows in protocols.items():
            main = score(model, tokens, windows, cfg.batch_size, device, dtype)
            if mcfg.use_memory:
                no_mem = score(model, tokens, windows, cfg.batch_size, device, dtype, False)
            else:
                no_mem = main  # reads are already off: the same computation
            seconds += main.seconds + (no_mem.seconds if no_mem is not main else 0.0)
            scored += main.tokens * (2 if no_mem is not main else 1)
            metrics.update(_split_metrics(f"{split}_{infix}", main, no_mem, split_meta))
            if infix == "":
                metrics.update(
                    {
                        f"{split}_{k}": v
                        for k, v in main.stats.items()
                        if k not in ("threshold", "aux_loss") and not k.startswith("phi_weight_")
                    }
                )
                if main.memory:  # the memory at the end of the pass
                    metrics[f"{split}_memory_utilisation"] = main.memory["utilisation"]
                    metrics[f"{split}_stored_phi_mean"] = main.memory["stored_phi_mean"]
            log.info(
                "%s %s: loss %.4f  ppl %.2f  (no memory: ppl %.2f)",
                split,
                infix.rstrip("_") or "non-overlapping",
                main.loss,
                main.ppl,
                no_mem.ppl,
            )
    metrics.update({f"iit_{k}": v for k, v in model.iit_stats().items()})
    metrics["n_params"] = model.num_params()
    metrics["eval_tokens_per_sec"] = scored / seconds if seconds > 0 else 0.0
    write_json(metrics_path, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infinito evaluate",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--model",
        type=Path,
        default=Path("models/best"),
        help="checkpoint directory (model.safetensors + config.json)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/tokenized"),
        help="tokenized data directory ({split}.bin + meta.json)",
    )
    parser.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        params = load_params(args.params)
        metrics = evaluate(params, args.model, args.data, args.metrics)
    except ConfigError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in metrics if k.endswith("_ppl") and "memory" not in k]
    print("  ".join(f"{k}={metrics[k]:.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
