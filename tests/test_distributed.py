"""Training on several processes: shards, gathered memory writes, and 2 CPU ranks (gloo) against 1.

The end-to-end tests run ``python -m infinito.train`` with ``train.nproc_per_node: 2``: it
re-executes itself under torchrun, which starts two gloo processes on the CPU. Their result is
compared with one process training the same global batch. Dropout is 0 and the exploration noise
is off, so nothing random differs between the two: what remains is floating-point summation
order (each process sums its shard's gradient, then DDP averages), which stays within the
tolerances below.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import (
    command_env,
    flatten,
    markov_tokens,
    train_cli_args,
    train_outputs,
    write_params,
    write_tokenized,
)

from infinito import distributed
from infinito.batches import epoch_order, step_layout
from infinito.checkpoint import load_state
from infinito.config import ConfigError, ModelConfig, Params, apply_overrides
from infinito.iit import MemoryCandidates
from infinito.model import Infinito
from infinito.runtime import torch_threads
from infinito.train import TrainingInterrupted, train
from infinito.trainlog import read_series

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 5,  # odd: two processes hold 3 and 2 windows of each global batch
    "lr": 3e-3,
    "lambda_phi": 0.1,
    "seed": 1,
    "data": {"seq_len": 32},
    "model": {
        "vocab_size": 64,
        "d_model": 32,
        "n_layer": 2,
        "n_head": 2,
        "block_size": 32,
        "memory_slots": 8,
        "phi_chunk": 8,
        "threshold_init": 1.0,  # below the PHI of these states: the memory is written
        "dropout": 0.0,  # nothing random, so one process and two compute the same thing
        "noise": False,
    },
    "train": {"warmup_steps": 3, "log_every": 1, "device": "cpu"},
}
# 3000 train tokens -> 93 windows of 33 -> 18 global batches of 5 per epoch
STEPS = 36
# Measured on 2 CPU cores, 36 steps: max |weight difference| 2 processes vs 1 below 1e-5 (2.6e-5
# for 3 micro-batches in 1 process) while training moves weights by up to 0.06; validation losses
# agree to 6e-8 relative; Adam's moments to 1.2e-4 of each tensor's largest value.
WEIGHT_ATOL = 2e-4
LOSS_RTOL = 1e-5
MOMENT_RTOL = 2e-3


def params(overrides: dict[str, Any] | None = None) -> Params:
    return Params.from_dict(apply_overrides(BASE, overrides or {}))


def cli(root: Path, data: Path, overrides: dict[str, Any]) -> list[str]:
    """``python -m infinito.train`` for ``root`` with BASE + ``overrides`` in root/params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(root / "params.yaml", flatten(apply_overrides(BASE, overrides)))
    return [
        sys.executable,
        "-m",
        "infinito.train",
        *train_cli_args(root / "params.yaml", data, root),
    ]


# torchrun's processes: one thread each on 2 shared cores, no terminal, never a user's setup.
ENV = command_env({"OMP_NUM_THREADS": "1", "CI": "1", "WORLD_SIZE": None, "RANK": None})


def final_state(root: Path) -> dict[str, Any]:
    return load_state(root / "checkpoints" / "state.pt")


def compare(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Max |difference| of the float tensors; integer/bool tensors (memory slots) must be equal.

    Also checks Adam's moments, which scale with the gradient: AdamW's steps hardly change when
    every gradient is scaled alike, its moments do, so a wrongly scaled loss shows here.
    """
    worst = 0.0
    assert a["model"].keys() == b["model"].keys()
    for name, t in a["model"].items():
        u = b["model"][name]
        if t.is_floating_point():
            worst = max(worst, (t - u).abs().max().item())
        else:
            assert torch.equal(t, u), name
    for i, moments in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            t, u = moments[key], b["optimizer"]["state"][i][key]
            rel = ((t - u).abs().max() / t.abs().max().clamp_min(1e-30)).item()
            assert rel <= MOMENT_RTOL, f"parameter {i} {key} differs by {rel:.3g} of its max"
    ha, hb = a["loop"]["history"], b["loop"]["history"]
    assert [r["step"] for r in ha] == [r["step"] for r in hb]
    for ra, rb in zip(ha, hb, strict=True):
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=LOSS_RTOL)
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=LOSS_RTOL)
        assert rb["phi_mean"] == pytest.approx(ra["phi_mean"], rel=LOSS_RTOL)
    return worst


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lengths = {"train": 3000, "validation": 600, "test": 400}
    splits = {s: markov_tokens(n, 64, seed) for seed, (s, n) in enumerate(lengths.items(), 1)}
    return write_tokenized(tmp_path_factory.mktemp("dist") / "tokenized", splits, 64)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process, the whole global batch per forward pass: the state it ends with."""
    root = tmp_path_factory.mktemp("reference")
    with torch_threads(1):
        metrics = train(params(), data, **train_outputs(root))
    assert metrics["steps"] == STEPS
    return final_state(root)


# ----------------------------------------------------------------------------- shards


def test_each_process_takes_a_contiguous_shard_of_every_global_batch() -> None:
    order = epoch_order(7, 0, 100)
    for batch_size, world, micro in [(16, 1, None), (16, 4, None), (10, 3, None), (10, 3, 2)]:
        layouts = [step_layout(batch_size, world, r, micro) for r in range(world)]
        assert len({len(lay.parts) for lay in layouts}) == 1  # the same number of backward passes
        for step in range(3):
            batch = order[step * batch_size : (step + 1) * batch_size]
            seen = [batch[lo:hi] for lay in layouts for lo, hi in lay.parts]
            assert torch.equal(torch.cat(seen), batch)  # every window once, in order
        sizes = [sum(hi - lo for lo, hi in lay.parts) for lay in layouts]
        assert max(sizes) - min(sizes) <= 1
        shares = [s for lay in layouts for s in lay.shares]
        assert sum(shares) == pytest.approx(1.0)
        if micro is not None:
            assert all(hi - lo <= micro for lay in layouts for lo, hi in lay.parts)
    assert step_layout(16, 1, 0, None).loss_scales == (1.0,)  # one process: the loss untouched
    three = step_layout(10, 3, 0, 2)
    assert three.parts == ((0, 2), (2, 4)) and three.loss_scales == pytest.approx((0.6, 0.6))
    assert step_layout(10, 3, 2, 2).parts == ((7, 9), (9, 10))


def test_impossible_splits_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="batch_size=2 is smaller than the 4 training processes"):
        step_layout(2, 4, 0, None)
    with pytest.raises(ConfigError, match=r"needs 3 micro-batches per process, more than the 2"):
        step_layout(5, 2, 1, 1)


def test_torchrun_command_runs_this_module_standalone() -> None:
    cmd = distributed.torchrun_command(4, "infinito.train", ["--params", "p.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd
    assert cmd[-4:] == ["-m", "infinito.train", "--params", "p.yaml"]


# ----------------------------------------------------------------------------- gathered memory


def _gather_worker(rank: int, world: int, init_file: str) -> None:
    """Each rank offers different candidates; every rank must write the same memory."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        d = distributed.Dist(rank, world, rank, torch.device("cpu"))
        windows = {0: [2, 1], 1: [1, 1]}  # uneven shards, two micro-batches each
        chunks, dim, slots = 4, 32, 8

        def part(r: int, k: int) -> tuple[MemoryCandidates, int]:
            n = windows[r][k]
            g = torch.Generator().manual_seed(100 * r + k)
            return (
                MemoryCandidates(
                    keys=torch.randn(1, n * chunks, dim, generator=g),
                    values=torch.randn(1, n * chunks, dim, generator=g),
                    phi=torch.rand(1, n * chunks, generator=g) * 10,
                    slot_mass=torch.rand(1, slots, generator=g),
                ),
                n,
            )

        got = distributed.gather_candidates([part(rank, 0), part(rank, 1)], d)
        assert got is not None and got.rows is None  # the shared memory: one group
        every = [part(r, k) for r in range(world) for k in range(2)]  # the global batch's order
        assert torch.equal(got.keys, torch.cat([c.keys for c, _ in every], dim=1))
        assert torch.equal(got.values, torch.cat([c.values for c, _ in every], dim=1))
        assert torch.equal(got.phi, torch.cat([c.phi for c, _ in every], dim=1))
        mass = sum(c.slot_mass * n for c, n in every) / sum(n for _, n in every)
        assert got.slot_mass is not None
        torch.testing.assert_close(got.slot_mass, mass, rtol=1e-6, atol=1e-7)

        # stream memories: every row's group, in global row order, with its own slot mass
        first = {0: 0, 1: 3}[rank]  # rank 0 holds rows 0..2, rank 1 rows 3..4

        def rows_part(r: int, k: int) -> tuple[MemoryCandidates, int]:
            lo = {0: 0, 1: 3}[r] + sum(windows[r][:k])
            c, n = part(r, k)
            g = torch.Generator().manual_seed(7 + 10 * r + k)
            return (
                MemoryCandidates(
                    keys=torch.randn(n, chunks, dim, generator=g),
                    values=torch.randn(n, chunks, dim, generator=g),
                    phi=torch.rand(n, chunks, generator=g) * 10,
                    slot_mass=torch.rand(n, slots, generator=g),
                    rows=torch.arange(lo, lo + n),
                ),
                n,
            )

        assert first == sum(windows[0]) * rank
        streams = distributed.gather_candidates([rows_part(rank, 0), rows_part(rank, 1)], d)
        assert streams is not None and streams.rows.tolist() == [0, 1, 2, 3, 4]
        every = [rows_part(r, k) for r in range(world) for k in range(2)]
        for name in ("keys", "values", "phi", "slot_mass"):
            want = torch.cat([getattr(c, name) for c, _ in every])
            assert torch.equal(getattr(streams, name), want), name

        torch.manual_seed(0)
        model = Infinito(
            ModelConfig(vocab_size=64, d_model=dim, n_layer=2, n_head=2, memory_slots=slots)
        )
        model.write_memory(got)
        assert model.memory_stats()["memory_utilisation"] > 0
        assert distributed.replicas_differ(model, d) == []
        if rank == 1:  # a replica that differs is named
            with torch.no_grad():
                model.memory.keys = model.memory.keys + 1.0  # type: ignore[union-attr]
        assert distributed.replicas_differ(model, d) == ["memory.keys"]
    finally:
        dist.destroy_process_group()


def test_memory_candidates_of_all_processes_are_gathered_in_global_batch_order(
    tmp_path: Path,
) -> None:
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "pg")), nprocs=2)


# ----------------------------------------------------------------------------- 2 ranks vs 1


def test_gradient_accumulation_in_one_process_matches_the_whole_batch(
    data: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    train(params({"train.micro_batch_size": 2}), data, **train_outputs(tmp_path))  # 5 = 2 + 2 + 1
    assert compare(reference, final_state(tmp_path)) < WEIGHT_ATOL


def test_two_processes_resume_a_one_process_run_and_match_it(
    data: Path, reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 process until step 10, SIGINT; then 2 processes with micro-batches (3 = 2 + 1 and
    2 = 1 + 1 windows) finish the run: the same as 1 process all along."""
    original = Infinito.write_memory
    calls = [0]

    def write_memory(self: Infinito, candidates: Any) -> dict[str, float]:
        calls[0] += 1
        if calls[0] == 10:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, candidates)

    monkeypatch.setattr(Infinito, "write_memory", write_memory)
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 10"):
        train(params(), data, **train_outputs(tmp_path))
    monkeypatch.undo()

    cmd = cli(tmp_path, data, {"train.nproc_per_node": 2, "train.micro_batch_size": 2})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "launching 2 processes with torchrun" in log
    assert log.count("resuming from") == 1 and log.count("best val loss") == 1  # rank 0 reports
    state = final_state(tmp_path)
    assert state["loop"]["complete"] and state["loop"]["step"] == STEPS
    assert state["loop"]["tokens_trained"] == STEPS * 5 * 32
    assert compare(reference, state) < WEIGHT_ATOL
    assert (tmp_path / "models" / "best" / "model.safetensors").is_file()
    # rank 0 alone logs with DVCLive, from the resumed state on: each step once, none lost
    series = read_series(train_outputs(tmp_path)["live_dir"])
    for name, points in series.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), name
    assert [s for s, _ in series["val_loss"]] == [r["step"] for r in reference["loop"]["history"]]
    want = [r["step"] for r in reference["loop"]["step_log"]]
    assert [s for s, _ in series["train_loss_step"]] == want


def test_sigint_to_torchrun_saves_a_state_that_one_process_resumes(
    data: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    """2 processes from scratch, Ctrl-C (to torchrun, which forwards it to both): rank 0 saves
    at a step both agree on; 1 process finishes the run: the same as 1 process all along."""
    cmd = cli(tmp_path, data, {"train.nproc_per_node": 2})
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "step 3/" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) != 0, "".join(seen) + rest
    assert rest.count("train: interrupted by SIGINT at step") == 1, "".join(seen) + rest
    saved = final_state(tmp_path)
    assert 3 <= saved["loop"]["step"] < STEPS and not saved["loop"]["complete"]

    train(params(), data, **train_outputs(tmp_path))
    state = final_state(tmp_path)
    assert state["loop"]["complete"] and state["loop"]["step"] == STEPS
    assert compare(reference, state) < WEIGHT_ATOL


def test_two_processes_with_stream_memories_match_one_process(data: Path, tmp_path: Path) -> None:
    """Stream memories: each process reads its rows' memories, every process writes every row's
    (gathered), so the memory is the same everywhere and the run equals one process's."""
    stream = {"model.memory_scope": "stream"}
    with torch_threads(1):
        train(params(stream), data, **train_outputs(tmp_path / "one"))
    one = final_state(tmp_path / "one")
    assert one["model"]["memory.keys"].shape[0] == 5  # a memory per batch row
    assert one["loop"]["step"] == STEPS and one["model"]["memory.valid"].any()
    cmd = cli(
        tmp_path / "two", data, {**stream, "train.nproc_per_node": 2, "train.micro_batch_size": 2}
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert compare(one, final_state(tmp_path / "two")) < WEIGHT_ATOL
