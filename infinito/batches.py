"""Which training windows each optimizer step, process and micro-batch reads.

The train split (a read-only memmap, never loaded whole) is cut into windows of ``seq_len``
inputs and their ``seq_len`` next-token targets. An epoch is a tensor of window start offsets
(tokens), ``batch_size`` per step; optimizer step ``s`` of the epoch takes the global batch
``starts[s*batch_size : (s+1)*batch_size]``, whatever the number of processes:

- shared memory and the ablation: the non-overlapping windows ``[i*seq_len, i*seq_len +
  seq_len + 1)`` in the order ``epoch_order(seed, epoch, n_windows)``, a seeded permutation;
- stream memories (``model.memory_scope: stream``): ``stream_order``, Transformer-XL's layout.
  The split is cut into ``batch_size`` contiguous stretches and row b of step s reads window s
  of stretch b, so every row continues its own text; each epoch shifts the stretches by a
  seeded offset below ``seq_len``. ``TrainData.resets`` says which rows' memories to empty
  before a step: all at an epoch's start, else those whose stream entered a new document.

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
    document_crossed,
    nonoverlapping_windows,
    open_split,
    read_documents,
    read_meta,
    window_batch,
)


@dataclass(frozen=True)
class TrainData:
    """The tokenized splits training reads (memmaps) and their windows.

    ``sub``: a train prefix as long as the validation split, for the final train loss measured
    with validation's protocol. ``train_documents``, ``val_documents``: the splits' document
    start offsets, for stream memories (None otherwise).
    """

    train: np.ndarray
    val: np.ndarray
    sub: np.ndarray
    n_windows: int
    steps_per_epoch: int
    val_windows: list[Window]
    sub_windows: list[Window]
    seq_len: int
    batch_size: int
    train_documents: np.ndarray | None = None
    val_documents: np.ndarray | None = None

    @property
    def stream(self) -> bool:
        return self.train_documents is not None

    def epoch_starts(self, seed: int, epoch: int) -> torch.Tensor:
        """Every window start of the epoch (tokens), ``batch_size`` per step, in step order."""
        if self.stream:
            return stream_order(seed, epoch, len(self.train), self.batch_size, self.seq_len)
        return epoch_order(seed, epoch, self.n_windows) * self.seq_len

    def resets(self, starts: torch.Tensor, first: bool) -> torch.Tensor | None:
        """Stream memories: which rows (bool, (batch_size,)) to empty before the step reading
        ``starts``, the first of its epoch or not; None without stream memories."""
        if self.train_documents is None:
            return None
        if first:
            return torch.ones(len(starts), dtype=torch.bool)
        now = starts.numpy()
        return torch.from_numpy(document_crossed(self.train_documents, now - self.seq_len, now))

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
        stream = params.model.stream_memory
        steps_per_epoch = n_windows // batch_size
        if stream:  # stretches of the split, room left for an epoch's offset
            steps_per_epoch = max(0, (len(train) - seq_len) // batch_size // seq_len)
        if steps_per_epoch == 0:
            raise ConfigError(
                f"the train split ({len(train)} tokens) holds {n_windows} windows of "
                f"data.seq_len+1={seq_len + 1} tokens, fewer than batch_size={batch_size}; lower "
                "batch_size or data.seq_len, or use more data"
            )
        sub = train[: min(len(train), len(val))]  # a memmap slice: nothing is read yet
        documents = (
            {s: read_documents(data_dir, s, meta) for s in ("train", "validation")}
            if stream
            else {}
        )
        return cls(
            train,
            val,
            sub,
            n_windows,
            steps_per_epoch,
            nonoverlapping_windows(len(val), seq_len),
            nonoverlapping_windows(len(sub), seq_len),
            seq_len,
            batch_size,
            documents.get("train"),
            documents.get("validation"),
        )


def epoch_order(seed: int, epoch: int, n_windows: int) -> torch.Tensor:
    """The epoch's window order: a permutation from a generator seeded with (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return torch.from_numpy(rng.permutation(n_windows).astype(np.int64))


def stream_order(
    seed: int, epoch: int, n_tokens: int, batch_size: int, seq_len: int
) -> torch.Tensor:
    """The stream layout's window starts: entry ``s * batch_size + b`` is window s of stretch b,
    ``offset + b * stretch + s * seq_len``, with ``stretch = (n_tokens - seq_len) //
    batch_size`` and an epoch's seeded offset in ``[0, seq_len)``; ``stretch // seq_len`` steps.
    The last window read ends at most at the split's last token."""
    stretch = (n_tokens - seq_len) // batch_size
    steps = stretch // seq_len
    offset = int(np.random.default_rng([seed, epoch, 1]).integers(0, seq_len))
    rows = offset + stretch * torch.arange(batch_size, dtype=torch.int64)  # (B,)
    steps_t = seq_len * torch.arange(steps, dtype=torch.int64)  # (S,)
    return (steps_t[:, None] + rows[None, :]).reshape(-1)  # (S * B,)


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
    tokens: np.ndarray, starts: torch.Tensor, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, seq_len) of the windows starting at ``starts`` (token offsets),
    read from the memmap."""
    xy = to_device(window_batch(tokens, starts.tolist(), seq_len), device)  # (B, seq_len + 1)
    return xy[:, :-1], xy[:, 1:]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; pinned first on CUDA, so the copy does not wait for the
    device's queued work."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
