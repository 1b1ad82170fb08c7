"""A trainer never outlives the process that launched it, and never shares its state directory.

``kill -9`` of ``dvc repro`` (or of the shell DVC runs the stage in) used to leave ``python -m
infinito.train`` running with parent 1, and the next ``dvc repro`` started a second trainer on
the same ``checkpoints/``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import TINY_TRAINER, train_cli_args, write_params

from infinito.checkpoint import load_state
from infinito.config import ConfigError

TINY = {**TINY_TRAINER, "epochs": 50, "train.log_every": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
# The launcher: starts the command it is given (as DVC does) and waits for it.
LAUNCHER = (
    "import subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:])\n"
    "print(child.pid, flush=True)\n"
    "child.wait()\n"
)


def _wait_for(log: Path, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("through_shell", [False, True], ids=["parent", "shell-then-parent"])
def test_a_trainer_saves_and_stops_when_its_launcher_is_killed(
    tokenized_data: Callable[..., Path], tmp_path: Path, through_shell: bool
) -> None:
    """``kill -9`` of the launcher: the trainer saves its state and exits; a rerun resumes.

    ``shell-then-parent`` is DVC's shape (``$SHELL -c CMD``, here a shell that does not exec
    the command): the killed process is the shell's parent, so only the watch of the chain
    notices (the trainer's own parent, the shell, lives on)."""
    params = write_params(tmp_path / "params.yaml", TINY)
    train = [
        sys.executable,
        "-m",
        "infinito.train",
        *train_cli_args(params, tokenized_data(), tmp_path),
    ]
    cmd = ["sh", "-c", shlex.join(map(str, train)) + "; true"] if through_shell else train
    log = tmp_path / "train.log"
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, *cmd],
            stdout=subprocess.PIPE,
            stderr=out,
            env=ENV,
            text=True,
        )
    assert launcher.stdout is not None
    child = psutil.Process(int(launcher.stdout.readline()))
    try:
        _wait_for(log, "step 3/")
        trainer = child.children()[0] if through_shell else child
        launcher.kill()  # kill -9: no chance to pass anything on
        launcher.wait(timeout=30)
        trainer.wait(timeout=120)  # the trainer exits by itself
    finally:
        for p in [child, *child.children(recursive=True)] if child.is_running() else []:
            p.kill()
    text = log.read_text()
    if through_shell:  # the parent-death signal covers a dead parent; the watch, the rest
        assert "the process that launched this trainer ended" in text, text
    assert "interrupted by SIGTERM" in text and "rerun the same command to resume" in text, text
    saved = load_state(tmp_path / "checkpoints" / "state.pt")
    assert saved["loop"]["step"] >= 3 and not saved["loop"]["complete"]
    resumed = subprocess.Popen(train, stderr=subprocess.PIPE, text=True, env=ENV)
    assert resumed.stderr is not None
    seen = []
    for line in resumed.stderr:
        seen.append(line)
        if "resuming from" in line or "starting a fresh run" in line:
            break
    resumed.kill()
    resumed.wait(timeout=60)
    assert "resuming from" in seen[-1], "".join(seen)


def test_the_launch_chain_climbs_over_shell_wrappers(tmp_path: Path) -> None:
    code = "import json; from infinito.supervision import launch_chain as c; print(json.dumps(c()))"
    direct = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert json.loads(direct.stdout) == [[json.loads(direct.stdout)[0][0], os.getpid()]]
    script = f"{sys.executable} -c {json.dumps(code)}; true"  # a shell that stays
    wrapped = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    (me, shell), (shell_pid, launcher) = json.loads(wrapped.stdout)
    assert shell == shell_pid and launcher == os.getpid()


def test_a_second_trainer_on_the_same_state_refuses_naming_the_pid(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    """What a second ``dvc repro`` after an orphaned trainer used to do: train beside it."""
    # runs till stopped: no early stop on this easily learnt data
    params = write_params(
        tmp_path / "params.yaml", {**TINY, "epochs": 5000, "train.patience": 5000}
    )
    data = tokenized_data()
    train = [sys.executable, "-m", "infinito.train", *train_cli_args(params, data, tmp_path)]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(train, stderr=out, env=ENV)
    try:
        _wait_for(log, "step 2/")
        second = subprocess.run(train, capture_output=True, text=True, env=ENV, timeout=150)
        assert first.poll() is None  # untouched by the refusal
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    state = tmp_path / "checkpoints"
    assert second.returncode == 2, second.stderr
    assert (
        f"another trainer (PID {first.pid}) is using the state directory {state}" in second.stderr
    )
    assert f"kill {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert "starting a fresh run" not in second.stderr  # refused before any work


def test_the_state_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    from infinito.supervision import state_lock

    state = tmp_path / "checkpoints"
    with state_lock(state):
        refused = pytest.raises(ConfigError, match=rf"another trainer \(PID {os.getpid()}\)")
        with refused, state_lock(state):
            pass
    with state_lock(state):  # released when the holder's block ends
        pass
