"""The streamed NLL loop that training's validation and the evaluate stage share.

``score`` runs a model over a split's windows in order, ``batch_size`` windows per forward pass,
and sums the negative log-likelihood of every scored target. Memory: the model runs in eval
mode, its memory is reset first, and after each batch the model writes that batch's candidates,
so later windows read what earlier ones wrote (a write only becomes readable in a later call,
so no window reads its own future). Windows in one batch read the same memory, so with the
memory on, results depend on ``batch_size``. ``preserved_state`` undoes the reset, the writes
and the mode change, so the trainer can validate mid-run.
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

from infinito.data.splits import Window, window_batch
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
