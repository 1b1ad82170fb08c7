"""Where a training run stands: its loop state, what must not change to resume it, and signals.

``Loop`` is everything about the run's position other than tensors (epoch, optimizer steps, the
epoch's window order and the position in it counted in global batches, best-so-far, early-stopping
counters, history, the step-level loss series). It depends on no process count, so a state saved
by one process resumes on several and the other way round. The state file records a fingerprint
of the params that shape the run and of the data; ``previous_state`` refuses (or, told to,
discards) a state from others.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from infinito import distributed
from infinito.checkpoint import (
    file_digest,
    fingerprint,
    load_state,
    portable_rng_state,
    restore_rng_state,
    to_cpu,
)
from infinito.config import ConfigError, Params, diff_keys

if TYPE_CHECKING:
    from infinito.init import InitSource

# The train stage's log: one logger for all its lines, wherever the code lives.
log = logging.getLogger("infinito.train")

STATE_FILE = "state.pt"
STATE_FORMAT = 2  # 2: ``order`` holds window start offsets in tokens (was window indices)
# train keys that do not change what is computed (up to floating-point summation order), so a
# state may resume across them.
FINGERPRINT_EXCLUDED = ("device", "compile", "log_every", "nproc_per_node", "micro_batch_size")


@dataclass
class Accumulator:
    """Sums since the last history row (training-mode loss, model stats, timed tokens)."""

    loss_sum: float = 0.0
    steps: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # steps that measured each stat
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss: float, stats: dict[str, float]) -> None:
        """One optimizer step's training-mode loss and model stats; a NaN stat (a write that
        evicted nothing has no evicted-slot age) is left out of that stat's mean."""
        self.loss_sum += loss
        self.steps += 1
        for key, value in stats.items():
            if not math.isnan(value):
                self.stats[key] = self.stats.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        """Each stat's mean over the steps that measured it."""
        return {key: value / self.counts.get(key, self.steps) for key, value in self.stats.items()}


@dataclass
class Loop:
    """Everything about where the run is, other than tensors of the model and optimizer."""

    epoch: int = 0  # index of the current epoch
    pos: int = 0  # global batches of the current epoch done
    step: int = 0  # optimizer steps done
    order: torch.Tensor | None = None  # the current epoch's window starts (tokens), in order
    best_val_loss: float = math.inf
    best_epoch: float = 0.0
    best_step: int = 0
    patience_ref: float = math.inf
    bad_epochs: int = 0
    early_stopped: bool = False
    complete: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per validation
    # the training loss of every train.log_every-th step: {"step": n, "train_loss_step": loss}
    step_log: list[dict[str, Any]] = field(default_factory=list)
    acc: Accumulator = field(default_factory=Accumulator)
    tokens_trained: int = 0
    timed_tokens: int = 0  # excludes the first step of each session (compilation, warm-up)
    timed_seconds: float = 0.0
    first_step_sec: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0  # across sessions
    final_metrics: dict[str, Any] | None = None

    def track(
        self, val_loss: float, epoch: float, epoch_end: bool, min_delta: float, patience: int
    ) -> bool:
        """Best-so-far and early stopping after a validation; True when it is the best so far.

        Early stopping counts epoch-end validations without a drop of at least ``min_delta``
        below the last counted improvement, and sets ``early_stopped`` after ``patience``.
        """
        best = val_loss < self.best_val_loss
        if best:
            self.best_val_loss, self.best_epoch, self.best_step = val_loss, epoch, self.step
        if epoch_end:
            if val_loss < self.patience_ref - min_delta:
                self.patience_ref, self.bad_epochs = val_loss, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs >= patience:
                    self.early_stopped = True
        return best

    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if k != "acc"}
        out["acc"] = copy.deepcopy(vars(self.acc))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Loop:
        data = dict(data)
        data.pop("acc_stats_steps", None)  # an unused counter that states of format 1 still hold
        acc = Accumulator(**data.pop("acc"))
        return cls(acc=acc, **data)


def train_stage_params(params: Params) -> dict[str, Any]:
    """The params the train stage reads (dvc.yaml's train ``params``), nested as in params.yaml
    (DVCLive logs them; the fingerprint starts from them)."""
    return {
        "epochs": params.epochs,
        "batch_size": params.batch_size,
        "lr": params.lr,
        "lambda_phi": params.lambda_phi,
        "seed": params.seed,
        "model": params.model.to_dict(),
        "data": {"seq_len": params.data.seq_len},
        "train": params.train.to_dict(),
    }


def fingerprint_inputs(params: Params, data_dir: Path, init: dict[str, Any]) -> dict[str, Any]:
    """What shapes the run: the train stage's params (minus hardware/display keys), the data,
    and what it started from (``InitSource.record()``: the weights' sha256, a Hub revision)."""
    inputs = train_stage_params(params)
    inputs["data"] |= {s: file_digest(Path(data_dir) / f"{s}.bin") for s in ("train", "validation")}
    inputs["train"] = {k: v for k, v in inputs["train"].items() if k not in FINGERPRINT_EXCLUDED}
    return {**inputs, "init": init}


def previous_state(
    state_dir: Path, fp: str, fp_inputs: dict[str, Any], stale_state: str
) -> dict[str, Any] | None:
    """The resumable state to continue from, or None to start fresh.

    A state with another fingerprint is refused with the keys that differ, or with
    ``stale_state="discard"`` deleted (with the best model kept beside it).
    """
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    state = load_state(path)
    if state.get("format") == STATE_FORMAT and state.get("fingerprint") == fp:
        return state
    changed = diff_keys(state.get("fingerprint_inputs", {}), fp_inputs) or ["state format"]
    what = "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
    if stale_state == "discard":
        log.info(
            "discarding %s: it belongs to a run with other params or data (%s); starting fresh",
            path,
            what,
        )
        path.unlink()
        shutil.rmtree(state_dir / "best", ignore_errors=True)
        return None
    raise ConfigError(
        f"{path} was saved by a run with other params or data ({what}); to resume it, restore "
        f"those params; to start fresh, delete {state_dir} (or pass --stale-state discard)"
    )


def shared_previous_state(
    d: distributed.Dist,
    params: Params,
    data_dir: Path,
    state_dir: Path,
    stale_state: str,
    init: InitSource,
) -> tuple[dict[str, Any] | None, str, dict[str, Any]]:
    """``previous_state`` decided by rank 0 (which owns the files) and shared with every process.

    Returns the state (None: start fresh) and, on rank 0, the run's fingerprint and its inputs
    (elsewhere "" and {}: only rank 0 saves). A refusal is raised on every process.
    """
    fp_inputs: dict[str, Any] = {}
    fp = ""
    state, error = None, None
    if d.is_main:
        fp_inputs = fingerprint_inputs(params, data_dir, init.record())
        fp = fingerprint(fp_inputs)
        # saves cut short by kill -9 (the state lock makes every temporary here stale)
        for tmp in state_dir.glob(".*.tmp"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        try:
            state = previous_state(state_dir, fp, fp_inputs, stale_state)
        except ConfigError as e:
            error = e
    if d.world > 1:
        decision = distributed.broadcast_json(
            {"error": None if error is None else str(error), "resume": state is not None}, d
        )
        if decision["error"] is not None:
            raise error or ConfigError(decision["error"])
        if decision["resume"]:  # the file's bytes: the other processes need no shared disk
            path = state_dir / STATE_FILE
            data = distributed.broadcast_bytes(path.read_bytes() if d.is_main else None, d)
            if not d.is_main:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    elif error is not None:
        raise error
    return state, fp, fp_inputs


def snapshot(
    fp: str,
    fp_inputs: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    plateau: Any,
    scaler: torch.amp.GradScaler,
    loop: Loop,
) -> dict[str, Any]:
    """The resumable state now, on CPU and detached (safe to save from another thread)."""
    return {
        "format": STATE_FORMAT,
        "fingerprint": fp,
        "fingerprint_inputs": fp_inputs,
        "model": to_cpu(model.state_dict()),
        "optimizer": to_cpu(optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "plateau": copy.deepcopy(plateau.state_dict()) if plateau is not None else None,
        "scaler": copy.deepcopy(scaler.state_dict()),
        "rng": portable_rng_state(),
        "loop": loop.to_dict(),
    }


def restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    plateau: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> None:
    """Load ``snapshot``'s tensors and RNG states into a freshly built run."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # the saving run may have used another device
        group["fused"] = device.type == "cuda" or None
    scheduler.load_state_dict(state["scheduler"])
    if plateau is not None:
        plateau.load_state_dict(state["plateau"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])


class TrainingAborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, without the save the first one asked for.

    A ``KeyboardInterrupt`` (a ``BaseException``), so no ``except Exception`` on the way
    swallows it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(
            f"aborted by a second {signal.Signals(signum).name}: stopped at once, without "
            "saving this step; the state saved before (if any) is kept, and rerunning the "
            "same command resumes from it"
        )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag checked at step boundaries; a second one stops at once
    (``TrainingAborted``).

    Yields a list that receives the signal number. Only the main thread can install handlers;
    elsewhere (e.g. a Prefect worker thread) the process's own handling applies.
    """
    flag: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag:
            raise TrainingAborted(signum)
        flag.append(signum)
        log.warning(
            "%s received: saving the state at the end of this step (again to abort)",
            signal.Signals(signum).name,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
