"""Continuous batching: one decode thread serves every request, a bounded queue in front of it.

Requests (``Job``) wait in a queue of at most ``max_queue`` beside the ``max_batch`` that are
decoding; past that a new one is refused (``QueueFull``: the API answers 503 with Retry-After)
instead of building a backlog. The decode
thread runs a loop:

1. admit waiting jobs while fewer than ``max_batch`` run: each is prefilled alone (its prompt
   has its own length) and its first token is sampled, so it streams from this round on;
2. drop jobs that finished or whose client went away (``Job.cancel``): their slot is free for
   the next round;
3. one ``Engine.step`` for all running jobs: one new token each, each under its own sampling
   settings, seed and stop rules.

So requests that arrive together decode together, and one that arrives later joins between
two steps instead of waiting for the batch to drain. Events go back to the asyncio side
through ``Job.emit``, a thread-safe callback.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infinito.serve.engine import Engine, Sampling, Sequence
from infinito.serve.textstream import Decode, TextStream

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The wait queue holds ``max_queue`` jobs already."""


@dataclass(frozen=True)
class Event:
    """What a job reports: ``text`` deltas, then one ``done`` (or ``error``)."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" on done
    completion_tokens: int = 0


@dataclass
class Job:
    """One completion request on its way through the batcher."""

    prompt_ids: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    eos_token_id: int | None
    emit: Callable[[Event], Any]  # called from the decode thread
    seq: Sequence | None = None
    text: TextStream | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client has gone: stop decoding this job at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Batcher:
    """The decode thread and its bounded wait queue."""

    def __init__(self, engine: Engine, decode: Decode, max_batch: int, max_queue: int) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.engine, self.decode = engine, decode
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="infinito-decode", daemon=True)
        self.steps = 0  # decode steps run (a step of B jobs counts once)
        self.rows = 0  # jobs advanced, summed over steps: rows / steps is the mean batch
        self.completed = 0

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``QueueFull`` when max_batch + max_queue jobs are in already."""
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down or its decode thread stopped")
            if len(self._waiting) + len(self._running) >= self.max_batch + self.max_queue:
                raise QueueFull(
                    f"{len(self._running)} requests are decoding and {len(self._waiting)} "
                    f"waiting (--max-batch {self.max_batch}, --max-queue {self.max_queue})"
                )
            self._waiting.append(job)
            self._cond.notify()

    @property
    def healthy(self) -> bool:
        """The decode thread runs and takes requests."""
        return self._thread.is_alive() and not self._stop

    def load(self) -> dict[str, float]:
        """Running and waiting jobs now; decode steps, mean batch and completed jobs so far."""
        with self._cond:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "decode_steps": self.steps,
                "decode_rows": self.rows,
                "mean_batch": self.rows / self.steps if self.steps else 0.0,
                "completed": self.completed,
            }

    # ------------------------------------------------------------------ the decode thread

    def _loop(self) -> None:
        reason = "the server is shutting down"
        try:
            while self._round():
                pass
        except Exception:  # a bug outside the per-job guards: fail everyone, accept no more
            log.exception("the decode thread stopped")
            reason = "the decode thread stopped; see the server log"
        with self._cond:
            self._stop = True
            left = [*self._running, *self._waiting]
        for job in left:
            if not job.cancelled:
                job.emit(Event("error", text=reason))

    def _round(self) -> bool:
        """Admit, drop finished jobs, step the rest; False once shutdown is asked for."""
        with self._cond:
            while not self._stop and not self._waiting and not self._running:
                self._cond.wait()
            if self._stop:
                return False
            free = self.max_batch - len(self._running)
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self._running.extend(admitted)  # counted as running from now on (see submit)
        for job in admitted:
            self._guard(job, self._admit)
        with self._cond:
            self._running = [j for j in self._running if not self._finished(j)]
            running = list(self._running)
        if running:
            self._guard_step(running)
        return True

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return
        job.text = TextStream(self.decode, job.stop)
        job.seq = self.engine.start(job.prompt_ids, job.sampling)
        self._emit_token(job)

    def _guard_step(self, running: list[Job]) -> None:
        try:
            self.engine.step([j.seq for j in running if j.seq is not None])  # all are admitted
            self.steps += 1
            self.rows += len(running)
        except Exception as e:  # a failed step fails its jobs, never the server
            log.exception("decode step failed")
            for job in running:
                self._fail(job, e)
            return
        for job in running:
            self._guard(job, self._emit_token)

    def _guard(self, job: Job, fn: Callable[[Job], None]) -> None:
        try:
            fn(job)
        except Exception as e:
            log.exception("request failed")
            self._fail(job, e)

    def _fail(self, job: Job, error: Exception) -> None:
        job.cancel()
        job.emit(Event("error", text=f"{type(error).__name__}: {error}"))

    def _emit_token(self, job: Job) -> None:
        """Report the job's newest token; finish it on end-of-text, a stop sequence or length."""
        assert job.seq is not None and job.text is not None
        seq, token = job.seq, int(job.seq.last.item())
        if job.eos_token_id is not None and token == job.eos_token_id:
            self._done(job, "stop", seq.generated - 1)  # end-of-text is not part of the text
            return
        delta, stopped = job.text.add(token)
        if delta:
            job.emit(Event("text", text=delta, completion_tokens=seq.generated))
        if stopped:
            self._done(job, "stop", seq.generated)
        elif seq.generated >= job.sampling.max_tokens or not self.engine.can_extend(seq):
            self._done(job, "length", seq.generated)

    def _done(self, job: Job, reason: str, tokens: int) -> None:
        assert job.text is not None
        tail = job.text.flush()  # held-back text is final now (empty after a stop sequence)
        if tail:
            job.emit(Event("text", text=tail, completion_tokens=tokens))
        job.emit(Event("done", finish_reason=reason, completion_tokens=tokens))
        job.cancel()  # finished: leaves the running set
        self.completed += 1

    @staticmethod
    def _finished(job: Job) -> bool:
        return job.cancelled
