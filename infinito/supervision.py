"""The trainer's ties to whoever runs it: it stops when they die, and runs alone on its state.

``stop_when_orphaned`` makes the trainer save and stop (the SIGTERM path of
``runstate.stop_on_signals``) when the process that launched it dies: ``kill -9`` of ``dvc
repro``, a supervisor's timeout, a closed Prefect worker. DVC runs a stage as ``$SHELL -c
CMD``, and ``train.nproc_per_node > 1`` adds torchrun's agent between it and each worker, so the
launcher is the nearest ancestor above those wrappers. The direct parent is covered by Linux's
``PR_SET_PDEATHSIG`` (set through ``prctl``), the ancestors above the wrappers by a thread that
checks every second that each of them still has the parent it had at the start (a dead
process's children are re-parented).

``state_lock`` holds an exclusive ``flock`` on ``STATE_DIR/.lock`` for the trainer's life, with
its PID in the file, so a second trainer on the same state directory refuses naming that PID.
The kernel drops the lock when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

from infinito.config import ConfigError

# The train stage's log: one logger for all its lines, wherever the code lives.
log = logging.getLogger("infinito.train")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "fish"})
POLL_SEC = 1.0
LOCK_FILE = ".lock"


def _is_shell_wrapper(proc: psutil.Process) -> bool:
    """``sh -c CMD`` and the like: how DVC (and ``subprocess(shell=True)``) runs a command."""
    try:
        cmd = proc.cmdline()
    except (psutil.Error, OSError):
        return False
    return bool(cmd) and os.path.basename(cmd[0]).lstrip("-") in SHELLS and "-c" in cmd[1:]


def launch_chain(through_launcher: bool = False) -> list[tuple[int, int]]:
    """(pid, parent pid) for this process and each wrapper above it, up to the launcher.

    ``through_launcher``: this process is a torchrun worker, so its parent (the agent) is a
    wrapper too.
    """
    chain = [(os.getpid(), os.getppid())]
    try:
        proc = psutil.Process(os.getppid())
        wrapper = through_launcher or _is_shell_wrapper(proc)
        while wrapper and proc.ppid() > 1:
            chain.append((proc.pid, proc.ppid()))
            proc = psutil.Process(proc.ppid())
            wrapper = _is_shell_wrapper(proc)
    except psutil.Error:  # an ancestor ended meanwhile: the watch notices at its first look
        pass
    return chain


def _broken(chain: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The first link of ``chain`` whose process ended or changed parent, if any."""
    for pid, ppid in chain:
        try:
            now = os.getppid() if pid == os.getpid() else psutil.Process(pid).ppid()
        except psutil.Error:
            return pid, ppid
        if now != ppid:
            return pid, ppid
    return None


def _set_parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))


@contextlib.contextmanager
def stop_when_orphaned(
    through_launcher: bool = False, signum: int = signal.SIGTERM, poll_sec: float = POLL_SEC
) -> Iterator[threading.Thread]:
    """For the block, deliver ``signum`` to this process when its launcher dies (see the module
    docstring). Yields the (daemon) watch thread."""
    _set_parent_death_signal(signum)
    chain = launch_chain(through_launcher)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_sec):
            broken = _broken(chain)
            if broken is not None:
                pid, ppid = broken
                who = "its parent" if pid == os.getpid() else f"the parent of wrapper {pid}"
                log.warning(
                    "the process that launched this trainer ended (%s, PID %d): sending "
                    "%s to save the state and stop",
                    who,
                    ppid,
                    signal.Signals(signum).name,
                )
                os.kill(os.getpid(), signum)
                return

    thread = threading.Thread(target=watch, name="infinito-parent-watch", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        _set_parent_death_signal(0)


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``state_dir`` (its ``.lock`` file) for the block.

    Raises ``ConfigError`` naming the PID that holds it when another process does.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"another trainer (PID {holder}) is using the state directory {state_dir}; "
                f"wait for it to finish, or stop it with `kill {holder}` (it saves its state, "
                "and this command then resumes it)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)
