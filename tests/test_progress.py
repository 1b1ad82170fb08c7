"""Training progress shows on every console: a bar where one can draw, lines elsewhere, and the
whole run's ETA in both.

A terminal of 0 x 0 (``script`` without a size, some CI consoles) is a tty on which tqdm draws
nothing; the trainer must fall back to its lines there.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from infinito import runtime, trainlog
from infinito.runstate import Loop

# Ten steps of a 40-step run through Progress, as the trainer drives it.
SCRIPT = """
import logging, sys, time
from infinito.runstate import Loop
from infinito.trainlog import Progress
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
progress = Progress(4, 10, 40, 1, 256)
print("bar" if progress.tty else "lines", flush=True)
loop = Loop()
progress.start_epoch(0, 0, 40)
for step in range(1, 11):
    time.sleep(0.01)
    loop.step, loop.pos, loop.timed_tokens, loop.timed_seconds = step, step, 256 * step, 0.01 * step
    progress.step(loop, 4.0, 1e-3)
progress.end_epoch()
"""


def _run_on_a_pty(columns: int, rows: int) -> tuple[str, str]:
    """Run SCRIPT with stderr on a new pty of ``columns`` x ``rows``: (stdout, what it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=slave, env=env, text=True
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the pty
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, shown.decode(errors="replace")
    return stdout.strip(), shown.decode(errors="replace")


def test_a_zero_column_terminal_gets_lines() -> None:
    mode, shown = _run_on_a_pty(0, 0)
    assert mode == "lines"
    assert "epoch 1/4  step 10/40" in shown, repr(shown)
    assert "run eta" in shown


def test_a_real_terminal_gets_a_bar_with_the_run_s_eta() -> None:
    mode, shown = _run_on_a_pty(120, 40)
    assert mode == "bar"
    assert "epoch 1/4" in shown and "run_eta=" in shown, repr(shown)


def test_the_run_eta_counts_every_step_left_of_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0])  # 10 steps in 10 s of wall time
    monkeypatch.setattr(trainlog.time, "perf_counter", lambda: next(clock))
    progress = trainlog.Progress(4, 10, 40, 1, 256, enabled=False)
    assert progress.run_eta(0) is None
    assert progress.run_eta(10) == pytest.approx(30.0)  # the 30 steps left, not the epoch's 0


def test_lines_name_the_whole_run_s_eta(caplog: pytest.LogCaptureFixture) -> None:
    progress = trainlog.Progress(4, 10, 40, 1, 256)
    progress.tty = False
    loop = Loop(timed_tokens=256, timed_seconds=0.01)
    with caplog.at_level("INFO", logger="infinito.train"):
        for step in (1, 2):
            loop.step = step
            progress.step(loop, 4.0, 1e-3)
    assert "run eta -" in caplog.messages[0]
    assert "run eta " in caplog.messages[1] and "run eta -" not in caplog.messages[1]


@pytest.mark.parametrize(
    ("size", "expected"), [((0, 0), False), ((10, 5), False), ((80, 1), False), ((80, 24), True)]
)
def test_is_tty_needs_a_size_a_bar_fits_in(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], expected: bool
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(runtime.os, "isatty", lambda fd: True)
    monkeypatch.setattr(runtime.os, "get_terminal_size", lambda fd: os.terminal_size(size))
    assert runtime.is_tty() is expected
    monkeypatch.setenv("CI", "true")
    assert runtime.is_tty() is False
