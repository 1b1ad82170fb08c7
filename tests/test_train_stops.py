"""How a training run stops: what a NaN stop names, a damaged state, a second Ctrl-C, leftovers.

- The NaN stop names what really exists (the last saved state and its step, or that none was
  saved yet), never a state file that is not there.
- A garbage or pickled ``state.pt`` is refused without passing on torch's advice to load with
  ``weights_only=False`` (which would run the code a pickled file holds).
- A second SIGINT/SIGTERM exits at once and cleanly (130/143, one line, no traceback), without
  waiting for the save in flight, whose temporary file goes.
- Temporaries a killed run left (``.state.pt.*.tmp``, an output directory's ``.NAME.*.tmp``) go
  at the next start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_TRAINER, nan_loss_at, train_cli_args, write_params

from infinito import atomic, train

TINY = TINY_TRAINER


def test_a_nan_before_any_save_says_no_state_was_saved(
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nan_loss_at(monkeypatch, 3)
    params = write_params(tmp_path / "params.yaml", TINY)
    assert train.main(train_cli_args(params, tokenized_data(), tmp_path)) == 1
    err = capsys.readouterr().err
    state = tmp_path / "checkpoints" / "state.pt"
    assert "non-finite loss at step 3" in err
    assert not state.exists()
    assert "no state was saved yet, so rerunning starts from scratch" in err
    assert str(state) not in err  # never a file that is not there


def test_a_nan_after_a_save_names_the_saved_state_and_its_step(
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nan_loss_at(monkeypatch, 30)  # 23 steps per epoch: the epoch-end save at step 23 came first
    params = write_params(tmp_path / "params.yaml", TINY)
    argv = [*train_cli_args(params, tokenized_data(), tmp_path), "--save-every-sec", "1000"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    state = tmp_path / "checkpoints" / "state.pt"
    assert f"the last saved state is {state} (step 23)" in err
    assert f"the best model so far is in {tmp_path / 'checkpoints' / 'best'}" in err


class Pickled:
    """Not a tensor nor a plain value: loading it needs pickle's code execution."""


@pytest.mark.parametrize("kind", ["garbage", "pickled"])
def test_a_damaged_state_is_refused_without_torch_s_weights_only_advice(
    kind: str,
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "checkpoints" / "state.pt"
    state.parent.mkdir(parents=True)
    if kind == "garbage":
        state.write_bytes(os.urandom(5000))
    else:
        torch.save({"format": 1, "x": Pickled()}, state)
    params = write_params(tmp_path / "params.yaml", TINY)
    assert train.main(train_cli_args(params, tokenized_data(), tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"cannot read the training state {state}" in err
    assert f"delete {state.parent} to start training from scratch" in err
    assert "weights_only" not in err and "trusted source" not in err
    assert len(err.strip().splitlines()) == 1
    if kind == "pickled":
        assert "could run code" in err


def test_a_second_signal_exits_at_once_and_removes_the_save_in_flight(
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C, then Ctrl-C again while the first one's save is being written (a 78 MB state on
    a slow disk): exit 130 at once, one line, and no temporary file left behind."""
    slow_save_started = threading.Event()
    real_save = torch.save

    def slow_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        slow_save_started.set()
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, during the save
        time.sleep(30)  # the rest of a long write

    steps = [0]
    real_step = train.Trainer.run_step

    def run_step(self: Any, stop: list[int]) -> None:
        real_step(self, stop)
        steps[0] += 1
        if steps[0] == 3:
            monkeypatch.setattr("infinito.checkpoint.torch.save", slow_save)
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C

    monkeypatch.setattr(train.Trainer, "run_step", run_step)
    params = write_params(tmp_path / "params.yaml", TINY)
    argv = [*train_cli_args(params, tokenized_data(), tmp_path), "--save-every-sec", "1000"]
    started = time.monotonic()
    try:
        code = train.main(argv)
    except KeyboardInterrupt:
        pytest.fail("the second signal escaped as a KeyboardInterrupt (a traceback)")
    assert time.monotonic() - started < 25  # not after the 30 s write
    assert slow_save_started.is_set()
    assert code == 130
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("train: aborted by a second SIGINT: stopped at once"), err
    assert "Traceback" not in err
    left = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert left == []


def test_temporaries_of_a_killed_run_go_at_the_next_start(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    out = tmp_path / "tokenized"
    stale_dir = tmp_path / f".tokenized.{dead_pid}.abc123.tmp"
    stale_dir.mkdir()
    (stale_dir / "train.bin").write_bytes(b"\0" * 100)
    old_style = tmp_path / ".tokenized.xyz789.tmp"  # a name from before names carried a PID
    old_style.write_bytes(b"\0")
    live = tmp_path / f".tokenized.{os.getppid()}.def456.tmp"  # a writer still running
    live.mkdir()
    with atomic.atomic_dir(out) as d:
        (d / "meta.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tokenized", live.name])


def test_a_trainer_removes_a_killed_save_s_temporary_at_start(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    state_dir = tmp_path / "checkpoints"
    state_dir.mkdir()
    (state_dir / ".state.pt.12345.abcdef.tmp").write_bytes(b"\0" * 1000)  # kill -9 mid-save
    (state_dir / ".best.12345.abcdef.tmp").mkdir()
    params = write_params(tmp_path / "params.yaml", {**TINY, "train.max_steps": 2})
    assert train.main(train_cli_args(params, tokenized_data(), tmp_path)) == 0
    assert sorted(p.name for p in state_dir.iterdir()) == [".lock", "best", "state.pt"]
