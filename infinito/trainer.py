"""One training session of one process, in parts: setup, step, flush, validate, save, finish.

``Trainer`` holds everything a session works on: the opened data and its ``StepLayout``, the
model, optimizer, schedules and gradient scaler, the ``runstate.Loop`` (the part that is saved
and resumed), and the session's own clocks and pending numbers. ``train.train`` builds one and
drives it; each method below is one part of the loop and reads top to bottom:

- ``__init__``: the model (seeded), the optimizer and schedules, the resumed state,
  DistributedDataParallel and ``torch.compile``;
- ``fit``: epochs of steps, validation and a save at each epoch end, stops on signals;
- ``run_step``: one optimizer step and what falls due after it (flush, validation, save);
- ``optimizer_step``: the micro-batches' forward and backward passes, clipping, the update and
  the memory write;
- ``flush``: one host read of the pending steps' numbers, which raises on NaN/inf;
- ``validate`` and ``record``: rank 0 scores the validation split; the history row (logged to
  DVCLive), best model, plateau schedule and early stopping;
- ``save``: the resumable state, written in the background; ``check_stop``: after SIGINT or
  SIGTERM, a save and ``TrainingInterrupted``;
- ``finish``: the last validation, the final train-prefix score and ``metrics/train.json``'s
  numbers.

Each step's loss, grad norm and stats stay on the device until a flush reads them all at once:
a host read per step would stall the host until the device finished the step, so it could not
queue the next one meanwhile (launch-bound on a GPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from infinito import distributed
from infinito.atomic import remove_own_temporaries
from infinito.batches import StepLayout, TrainData, load_windows, to_device
from infinito.checkpoint import AsyncSaver, portable_rng_state, restore_rng_state
from infinito.config import Params
from infinito.iit import WRITE_STATS
from infinito.init import InitSource
from infinito.optim import build_optimizer, build_schedulers
from infinito.runstate import STATE_FILE, Accumulator, Loop, restore, snapshot
from infinito.runtime import autocast, compile_mode, resolve_dtype, seed_everything
from infinito.scoring import Score, preserved_state, score
from infinito.trainlog import (
    STEP_LOSS,
    LiveLog,
    Progress,
    final_metrics,
    history_row,
    log_parameters,
)

# The train stage's log: one logger for all its lines, wherever the code lives.
log = logging.getLogger("infinito.train")


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved at a step boundary."""

    def __init__(self, signum: int, step: int, state_path: Path) -> None:
        self.signum = signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; the state is saved "
            f"in {state_path}; rerun the same command to resume"
        )


class NonFiniteLoss(Exception):
    """The loss or gradient norm became NaN/inf; nothing from that step was saved."""


class Trainer:
    """One process's training session over one explicit state (see the module docstring)."""

    def __init__(
        self,
        params: Params,
        data: TrainData,
        layout: StepLayout,
        dist: distributed.Dist,
        total_steps: int,
        state: dict[str, Any] | None,
        fingerprint: tuple[str, dict[str, Any]],
        state_dir: Path,
        save_every_sec: float,
        started: float,
        init: InitSource,
        live: LiveLog | None = None,
    ) -> None:
        """Build the session from ``init``'s weights; ``state`` (None: a fresh run) is restored
        into it, and its saved history into ``live`` (rank 0's DVCLive record, None elsewhere)."""
        self.init = init
        self.params, self.tc, self.data, self.dist = params, params.train, data, dist
        self.layout, self.total_steps, self.fingerprint = layout, total_steps, fingerprint
        self.state_path, self.best_dir = state_dir / STATE_FILE, state_dir / "best"
        self.device = device = dist.device
        self.dtype = resolve_dtype(self.tc.precision, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(params.seed)
        self.model = init.build(params.model).to(device)
        if data.stream:  # one memory per batch row, each row a stream (batches.py)
            self.model.reset_memory(rows=params.batch_size)
        self.part_rows = (  # each micro-batch's memory rows: its rows of the global batch
            [torch.arange(lo, hi, device=device) for lo, hi in layout.parts]
            if data.stream
            else None
        )
        self.optimizer = build_optimizer(self.model, params, device)
        self.scheduler, self.plateau = build_schedulers(self.optimizer, params, total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.loop = self._start_or_resume(state)
        self.live = live
        if live is not None:
            live.replay(self.loop)
        if dist.rank > 0:  # the model is initialised alike everywhere; dropout and noise differ
            torch.manual_seed(distributed.rank_seed(params.seed, dist.rank, self.loop.step))
        if dist.is_main:
            log_parameters(self.model)
        self.ddp = self._wrap_ddp() if dist.world > 1 else None
        self.plain: Any = self.model if self.ddp is None else self.ddp
        mode = compile_mode(self.tc.compile, device)
        self.forward: Any = self.plain if mode is None else torch.compile(self.plain, mode=mode)
        self.compiled = mode is not None
        self.saver = AsyncSaver()
        self.abandoned = False
        # the step of the last state saved to state_path (a resumed run's starts there)
        self.saved_step: int | None = None if state is None else self.loop.step
        self.progress = Progress(
            params.epochs,
            data.steps_per_epoch,
            total_steps,
            self.tc.log_every,
            params.batch_size * params.data.seq_len,
            enabled=dist.is_main,
        )
        self.save_every_sec, self.started = save_every_sec, started
        self.last_save = time.perf_counter()
        self.wall_before = self.loop.wall_seconds  # earlier sessions of this run
        self.pending: list[tuple[int, int, int, torch.Tensor]] = []  # (step, epoch, batch, numbers)
        self.stat_keys: list[str] = []
        self.write_keys: list[str] = []
        self.last_flush = time.perf_counter()
        self.first_step = True

    def _start_or_resume(self, state: dict[str, Any] | None) -> Loop:
        params, dist = self.params, self.dist
        if state is None:
            log.info(
                "starting a fresh run from %s: %d steps/epoch x %d epochs%s on %s (%s)%s",
                self.init.describe(),
                self.data.steps_per_epoch,
                params.epochs,
                f", stopping at step {self.tc.max_steps}" if self.tc.max_steps else "",
                self.device,
                str(self.dtype).removeprefix("torch."),
                f", {dist.world} processes" if dist.world > 1 else "",
            )
            return Loop()
        restore(
            state,
            self.model,
            self.optimizer,
            self.scheduler,
            self.plateau,
            self.scaler,
            self.device,
        )
        loop = Loop.from_dict(state["loop"])
        log.info(
            "resuming from %s at epoch %d, step %d/%d",
            self.state_path,
            loop.epoch + 1,
            loop.step,
            self.total_steps,
        )
        return loop

    def _wrap_ddp(self) -> Any:
        lo, hi = self.layout.parts[0]
        seq_len = self.params.data.seq_len
        x, y = load_windows(self.data.train, torch.arange(lo, hi) * seq_len, seq_len, self.device)

        def probe() -> torch.Tensor:
            with autocast(self.device, self.dtype):
                return self.loss_of(self.model(x, y))

        return distributed.wrap_model(self.model, probe, self.dist)

    def loss_of(self, out: Any) -> torch.Tensor:
        """Cross-entropy plus ``lambda_phi`` times the Delta-Phi term (exactly CE at 0)."""
        lam = self.params.lambda_phi
        return out.loss if lam == 0 else out.loss + lam * out.aux_loss

    # ------------------------------------------------------------------ the loop

    def fit(self, stop: list[int]) -> None:
        """Train until the epochs, ``train.max_steps`` or early stopping end the run."""
        loop, params, spe = self.loop, self.params, self.data.steps_per_epoch
        self.model.train()
        while (
            not loop.early_stopped and loop.epoch < params.epochs and loop.step < self.total_steps
        ):
            if loop.order is None:
                loop.order = self.data.epoch_starts(params.seed, loop.epoch)
            self.progress.start_epoch(loop.epoch, loop.pos, self.total_steps - loop.step)
            while loop.pos < spe and loop.step < self.total_steps:
                self.run_step(stop)
            self.progress.end_epoch()
            if loop.pos == spe:
                self.record(self.validate(), epoch_end=True)
                loop.epoch, loop.pos, loop.order = loop.epoch + 1, 0, None
                self.save()
            self.check_stop(stop)

    def run_step(self, stop: list[int]) -> None:
        """One optimizer step, then the flush, validation and save that fall due after it."""
        t0 = time.perf_counter()
        self.optimizer_step(stop)
        loop, tc = self.loop, self.tc
        end_of_epoch = loop.pos == self.data.steps_per_epoch
        eval_due = bool(
            tc.eval_every_steps
            and loop.step % tc.eval_every_steps == 0
            and not end_of_epoch
            and loop.step < self.total_steps
        )
        save_due = not end_of_epoch and time.perf_counter() - self.last_save >= self.save_every_sec
        # Flushing before a validation or save here, not inside them, keeps the device's queued
        # work in this step's time. One process on a device that runs ahead flushes every
        # log_every steps (or second).
        ce_v, flagged, n_read = None, None, 0
        if (
            self.first_step
            or self.dist.world > 1
            or loop.step % tc.log_every == 0
            or end_of_epoch
            or eval_due
            or save_due
            or loop.step >= self.total_steps
            or stop
            or time.perf_counter() - self.last_flush >= 1.0
        ):
            ce_v, flagged, n_read = self.flush()
        self._time_step(time.perf_counter() - t0)
        if n_read:
            assert ce_v is not None
            self.progress.step(loop, ce_v, self.optimizer.param_groups[0]["lr"], n_read)
        if eval_due:
            self.record(self.validate(), epoch_end=False)
        self.check_stop(stop, flagged)
        if save_due:
            self.save()

    def _time_step(self, seconds: float) -> None:
        """Count a step's time; the session's first (compilation, warm-up) only on its own."""
        loop, n_tok = self.loop, self.params.batch_size * self.params.data.seq_len
        if self.first_step:
            loop.first_step_sec, self.first_step = seconds, False
        else:
            loop.timed_tokens += n_tok
            loop.timed_seconds += seconds
            loop.acc.tokens += n_tok
            loop.acc.seconds += seconds

    def check_stop(self, stop: list[int], flagged: float | None = None) -> None:
        """After a signal (here or, with several processes, on any): save, then raise."""
        signum = distributed.stop_signal(stop, self.dist, flagged)
        if signum:
            self.progress.end_epoch()
            self.save(sync=True)
            distributed.barrier(self.dist)  # rank 0's state is on disk before any process exits
            raise TrainingInterrupted(signum, self.loop.step, self.state_path)

    # ------------------------------------------------------------------ one optimizer step

    def optimizer_step(self, stop: list[int]) -> None:
        """Forward and backward over the global batch's micro-batches, clip, step, write memory.

        The step's numbers (loss, cross-entropy, stats, grad norm) are queued for ``flush``.
        """
        loop, params, dist = self.loop, self.params, self.dist
        assert loop.order is not None
        batch = loop.order[loop.pos * params.batch_size : (loop.pos + 1) * params.batch_size]
        resets = self.data.resets(batch, first=loop.pos == 0)
        if resets is not None:  # streams at an epoch's start or in a new document
            self.model.clear_memory_rows(to_device(resets, self.device))
        sums, parts = self._micro_batches(batch)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        )
        if dist.world > 1:  # the whole batch's means, and whether any process got a signal
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            sums = distributed.all_reduce_sum(torch.cat([sums, flag]))
        numbers = torch.cat([sums, gnorm.float().reshape(1)])  # read (and checked) at a flush
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if dist.world == 1 and len(parts) == 1:
            written = self.model.write_memory(parts[0][0])
        else:  # every process writes the whole batch's candidates: the same memory everywhere
            written = self.model.write_memory(distributed.gather_candidates(parts, dist))
        del parts
        self.write_keys[:] = [k for k in WRITE_STATS if k in written]
        if self.write_keys:  # after the step's numbers; NaN where there was nothing to measure
            numbers = torch.cat([numbers, torch.stack([written[k] for k in self.write_keys])])
        self.pending.append((loop.step + 1, loop.epoch + 1, loop.pos + 1, numbers))
        if self.plateau is None or loop.step < self.tc.warmup_steps:
            self.scheduler.step()
        loop.step += 1
        loop.pos += 1
        loop.tokens_trained += params.batch_size * params.data.seq_len

    def _micro_batches(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[tuple[Any, int]]]:
        """Forward and backward over this process's micro-batches of ``batch``.

        Returns the loss, cross-entropy and stats as means over the global batch (this process's
        share of them) and each micro-batch's memory candidates with its window count.
        """
        layout, seq_len = self.layout, self.params.data.seq_len
        parts: list[tuple[Any, int]] = []
        sums: torch.Tensor | None = None
        last_part = len(layout.parts) - 1
        for k, (lo, hi) in enumerate(layout.parts):
            x, y = load_windows(self.data.train, batch[lo:hi], seq_len, self.device)
            rows = None if self.part_rows is None else self.part_rows[k]
            no_sync = self.ddp is not None and k < last_part  # DDP reduces at the last only
            with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                out, loss = self._forward_backward(x, y, rows, layout.loss_scales[k], first=k == 0)
            self.stat_keys[:] = list(out.stats)
            row = [loss.detach(), out.loss.detach(), *out.stats.values()]
            v = torch.stack([t.float() for t in row]) * layout.shares[k]
            sums = v if sums is None else sums + v  # means over the global batch
            parts.append((out.candidates, hi - lo))
            del out, loss
        assert sums is not None
        return sums, parts

    def _forward_backward(
        self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None, scale: float, first: bool
    ) -> tuple[Any, torch.Tensor]:
        """One micro-batch; with ``train.compile: auto`` a failing first compiled pass falls
        back to eager mode (the RNG rewound, so the step is the one eager would have taken)."""
        if first and self.first_step and self.compiled and self.tc.compile == "auto":
            rng = portable_rng_state()
            try:
                return self._pass(x, y, rows, scale)
            except Exception as e:  # dynamo/inductor errors vary
                log.warning(
                    "torch.compile failed at the first step (%s: %s); training without it",
                    type(e).__name__,
                    e,
                )
                self.optimizer.zero_grad(set_to_none=True)
                restore_rng_state(rng)
                self.forward, self.compiled = self.plain, False
        return self._pass(x, y, rows, scale)

    def _pass(
        self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None, scale: float
    ) -> tuple[Any, torch.Tensor]:
        """``rows``: the micro-batch's stream memories (None: the shared memory or none)."""
        with autocast(self.device, self.dtype):
            out = self.forward(x, y) if rows is None else self.forward(x, y, memory_rows=rows)
        loss = self.loss_of(out)
        # scale: the micro-batch's share of the global batch x processes (batches.py)
        self.scaler.scale(loss if scale == 1.0 else loss * scale).backward()
        return out, loss

    # ------------------------------------------------------------------ pending numbers

    def flush(self) -> tuple[float | None, float | None, int]:
        """Read the pending steps' numbers (one host sync) into the history accumulator.

        Raises ``NonFiniteLoss`` naming the first bad step. Runs before every validation and
        save, so no state or best model after a bad step is ever written. Returns the last
        step's cross-entropy, its stop flag (several processes) and the number of steps read.
        """
        self.last_flush = time.perf_counter()
        if not self.pending:
            return None, None, 0
        rows = torch.stack([numbers for *_, numbers in self.pending]).tolist()
        where = [(step, epoch, batch) for step, epoch, batch, _ in self.pending]
        self.pending.clear()
        several = self.dist.world > 1
        ce_v = flagged = None
        n_written = len(self.write_keys)
        for (step, epoch, batch), numbers in zip(where, rows, strict=True):
            row, written = numbers[: len(numbers) - n_written], numbers[len(numbers) - n_written :]
            total_v, ce_v, *stat_v, gnorm_v = row
            flagged = stat_v.pop() if several else None
            bad_grad = not math.isfinite(gnorm_v) and not self.scaler.is_enabled()
            if not math.isfinite(total_v) or bad_grad:
                self._stop_together()
                raise NonFiniteLoss(
                    f"non-finite {'loss' if not math.isfinite(total_v) else 'gradient'}"
                    f" at step {step} (epoch {epoch}, batch {batch}): loss={total_v}, "
                    f"grad norm={gnorm_v}; stopped without saving it; {self._what_is_kept()}"
                )
            stats = dict(zip(self.stat_keys, stat_v, strict=True))
            stats.update(zip(self.write_keys, written, strict=True))
            self.loop.acc.add(ce_v, stats)
            if step % self.tc.log_every == 0 or step == 1:  # from the initial loss on
                self._log_step_loss({"step": step, STEP_LOSS: ce_v})
        return ce_v, flagged, len(rows)

    def _log_step_loss(self, row: dict[str, Any]) -> None:
        self.loop.step_log.append(row)
        if self.live is not None:
            self.live.step_loss(row)

    def _what_is_kept(self) -> str:
        """What a stop leaves on disk: the last saved state and best model, or that none is."""
        if self.dist.is_main:
            with contextlib.suppress(Exception):  # a save in flight is waited for
                self.saver.wait()
        if self.saved_step is None or not self.state_path.exists():
            kept = "no state was saved yet, so rerunning starts from scratch"
        else:
            kept = f"the last saved state is {self.state_path} (step {self.saved_step})"
        if self.best_dir.exists():
            kept += f"; the best model so far is in {self.best_dir}"
        return kept + " (a lower lr or train.grad_clip may avoid the divergence)"

    def _stop_together(self) -> None:
        """No process exits while rank 0 still saves."""
        if self.dist.world > 1:
            if self.dist.is_main:
                with contextlib.suppress(Exception):
                    self.saver.wait()
            distributed.barrier(self.dist)

    # ------------------------------------------------------------------ validation and saves

    def validate(self) -> Score:
        """Rank 0 scores the validation split; the others wait for its numbers."""
        self.flush()
        t0 = time.perf_counter()
        result = Score(0.0, 0)
        data, dist = self.data, self.dist
        if dist.is_main:
            with preserved_state(self.model):
                result = score(
                    self.model,
                    data.val,
                    data.val_windows,
                    self.params.batch_size,
                    self.device,
                    self.dtype,
                    documents=data.val_documents,
                )
        if dist.world > 1:
            nll, tokens = distributed.broadcast_floats([result.nll_sum, result.tokens], 2, dist)
            if not dist.is_main:
                result = Score(nll, int(tokens))
        self.loop.eval_seconds += time.perf_counter() - t0
        return result

    def record(self, val: Score, epoch_end: bool) -> None:
        """A history row, the best checkpoint, the plateau schedule and early stopping."""
        loop, tc = self.loop, self.tc
        lr = self.optimizer.param_groups[0]["lr"]
        row = history_row(loop, lr, self.data.steps_per_epoch, val)
        train_loss = row.get("train_loss")
        loop.history.append(row)
        loop.acc = Accumulator()
        if self.live is not None:
            self.live.validation(row)
        msg = (
            f"epoch {row['epoch']:g} step {loop.step}: train loss "
            f"{'-' if train_loss is None else f'{train_loss:.4f}'}  val loss {val.loss:.4f}  "
            f"val ppl {val.ppl:.2f}"
        )
        stopped_before = loop.early_stopped
        if loop.track(val.loss, row["epoch"], epoch_end, tc.min_delta, tc.patience):
            if self.dist.is_main:
                self.model.save(self.best_dir)  # atomic: the old best stays whole until replaced
            msg += "  (best so far)"
        self.progress.message(msg)
        if self.plateau is not None and loop.step >= tc.warmup_steps:
            self.plateau.step(val.loss)
        if loop.early_stopped and not stopped_before:
            self.progress.message(
                f"early stopping: no val-loss drop of {tc.min_delta} in {tc.patience} epoch(s)"
            )

    def snapshot(self) -> dict[str, Any]:
        fp, fp_inputs = self.fingerprint
        return snapshot(
            fp,
            fp_inputs,
            self.model,
            self.optimizer,
            self.scheduler,
            self.plateau,
            self.scaler,
            self.loop,
        )

    def save(self, sync: bool = False) -> None:
        """Rank 0 writes the resumable state (in the background unless ``sync``)."""
        self.flush()
        if self.dist.is_main:
            self.loop.wall_seconds = self.wall_before + time.perf_counter() - self.started
            self.saver.save(self.snapshot(), self.state_path)
            if sync:
                self.saver.wait()
            self.saved_step = self.loop.step  # (an asynchronous save's error surfaces later)
        self.last_save = time.perf_counter()

    # ------------------------------------------------------------------ the end

    def finish(self) -> bool:
        """Validate the final weights, and on rank 0 measure them on a train prefix and save
        the completed state with its final metrics. Returns whether this process is rank 0."""
        loop, dist = self.loop, self.dist
        if dist.world > 1:
            differ = distributed.replicas_differ(self.model, dist)
            if differ:
                raise RuntimeError(
                    "the training processes hold different weights or memory in "
                    f"{', '.join(differ[:5])}: a distributed-training bug; please report it"
                )
        # max_steps inside an epoch (or a stop just before its validation) leaves the last step
        # unvalidated: validate there, so the final row describes the final weights.
        if not loop.history or loop.history[-1]["step"] != loop.step:
            self.record(self.validate(), epoch_end=False)
        if not dist.is_main:
            return False
        t0 = time.perf_counter()
        data, params = self.data, self.params
        with preserved_state(self.model):
            train_sub = score(
                self.model,
                data.sub,
                data.sub_windows,
                params.batch_size,
                self.device,
                self.dtype,
                documents=data.train_documents,
            )
        loop.eval_seconds += time.perf_counter() - t0
        loop.wall_seconds = self.wall_before + time.perf_counter() - self.started
        loop.final_metrics = {
            **final_metrics(
                params,
                self.model,
                loop,
                train_sub,
                self.device,
                self.dtype,
                data.steps_per_epoch,
                self.compiled,
                dist.world,
            ),
            **self.init.metrics(),  # what the run started from
        }
        loop.complete = True
        self.saver.save(self.snapshot(), self.state_path)
        self.saver.wait()
        return True

    def abandon(self) -> None:
        """An abort (a second signal): the save in flight is not waited for, and its temporary
        file is removed now (the writer thread ends with the process)."""
        self.abandoned = True
        if self.dist.is_main:
            remove_own_temporaries(self.state_path.parent)

    def close(self) -> None:
        """Always, even after an error: end the progress bar and the DVCLive record, wait for a
        save in flight (unless the run was abandoned), and let go of DistributedDataParallel
        while its process group is still alive."""
        self.progress.end_epoch()
        if self.live is not None:
            self.live.end()
        if not self.abandoned:
            with contextlib.suppress(Exception):  # a failing save must not mask the real error
                self.saver.wait()
        # Freed after destroy_process_group, DDP's reducer would drop the last reference to the
        # gloo group while holding the GIL, and the group's destructor joins worker threads that
        # may need the GIL to free a finished broadcast's tensors: a hang at exit.
        self.ddp = None
        self.plain = self.forward = self.model
