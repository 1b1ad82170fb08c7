"""The streamed NLL loop that training's validation and the evaluate stage share.

``score`` runs a model over a split's windows in order, ``batch_size`` windows per forward pass,
and sums the negative log-likelihood of every scored target. Memory: the model runs in eval
mode, its memory is reset first, and after each batch the model writes that batch's candidates,
so later windows read what earlier ones wrote (a write only becomes readable in a later call,
so no window reads its own future). The layout follows the model's memory:

- shared memory (and none): batch k holds windows ``k*batch_size .. (k+1)*batch_size - 1``; they
  read the same memory, so with the memory on, results depend on ``batch_size``;
- stream memories: the windows are cut into ``batch_size`` contiguous streams, as training reads
  the train split, and batch k holds window k of every stream, each reading and writing its own
  memory row; a row's memory is emptied when its stream enters a new document (``documents``,
  the split's document start offsets).

Every scored target is scored exactly once either way. ``preserved_state`` undoes the reset, the
writes and the mode change, so the trainer can validate mid-run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from infinito.data.splits import Window, document_crossed, window_batch
from infinito.iit import WRITE_STATS
from infinito.runtime import autocast

# exp() of a mean loss above this overflows a float; perplexities are capped there.
LOG_PPL_CAP = 700.0


def perplexity(nats: float) -> float:
    """``exp(nats)`` of a mean loss in nats per unit, capped so it stays a finite float."""
    return math.exp(min(nats, LOG_PPL_CAP))


@dataclass
class Score:
    """The result of one pass over a token stream."""

    nll_sum: float
    tokens: int
    stats: dict[str, float] = field(default_factory=dict)  # model stats, window-weighted means
    memory: dict[str, float] = field(default_factory=dict)  # model.memory_stats() at the end
    writes: dict[str, float] = field(default_factory=dict)  # write stats, means over the writes
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive runs of windows with the same shape, at most ``batch_size`` each, in order."""
    batch: list[Window] = []
    for w in windows:
        full = len(batch) == batch_size
        if batch and (full or (w.length, w.scored) != (batch[0].length, batch[0].scored)):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def stream_steps(windows: Sequence[Window], streams: int) -> Iterator[list[tuple[int, Window]]]:
    """The stream layout: ``windows`` cut into ``streams`` contiguous runs (the last ones
    shorter or empty when they do not divide evenly); step k holds (stream, window k of it)
    for every stream that has a window k."""
    per = -(-len(windows) // streams)
    runs = [windows[b * per : (b + 1) * per] for b in range(streams)]
    for k in range(per):
        yield [(b, run[k]) for b, run in enumerate(runs) if k < len(run)]


class _Sums:
    """Device-side sums of a pass (no host read until the end): NLL, window-weighted model
    stats, and write stats averaged over the writes that measured them (NaN skipped)."""

    def __init__(self, device: torch.device) -> None:
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.stats: dict[str, torch.Tensor] = {}
        self.writes: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.tokens = self.windows = 0

    def add(self, out: Any, y: torch.Tensor, w: Window, written: dict[str, torch.Tensor]) -> None:
        logits = out.logits[:, -w.scored :].float()  # (B, scored, V)
        targets = y[:, -w.scored :].reshape(-1)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets, reduction="sum")
        self.nll += nll.double()
        n = len(y)
        self.tokens += w.scored * n
        self.windows += n
        for k, v in out.stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + v.detach().float() * n
        for k in WRITE_STATS:
            if k in written:
                v = written[k].float()
                seen = ~v.isnan()
                self.writes[k] = self.writes.get(k, 0.0) + torch.where(seen, v, 0.0)
                self.counts[k] = self.counts.get(k, 0.0) + seen.float()

    def score(self, model: Any, seconds: float) -> Score:
        writes = {k: float(v / self.counts[k]) for k, v in self.writes.items()}  # NaN: never
        return Score(
            nll_sum=float(self.nll),
            tokens=self.tokens,
            stats={k: float(v) / self.windows for k, v in self.stats.items()},
            memory=dict(model.memory_stats()),
            writes=writes,
            seconds=seconds,
        )


@torch.no_grad()
def score(
    model: Any,
    tokens: np.ndarray,
    windows: Sequence[Window],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    memory_reads: bool = True,
    documents: np.ndarray | None = None,
) -> Score:
    """Sum the NLL of every scored target, streaming the windows in order through ``model``.

    Puts the model in eval mode and resets its memory first; writes each batch's memory
    candidates after the batch. With stream memories (``model.config.stream_memory``), the
    stream layout (module docstring) with ``batch_size`` streams; ``documents`` are the split's
    document start offsets, where a stream's memory is emptied (None: nowhere). Use
    ``preserved_state`` to undo the reset, the writes and the mode afterwards.
    """
    model.eval()
    stream = bool(getattr(model.config, "stream_memory", False))
    model.reset_memory(rows=batch_size)  # one memory per stream (the shared memory stays one)
    reads = contextlib.nullcontext() if memory_reads else model.memory_reads_disabled()
    sums = _Sums(device)
    t0 = time.perf_counter()
    with reads:
        if stream:
            _score_streams(model, tokens, windows, batch_size, device, dtype, documents, sums)
        else:
            for batch in _batches(windows, batch_size):
                w = batch[0]
                xy = window_batch(tokens, [b.start for b in batch], w.length).to(device)
                x, y = xy[:, :-1], xy[:, 1:]
                with autocast(device, dtype):
                    out = model(x, y)
                sums.add(out, y, w, model.write_memory(out.candidates))
    return sums.score(model, time.perf_counter() - t0)


def _score_streams(
    model: Any,
    tokens: np.ndarray,
    windows: Sequence[Window],
    streams: int,
    device: torch.device,
    dtype: torch.dtype,
    documents: np.ndarray | None,
    sums: _Sums,
) -> None:
    """The stream layout's passes: per step, empty the memories of streams that entered a new
    document, then one forward pass per window shape (the streams' rows are distinct, so the
    order of the passes and writes within a step changes nothing)."""
    previous: dict[int, int] = {}
    for step in stream_steps(windows, streams):
        if documents is not None and previous:
            rows = [b for b, _ in step if b in previous]
            crossed = document_crossed(
                documents, [previous[b] for b in rows], [w.start for b, w in step if b in previous]
            )
            clear = torch.zeros(streams, dtype=torch.bool)
            clear[[b for b, c in zip(rows, crossed, strict=True) if c]] = True
            model.clear_memory_rows(clear.to(device))
        shapes: dict[tuple[int, int], list[tuple[int, Window]]] = {}
        for b, w in step:
            shapes.setdefault((w.length, w.scored), []).append((b, w))
            previous[b] = w.start
        for group in shapes.values():
            w = group[0][1]
            xy = window_batch(tokens, [v.start for _, v in group], w.length).to(device)
            x, y = xy[:, :-1], xy[:, 1:]
            rows = torch.tensor([b for b, _ in group], device=device)
            with autocast(device, dtype):
                out = model(x, y, memory_rows=rows)
            sums.add(out, y, w, model.write_memory(out.candidates))


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
        # load_state_dict, not copy_: scoring may have resized stream memories (one per stream)
        model.load_state_dict(saved, strict=False)
        model.train(was_training)
