"""Which training windows each optimizer step, process and micro-batch reads.

The train split (a read-only memmap, never loaded whole) is cut into non-overlapping windows:
window ``i`` is tokens ``[i*seq_len, i*seq_len + seq_len + 1)``. Each epoch visits them in the
order ``epoch_order(seed, epoch, n_windows)``; optimizer step ``s`` of the epoch takes the global
batch ``order[s*batch_size : (s+1)*batch_size]``, whatever the number of processes.

``StepLayout`` splits that global batch: into ``world`` contiguous shards whose sizes differ by
at most one (process ``r`` takes shard ``r``), and each shard into the same number of contiguous
micro-batches of at most ``train.micro_batch_size`` windows. Each micro-batch's loss is scaled by
its share of the global batch (times ``world``, because DistributedDataParallel averages the
processes' gradients), so the accumulated gradient is the gradient of the mean loss over the
whole global batch: the same optimisation at any world size and micro-batch size, up to
floating-point summation order (and the random draws of dropout and noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infinito.config import ConfigError, Params
from infinito.data.splits import (
    Window,
    check_vocab,
    nonoverlapping_windows,
    open_split,
    read_meta,
    window_batch,
)


@dataclass(frozen=True)
class TrainData:
    """The tokenized splits training reads (memmaps) and their windows.

    ``sub``: a train prefix as long as the validation split, for the final train loss measured
    with validation's protocol.
    """

    train: np.ndarray
    val: np.ndarray
    sub: np.ndarray
    n_windows: int
    steps_per_epoch: int
    val_windows: list[Window]
    sub_windows: list[Window]

    @classmethod
    def open(cls, data_dir: Path, params: Params) -> TrainData:
        """Open and check ``data_dir`` for ``params``; a clear ConfigError names what is wrong."""
        meta = read_meta(data_dir)
        check_vocab(
            params.model.vocab_size,
            meta["vocab_size"],
            "the model the params describe",
            f"the tokenizer in {Path(data_dir) / 'meta.json'}",
        )
        seq_len, batch_size = params.data.seq_len, params.batch_size
        train = open_split(data_dir, "train", meta)
        val = open_split(data_dir, "validation", meta)
        n_windows = (len(train) - 1) // seq_len
        steps_per_epoch = n_windows // batch_size
        if steps_per_epoch == 0:
            raise ConfigError(
                f"the train split ({len(train)} tokens) holds {n_windows} windows of "
                f"data.seq_len+1={seq_len + 1} tokens, fewer than batch_size={batch_size}; lower "
                "batch_size or data.seq_len, or use more data"
            )
        sub = train[: min(len(train), len(val))]  # a memmap slice: nothing is read yet
        return cls(
            train,
            val,
            sub,
            n_windows,
            steps_per_epoch,
            nonoverlapping_windows(len(val), seq_len),
            nonoverlapping_windows(len(sub), seq_len),
        )


def epoch_order(seed: int, epoch: int, n_windows: int) -> torch.Tensor:
    """The epoch's window order: a permutation from a generator seeded with (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return torch.from_numpy(rng.permutation(n_windows).astype(np.int64))


def _split(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into ``parts`` contiguous pieces, the first ones one longer if uneven."""
    q, rem = divmod(hi - lo, parts)
    bounds = [lo + i * q + min(i, rem) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass(frozen=True)
class StepLayout:
    """One process's part of every optimizer step (see the module docstring).

    ``parts``: ``[lo, hi)`` ranges of the global batch, one per micro-batch, in order.
    """

    batch_size: int
    world: int
    rank: int
    parts: tuple[tuple[int, int], ...]

    @property
    def shares(self) -> tuple[float, ...]:
        """Each micro-batch's fraction of the global batch (weights for means over the batch)."""
        return tuple((hi - lo) / self.batch_size for lo, hi in self.parts)

    @property
    def loss_scales(self) -> tuple[float, ...]:
        """Factor on each micro-batch's mean loss so that DDP's gradient average is the global
        batch's mean-loss gradient (exactly 1.0 for one process without accumulation)."""
        return tuple(self.world * share for share in self.shares)


def step_layout(batch_size: int, world: int, rank: int, micro_batch_size: int | None) -> StepLayout:
    """Split a global batch of ``batch_size`` windows for process ``rank`` of ``world``.

    ``micro_batch_size`` (None: the largest shard) bounds the windows per forward pass; every
    process runs the same number of micro-batches, as DDP needs the same number of backward
    passes everywhere.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    if batch_size < world:
        raise ConfigError(
            f"batch_size={batch_size} is smaller than the {world} training processes; each "
            "process needs at least one window per step: raise batch_size or use fewer processes"
        )
    largest = -(-batch_size // world)
    micro = micro_batch_size or largest
    steps = -(-largest // micro)
    if batch_size // world < steps:
        raise ConfigError(
            f"batch_size={batch_size} over {world} processes with train.micro_batch_size="
            f"{micro_batch_size} needs {steps} micro-batches per process, more than the "
            f"{batch_size // world} windows some processes get; raise train.micro_batch_size "
            "or make batch_size a multiple of the number of processes"
        )
    lo, hi = _split(0, batch_size, world)[rank]
    return StepLayout(batch_size, world, rank, tuple(_split(lo, hi, steps)))


def load_windows(
    tokens: np.ndarray, idx: torch.Tensor, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, seq_len) of the windows ``idx``, read from the memmap."""
    xy = window_batch(tokens, (idx * seq_len).tolist(), seq_len)  # (B, seq_len + 1)
    if device.type == "cuda":
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]
