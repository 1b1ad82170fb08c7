"""Training on several processes: torchrun launch, process group, and the trainer's collectives.

``python -m infinito.train`` with ``train.nproc_per_node > 1`` re-executes itself under
``torch.distributed.run`` (torchrun) on this machine; a user's own ``torchrun`` command (several
machines, say) runs the same module. Either way each process finds its rank in torchrun's
environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and joins a process group: NCCL on CUDA
(process ``LOCAL_RANK`` uses GPU ``LOCAL_RANK``), gloo on CPU.

The trainer wraps the model in DistributedDataParallel and uses these collectives: rank 0 shares
its decisions and numbers (the resumable state, validation losses, final metrics); the memory
candidates of every process are gathered so that every process writes the same memory (with
stream memories, every process holds every row's memory and reads only its own rows'); a check
at the end that every process holds the same weights and memory.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from infinito.config import ConfigError
from infinito.iit import MemoryCandidates
from infinito.runtime import resolve_device

# Rank 0 validates and writes files while the others wait in a collective: allow long waits.
TIMEOUT = datetime.timedelta(minutes=60)
# torchrun's wait between forwarding SIGINT/SIGTERM to the processes and killing them: time for
# rank 0 to finish its step and save the state.
SHUTDOWN_TIMEOUT_SEC = 300


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher setting the same variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def torchrun_command(nproc: int, module: str, argv: Sequence[str]) -> list[str]:
    """The command that runs ``python -m module argv`` as ``nproc`` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT_SEC}",
        "-m",
        module,
        *argv,
    ]


def exec_torchrun(nproc: int, module: str, argv: Sequence[str]) -> NoReturn:
    """Replace this process by torchrun running ``module`` (same PID: signals reach torchrun)."""
    cmd = torchrun_command(nproc, module, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def process_group(device_spec: str) -> Iterator[Dist]:
    """Join torchrun's process group (when ``WORLD_SIZE > 1``) and pick this process's device.

    One process: ``train.device`` as given, no process group. Several: CUDA device
    ``LOCAL_RANK`` with NCCL, or CPU with gloo. A group created here is destroyed on exit.
    """
    world = env_world()
    if world == 1:
        yield Dist(0, 1, 0, resolve_device(device_spec))
        return
    device = resolve_device(device_spec)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"train.device={device_spec!r} puts every one of the {world} processes on one "
                "GPU; use auto or cuda (process k uses GPU LOCAL_RANK=k; pick GPUs with "
                "CUDA_VISIBLE_DEVICES)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)
    finally:
        if created:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- rank 0 shares


def broadcast_bytes(data: bytes | None, d: Dist) -> bytes:
    """Rank 0's ``data`` on every process (others pass None)."""
    size = torch.tensor([len(data) if d.is_main and data is not None else 0], device=d.device)
    dist.broadcast(size, 0)
    if d.is_main and data is not None:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(d.device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=d.device)
    if buf.numel():
        dist.broadcast(buf, 0)
    return data if d.is_main and data is not None else buf.cpu().numpy().tobytes()


def broadcast_json(obj: Any, d: Dist) -> Any:
    """Rank 0's JSON-serialisable ``obj`` on every process (no pickling)."""
    text = json.dumps(obj).encode() if d.is_main else None
    return json.loads(broadcast_bytes(text, d).decode())


def broadcast_floats(values: Sequence[float] | None, n: int, d: Dist) -> list[float]:
    """Rank 0's ``n`` floats (float64) on every process."""
    t = torch.zeros(n, dtype=torch.float64, device=d.device)
    if d.is_main:
        assert values is not None and len(values) == n
        t = torch.tensor(list(values), dtype=torch.float64, device=d.device)
    dist.broadcast(t, 0)
    return t.tolist()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes, in place."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree_max(value: int, d: Dist) -> int:
    """The largest of the processes' ``value``s, on every process."""
    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def stop_signal(stop: list[int], d: Dist, flagged: float | None = None) -> int:
    """The signal to stop on (0: none), the same on every process: a signal that reached any
    process stops all. ``flagged``: the processes' summed stop flags when already reduced."""
    if d.world == 1:
        return stop[0] if stop else 0
    if flagged is None:
        flagged = float(agree_max(1 if stop else 0, d))
    return agree_max(stop[0] if stop else 0, d) if flagged > 0 else 0


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A torch seed for process ``rank`` > 0 from ``step`` on: its own dropout and noise draws."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


# ----------------------------------------------------------------------------- the model


def wrap_model(model: torch.nn.Module, probe: Callable[[], torch.Tensor], d: Dist) -> Any:
    """DistributedDataParallel around ``model``; buffers are not synchronised in forward passes
    (every process writes the same memory, see ``gather_candidates``).

    ``probe()`` returns a loss of one batch; a backward pass through it (random state forked,
    gradients dropped) finds parameters the loss never reaches (e.g. the phi weights when
    ``lambda_phi`` is 0). Only then does DDP search for unused parameters each step, which costs
    a graph traversal and a copy of the outputs.
    """
    devices = [d.device.index] if d.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        probe().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return DistributedDataParallel(
        model,
        device_ids=devices or None,
        forward_sync_buffers=False,
        find_unused_parameters=bool(unused),
    )


def gather_candidates(
    parts: Sequence[tuple[MemoryCandidates | None, int]], d: Dist
) -> MemoryCandidates | None:
    """The memory candidates of one optimizer step's whole global batch, on every process.

    ``parts``: this process's (candidates, windows) per micro-batch, in order. Joined micro-batch
    by micro-batch and rank by rank, i.e. in the global batch's order, as one process running
    the whole batch would produce them. Shared memory: the chunks form one group and
    ``slot_mass`` (the mean attention per slot) is the window-weighted mean, exact also when
    processes hold different numbers of windows. Stream memories: every row's group, with its
    own slot mass and memory row, so every process can write every row's memory.
    """
    if parts[0][0] is None:  # no memory: the same on every process
        return None
    cands = [(c, n) for c, n in parts if c is not None]
    if cands[0][0].rows is not None:
        local = MemoryCandidates.cat(cands)
        return local if d.world == 1 else _gather_streams(local, d)
    with_mass = all(c.slot_mass is not None for c, _ in cands)
    mass_dtype = cands[0][0].slot_mass.dtype if with_mass else torch.float32  # type: ignore[union-attr]
    local = MemoryCandidates.cat([(c._replace(slot_mass=None), n) for c, n in cands])
    device = local.phi.device
    weighted = torch.zeros(0, device=device)
    if with_mass:
        weighted = sum(c.slot_mass.double() * n for c, n in cands)  # type: ignore[union-attr]
    windows = torch.tensor([sum(n for _, n in parts)], dtype=torch.float64, device=device)
    joined = local
    if d.world > 1:
        D = local.keys.shape[-1]
        flat = [local.keys[0].float(), local.values[0].float(), local.phi[0].float()[:, None]]
        gathered = _all_gather_rows(torch.cat(flat, 1), d)  # (N_r, 2D + 1) per rank
        joined = MemoryCandidates.cat(
            [
                (
                    MemoryCandidates(
                        keys=r[None, :, :D].to(local.keys.dtype),
                        values=r[None, :, D : 2 * D].to(local.values.dtype),
                        phi=r[None, :, 2 * D].to(local.phi.dtype),
                        slot_mass=None,
                    ),
                    1,
                )
                for r in gathered
            ]
        )
        totals = all_reduce_sum(torch.cat([windows, weighted.reshape(-1)]))
        windows, weighted = totals[:1], totals[1:].view(1, -1)  # (1, S): the one group's
    mass = (weighted / windows).to(mass_dtype) if with_mass else None
    return joined._replace(slot_mass=mass)


def _gather_streams(local: MemoryCandidates, d: Dist) -> MemoryCandidates:
    """Every process's stream groups (G_r rows of N chunks), stacked in rank order."""
    G, N, D = local.keys.shape
    assert local.rows is not None
    packed = [
        local.keys.float().reshape(G, N * D),
        local.values.float().reshape(G, N * D),
        local.phi.float(),
        local.rows.float()[:, None],  # exact: rows are far below 2**24
    ]
    if local.slot_mass is not None:
        packed.append(local.slot_mass.float())
    gathered = torch.cat(_all_gather_rows(torch.cat(packed, 1), d))  # (B, F)
    cut = 2 * N * D
    mass = gathered[:, cut + N + 1 :]
    return MemoryCandidates(
        keys=gathered[:, : N * D].reshape(-1, N, D).to(local.keys.dtype),
        values=gathered[:, N * D : cut].reshape(-1, N, D).to(local.values.dtype),
        phi=gathered[:, cut : cut + N].to(local.phi.dtype),
        slot_mass=mass.to(local.slot_mass.dtype) if local.slot_mass is not None else None,
        rows=gathered[:, cut + N].round().long(),
    )


def _all_gather_rows(rows: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """Every process's ``rows`` (N_r, C), N_r may differ: padded to the longest, then trimmed."""
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), rows.shape[1], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    out = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(out, padded)
    return [o[:c] for o, c in zip(out, counts, strict=True)]


def replicas_differ(model: torch.nn.Module, d: Dist) -> list[str]:
    """Names of parameters and buffers that are not identical on every process (exact sums)."""
    names, sums = [], []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        v = t.detach().double().flatten()
        names.append(name)
        # two sums: equal tensors give equal values bit for bit; a difference shows in one
        weights = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
        sums.append(torch.stack([v.sum(), (v * weights).sum()]))
    local = torch.stack(sums)
    hi, lo = local.clone(), local.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    differ = ((hi != lo) & ~(hi.isnan() & lo.isnan())).any(1).tolist()
    return [name for name, bad in zip(names, differ, strict=True) if bad]
