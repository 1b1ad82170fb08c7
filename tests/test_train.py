"""train stage: learning, outputs, schedules, resume (signal, kill -9), NaN, best vs last."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import conftest
import numpy as np
import pytest
import torch
import yaml
from conftest import train_cli_args, train_outputs

from infinito import trainer as trainer_mod
from infinito.batches import TrainData, stream_order
from infinito.checkpoint import load_state
from infinito.config import ConfigError, Params, apply_overrides
from infinito.evaluate import evaluate
from infinito.iit import WRITE_STATS
from infinito.model import Infinito
from infinito.runstate import Loop
from infinito.runtime import torch_threads
from infinito.scoring import Score
from infinito.train import (
    LRFactor,
    NonFiniteLoss,
    TrainingInterrupted,
    build_optimizer,
    build_schedulers,
    epoch_order,
    main,
    train,
)
from infinito.trainlog import read_series

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
TINY: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 4,
    "lr": 3e-3,
    "lambda_phi": 0.1,
    "seed": 1,
    "data": {"seq_len": 32},
    "model": {
        "vocab_size": VOCAB,
        "d_model": 32,
        "n_layer": 2,
        "n_head": 2,
        "block_size": 32,
        "memory_slots": 8,
        "phi_chunk": 8,
        "threshold_init": 1.0,  # below the PHI of these states: the memory is written
    },
    "train": {"warmup_steps": 3, "log_every": 5, "device": "cpu"},
}
# the default tokenized_data: 3000 train tokens -> 93 windows of 33 -> 23 steps of 4 per epoch
STEPS_PER_EPOCH = 23
TRAIN_KEYS = {
    "best_epoch",
    "best_step",
    "best_val_loss",
    "best_val_ppl",
    "final_val_loss",
    "final_val_ppl",
    "final_train_loss",
    "final_train_ppl",
    "tokens_per_sec",
    "wall_time_sec",
    "eval_time_sec",
    "first_step_sec",
    "n_params",
    "steps",
    "epochs_completed",
    "tokens_trained",
    "early_stopped",
    "compiled",
    "init_from",
}
IIT_KEYS = {
    "iit_phi_mean",
    "iit_phi_temporal_coherence",
    "iit_phi_integration",
    "iit_phi_complexity",
    "iit_phi_attention_diversity",
    "iit_threshold",
    "iit_delta_phi",
    "iit_aux_loss",
    "iit_memory_utilisation",
    "iit_stored_phi_mean",
    "iit_phi_weight_temporal_coherence",
    "iit_phi_weight_integration",
    "iit_phi_weight_complexity",
    "iit_phi_weight_attention_diversity",
    *(f"iit_{k}" for k in WRITE_STATS),
}
# The DVCLive series of a run: one per history column (step is their x), the step-level loss,
# and, with IIT, one per model statistic.
BASE_SERIES = {
    "epoch",
    "lr",
    "train_loss",
    "train_ppl",
    "val_loss",
    "val_ppl",
    "tokens_per_sec",
    "train_loss_step",
}
IIT_SERIES = {
    "phi_mean",
    "phi_temporal_coherence",
    "phi_integration",
    "phi_complexity",
    "phi_attention_diversity",
    "threshold",
    "delta_phi",
    "aux_loss",
    "memory_utilisation",
    *WRITE_STATS,
    "phi_weight_temporal_coherence",
    "phi_weight_integration",
    "phi_weight_complexity",
    "phi_weight_attention_diversity",
}
TIMING_KEYS = {"tokens_per_sec", "wall_time_sec", "eval_time_sec", "first_step_sec"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and far faster when other work shares the CPU."""
    with torch_threads(1):
        yield


def tiny(overrides: dict[str, Any] | None = None) -> Params:
    return Params.from_dict(apply_overrides(TINY, overrides or {}))


def write_params(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    return conftest.write_params(path, conftest.flatten(apply_overrides(TINY, overrides or {})))


def run(params: Params, data: Path, root: Path, **kwargs: Any) -> dict[str, Any]:
    return train(params, data, **train_outputs(root), **kwargs)


def history(root: Path) -> list[dict[str, float]]:
    """The run's validation rows, read back from its DVCLive series (one per history column)."""
    series = read_series(train_outputs(root)["live_dir"])
    rows: dict[int, dict[str, float]] = {step: {"step": step} for step, _ in series["val_loss"]}
    for name, points in series.items():
        if name != "train_loss_step":
            for step, value in points:
                rows[step][name] = value
    return list(rows.values())


def final_state(root: Path) -> dict[str, Any]:
    return load_state(root / "checkpoints" / "state.pt")


def signal_at_call(monkeypatch: pytest.MonkeyPatch, k: int, signum: int = signal.SIGINT) -> None:
    """Deliver ``signum`` to this process during the k-th memory write (train or validation)."""
    original = Infinito.write_memory
    calls = [0]

    def write_memory(self: Infinito, candidates: Any) -> dict[str, float]:
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signum)
        return original(self, candidates)

    monkeypatch.setattr(Infinito, "write_memory", write_memory)


def scripted_val_losses(monkeypatch: pytest.MonkeyPatch, losses: list[float]) -> None:
    """Replace the first validations' losses (the real passes still run)."""
    real = trainer_mod.score
    queue = list(losses)

    def score(*args: Any, **kwargs: Any) -> Score:
        result = real(*args, **kwargs)
        if queue:
            result.nll_sum = queue.pop(0) * result.tokens
        return result

    monkeypatch.setattr(trainer_mod, "score", score)


# ----------------------------------------------------------------------------- pieces


def test_lr_warms_up_linearly_then_follows_cosine_to_the_floor() -> None:
    f = LRFactor("cosine", warmup=10, total=110, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert LRFactor("constant", 0, 100, 0.1)(50) == 1.0


def test_plateau_schedule_lowers_lr_when_validation_stalls() -> None:
    params = tiny(
        {
            "train.schedule": "plateau",
            "train.plateau_patience": 1,
            "train.plateau_factor": 0.5,
            "train.min_lr_ratio": 0.2,
        }
    )
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, params, torch.device("cpu"))
    per_step, plateau = build_schedulers(opt, params, total_steps=100)
    assert plateau is not None
    for _ in range(3):  # warmup
        opt.step()
        per_step.step()
    lrs = []
    for val in [2.0] * 10:
        plateau.step(val)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(3e-3)
    assert lrs[2] == pytest.approx(1.5e-3)  # halved after patience 1 is exceeded
    assert lrs[-1] == pytest.approx(0.2 * 3e-3)  # never below min_lr_ratio * lr


def test_optimizer_decays_matrices_only() -> None:
    model = Infinito(tiny().model)
    opt = build_optimizer(model, tiny(), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_a_state_of_format_1_with_its_unused_counter_resumes() -> None:
    loop = Loop(epoch=2, pos=3, step=49, history=[{"step": 46}])
    saved = {**loop.to_dict(), "acc_stats_steps": 0}  # what format-1 states hold
    assert Loop.from_dict(saved) == loop
    assert Loop.from_dict(loop.to_dict()) == loop


def test_epoch_order_is_a_seeded_permutation_that_changes_every_epoch() -> None:
    a, b = epoch_order(1, 0, 50), epoch_order(1, 1, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, epoch_order(1, 0, 50))
    assert not torch.equal(a, b) and not torch.equal(a, epoch_order(2, 0, 50))


def stream_data(seq_len: int, documents: np.ndarray) -> TrainData:
    """Only what ``TrainData.resets`` reads."""
    empty = np.zeros(0, dtype=np.uint16)
    return TrainData(empty, empty, empty, 0, 0, [], [], seq_len, 3, documents, documents)


def test_stream_layout_gives_each_row_its_own_stretch_of_the_text() -> None:
    n, B, T = 10_000, 4, 32
    order = stream_order(1, 0, n, B, T).view(-1, B)  # (steps, rows)
    stretch = (n - T) // B
    assert order.shape == (stretch // T, B)
    assert torch.all(order[1:] - order[:-1] == T)  # every row continues its own text
    assert torch.all(order[0, 1:] - order[0, :-1] == stretch)  # rows start a stretch apart
    assert 0 <= order[0, 0] < T and order.max() + T + 1 <= n  # the last target is in the split
    assert torch.equal(order.flatten(), stream_order(1, 0, n, B, T))
    offsets = {int(stream_order(1, epoch, n, B, T)[0]) for epoch in range(5)}
    assert len(offsets) > 1 and all(0 <= o < T for o in offsets)  # epochs shift the stretches


def test_stream_rows_are_cleared_at_epoch_starts_and_document_starts() -> None:
    T = 32
    documents = np.array([0, 100, 130, 500], dtype=np.int64)
    data = stream_data(T, documents)
    assert data.stream
    starts = torch.tensor([96, 128, 490])  # previous windows began at 64, 96 and 458
    assert data.resets(starts, first=True).tolist() == [True, True, True]
    # (64, 96]: none; (96, 128]: 100; (458, 490]: none
    assert data.resets(starts, first=False).tolist() == [False, True, False]
    assert data.resets(torch.tensor([130, 520, 532]), first=False).tolist() == [True, True, False]
    assert replace(data, train_documents=None).resets(starts, first=True) is None


# ----------------------------------------------------------------------------- training


def test_training_lowers_validation_loss_and_writes_its_train_outputs(
    tokenized_data: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="infinito.train")
    metrics = run(tiny({"epochs": 3}), tokenized_data(), tmp_path)

    rows = history(tmp_path)
    live = train_outputs(tmp_path)["live_dir"]
    series = read_series(live)
    assert set(series) == BASE_SERIES | IIT_SERIES
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [23, 46, 69]
    assert all(set(r) == BASE_SERIES - {"train_loss_step"} | IIT_SERIES | {"step"} for r in rows)
    val = [r["val_loss"] for r in rows]
    assert val[-1] < val[0] - 0.3 and val[-1] < math.log(VOCAB) - 1.0
    # the step-level loss: the first step (about ln V at initialisation) and every log_every-th
    steps = [step for step, _ in series["train_loss_step"]]
    assert steps == [1, *range(5, 70, 5)]
    assert series["train_loss_step"][0][1] == pytest.approx(math.log(VOCAB), abs=0.5)
    summary = json.loads((live / "metrics.json").read_text())  # DVCLive's latest values
    assert summary["step"] == 69 and summary["val_loss"] == val[-1]
    logged = yaml.safe_load((live / "params.yaml").read_text())
    assert logged["lr"] == 3e-3 and logged["model"]["d_model"] == 32 and "evaluate" not in logged

    assert set(metrics) == TRAIN_KEYS | IIT_KEYS  # no mfu/peak memory on CPU
    assert json.loads((tmp_path / "metrics" / "train.json").read_text()) == metrics
    assert metrics["steps"] == 69 and metrics["epochs_completed"] == 3
    assert metrics["early_stopped"] == 0 and metrics["tokens_trained"] == 69 * 4 * 32
    assert metrics["best_val_loss"] == pytest.approx(min(val), rel=1e-5)
    assert metrics["best_val_ppl"] == pytest.approx(math.exp(metrics["best_val_loss"]))
    assert metrics["final_train_loss"] < math.log(VOCAB) - 1.0
    assert metrics["n_params"] == Infinito(tiny().model).num_params()
    assert metrics["tokens_per_sec"] > 0 and metrics["wall_time_sec"] > 0

    best = Infinito.from_checkpoint(tmp_path / "models" / "best")
    kept = Infinito.from_checkpoint(tmp_path / "checkpoints" / "best")
    for (name, a), b in zip(best.state_dict().items(), kept.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.csv"))
    assert final_state(tmp_path)["loop"]["complete"] is True

    text = caplog.text
    assert "parameters:" in text and "token_embedding" in text
    assert "step 5/69" in text and "tok/s" in text and "eta" in text


@pytest.mark.parametrize("scope", ["shared", "stream"])
def test_validation_in_training_equals_the_evaluate_stage(
    tokenized_data: Callable[..., Path], tmp_path: Path, scope: str
) -> None:
    data = tokenized_data()
    metrics = run(tiny({"model.memory_scope": scope}), data, tmp_path)
    assert metrics["best_step"] == metrics["steps"]  # the best is the last: compare directly
    params = tiny(
        {"evaluate.batch_size": 4, "evaluate.splits": ["validation"], "model.memory_scope": scope}
    )
    ev = evaluate(params, tmp_path / "models" / "best", data, tmp_path / "eval.json")
    assert ev["validation_loss"] == pytest.approx(metrics["best_val_loss"], rel=1e-9)


@pytest.mark.parametrize("scope", ["shared", "stream"])
def test_resume_after_interruption_ends_with_the_same_weights(
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scope: str,
) -> None:
    data = tokenized_data()
    # dropout, noise, memory writes (and clears), mid-epoch validations: all that could diverge
    params = tiny({"train.eval_every_steps": 5, "model.memory_scope": scope})
    ref = run(params, data, tmp_path / "ref")

    signal_at_call(monkeypatch, 17)
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 1[0-9]"):
        run(params, data, tmp_path / "cut")
    saved = final_state(tmp_path / "cut")
    assert 10 <= saved["loop"]["step"] < 46 and not saved["loop"]["complete"]
    assert not (tmp_path / "cut" / "models").exists()  # outputs only once finished
    monkeypatch.undo()
    resumed = run(params, data, tmp_path / "cut")

    a, b = final_state(tmp_path / "ref"), final_state(tmp_path / "cut")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for i, st in a["optimizer"]["state"].items():
        for key, tensor in st.items():
            assert torch.equal(tensor, b["optimizer"]["state"][i][key]), (i, key)
    assert (tmp_path / "ref/models/best/model.safetensors").read_bytes() == (
        tmp_path / "cut/models/best/model.safetensors"
    ).read_bytes()
    drop = TIMING_KEYS
    assert {k: v for k, v in ref.items() if k not in drop} == {
        k: v for k, v in resumed.items() if k not in drop
    }
    ha, hb = history(tmp_path / "ref"), history(tmp_path / "cut")
    assert len(ha) == 2 + 46 // 5  # epoch ends plus mid-epoch validations
    for ra, rb in zip(ha, hb, strict=True):
        assert {k: v for k, v in ra.items() if k != "tokens_per_sec"} == {
            k: v for k, v in rb.items() if k != "tokens_per_sec"
        }
    sa, sb = (read_series(train_outputs(tmp_path / n)["live_dir"]) for n in ("ref", "cut"))
    assert sa["train_loss_step"] == sb["train_loss_step"]  # each step once, the same values


def test_sigterm_at_an_epoch_end_saves_and_resumes(
    tokenized_data: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tokenized_data()
    ref = run(tiny(), data, tmp_path / "ref")
    signal_at_call(monkeypatch, STEPS_PER_EPOCH, signal.SIGTERM)  # the epoch's last step
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 23") as info:
        run(tiny(), data, tmp_path / "cut")
    assert info.value.signum == signal.SIGTERM
    monkeypatch.undo()
    resumed = run(tiny(), data, tmp_path / "cut")
    assert resumed["best_val_loss"] == ref["best_val_loss"]
    assert resumed["final_train_loss"] == ref["final_train_loss"]


def test_sigint_from_outside_saves_state_and_exits_130(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    data = tokenized_data()
    params = write_params(tmp_path / "params.yaml", {"epochs": 20, "train.log_every": 1})
    cmd = [sys.executable, "-m", "infinito.train", *train_cli_args(params, data, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "step 3/" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(seen) + rest
    assert "interrupted by SIGINT" in rest and "rerun the same command to resume" in rest
    saved = final_state(tmp_path)
    assert 3 <= saved["loop"]["step"] < 20 * STEPS_PER_EPOCH

    again = subprocess.run(
        [*cmd, "--max-steps", "30"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    # max_steps shapes the schedule, so this is another run: refused, saying what differs
    assert again.returncode == 2 and "max_steps: None -> 30" in again.stderr


def kill_9_at_step_40(cmd: list[str], env: dict[str, str]) -> None:
    """Run the train command ``cmd`` and SIGKILL it once its progress line reaches step 40."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "step 40/" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_loses_at_most_the_unsaved_steps(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    data = tokenized_data()
    overrides = {"epochs": 6, "train.log_every": 1}
    ref = run(tiny(overrides), data, tmp_path / "ref")
    params = write_params(tmp_path / "params.yaml", overrides)
    cmd = [
        sys.executable,
        "-m",
        "infinito.train",
        *train_cli_args(params, data, tmp_path / "cut"),
        "--save-every-sec",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    kill_9_at_step_40(cmd, env)
    saved = final_state(tmp_path / "cut")  # whole, whatever instant the kill hit
    assert 30 <= saved["loop"]["step"] < 6 * STEPS_PER_EPOCH
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    a, b = final_state(tmp_path / "ref"), final_state(tmp_path / "cut")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    got = json.loads((tmp_path / "cut" / "metrics" / "train.json").read_text())
    assert got["best_val_loss"] == ref["best_val_loss"]
    assert not list((tmp_path / "cut" / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_kill_9_keeps_one_continuous_dvclive_history(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    """DVCLive's files may run ahead of the last saved state when a run is killed; the resumed
    run rewrites them from the state, so every series equals the uninterrupted run's: no step
    twice (the ones logged after the save), none lost."""
    data = tokenized_data()
    overrides = {"epochs": 3, "train.log_every": 1, "train.eval_every_steps": 5}
    run(tiny(overrides), data, tmp_path / "ref")
    params = write_params(tmp_path / "params.yaml", overrides)
    # saves only at epoch ends (step 23, 46): the kill lands well after the last one
    cmd = [
        sys.executable,
        "-m",
        "infinito.train",
        *train_cli_args(params, data, tmp_path / "cut"),
        "--save-every-sec",
        "1e9",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    kill_9_at_step_40(cmd, env)
    saved_step = final_state(tmp_path / "cut")["loop"]["step"]
    live = train_outputs(tmp_path / "cut")["live_dir"]
    before = read_series(live)
    assert saved_step == 23
    assert max(step for step, _ in before["val_loss"]) >= 35  # logged after the saved state
    assert max(step for step, _ in before["train_loss_step"]) >= 40

    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    ref, cut = read_series(train_outputs(tmp_path / "ref")["live_dir"]), read_series(live)
    assert set(ref) == set(cut)
    for name in ref:
        steps = [step for step, _ in cut[name]]
        assert steps == sorted(set(steps)), name  # each step once, in order
        if name != "tokens_per_sec":  # a time measurement
            assert cut[name] == ref[name], name
    assert [s for s, _ in cut["val_loss"]] == sorted({*range(5, 70, 5), 23, 46, 69})
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 69


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_state(
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = conftest.nan_loss_at(monkeypatch, 30)
    params = write_params(tmp_path / "params.yaml")
    code = main([*train_cli_args(params, tokenized_data(), tmp_path), "--save-every-sec", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 30 (epoch 2, batch 7)" in err
    saved = final_state(tmp_path)
    assert saved["loop"]["step"] == 29  # the last good step; the bad one was never applied
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    assert not (tmp_path / "metrics" / "train.json").exists()

    with pytest.raises(NonFiniteLoss, match="step 30"):  # the pure function raises
        calls[0] = 0
        run(tiny(), tokenized_data(name="again"), tmp_path / "again")


def test_best_and_last_are_kept_apart(
    tokenized_data: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_val_losses(monkeypatch, [3.0, 2.0, 2.5])
    saved: list[dict[str, torch.Tensor]] = []
    original_save = Infinito.save

    def save(self: Infinito, path: Any) -> None:
        saved.append({k: v.clone() for k, v in self.state_dict().items()})
        original_save(self, path)

    monkeypatch.setattr(Infinito, "save", save)
    metrics = run(tiny({"epochs": 3}), tokenized_data(), tmp_path)
    assert metrics["best_epoch"] == 2 and metrics["best_val_loss"] == 2.0
    assert metrics["final_val_loss"] == 2.5 and metrics["best_step"] == 46
    assert len(saved) == 2  # epochs 1 and 2 improved; epoch 3 did not
    best = Infinito.from_checkpoint(tmp_path / "models" / "best").state_dict()
    last = final_state(tmp_path)["model"]
    assert all(torch.equal(best[k], saved[1][k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_early_stopping_counts_epochs_without_a_min_delta_drop(
    tokenized_data: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_val_losses(monkeypatch, [3.0, 2.9995, 2.9999, 1.0, 1.0])
    params = tiny({"epochs": 5, "train.patience": 2, "train.min_delta": 0.001})
    metrics = run(params, tokenized_data(), tmp_path)
    assert metrics["early_stopped"] == 1
    assert metrics["epochs_completed"] == 3 and len(history(tmp_path)) == 3
    assert metrics["best_epoch"] == 2  # 2.9995 is lower, though not by min_delta


def test_changed_params_refuse_to_resume_unless_told_to_discard(
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = tokenized_data()
    signal_at_call(monkeypatch, 5)
    with pytest.raises(TrainingInterrupted):
        run(tiny(), data, tmp_path)
    monkeypatch.undo()
    changed = tiny({"lr": 1e-3, "model.dropout": 0.0})
    with pytest.raises(ConfigError, match=r"lr: 0\.003 -> 0\.001.*model\.dropout: 0\.1 -> 0\.0"):
        run(changed, data, tmp_path)
    with pytest.raises(ConfigError, match="delete .*checkpoints"):
        run(changed, data, tmp_path)
    caplog.set_level(logging.INFO, logger="infinito.train")
    metrics = run(changed, data, tmp_path, stale_state="discard")
    assert "discarding" in caplog.text
    assert metrics["steps"] == 46 and len(history(tmp_path)) == 2
    assert final_state(tmp_path)["fingerprint_inputs"]["lr"] == 1e-3


def test_resume_ignores_hardware_and_display_keys(
    tokenized_data: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tokenized_data()
    signal_at_call(monkeypatch, 5)
    with pytest.raises(TrainingInterrupted):
        run(tiny(), data, tmp_path)
    monkeypatch.undo()
    metrics = run(tiny({"train.log_every": 7, "train.compile": False}), data, tmp_path)
    assert metrics["steps"] == 46


def test_finished_run_is_not_retrained(
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = tokenized_data()
    first = run(tiny({"epochs": 1}), data, tmp_path)
    for path in train_outputs(tmp_path).values():
        if path.is_file():
            path.unlink()
    (tmp_path / "models" / "best" / "model.safetensors").unlink()  # as `dvc repro` removes outs

    def no_training(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Infinito, "forward", no_training)
    caplog.set_level(logging.INFO, logger="infinito.train")
    again = run(tiny({"epochs": 1}), data, tmp_path)
    assert "already complete" in caplog.text
    assert again == first
    assert (tmp_path / "models" / "best" / "model.safetensors").is_file()
    assert len(history(tmp_path)) == 1


def test_lambda_zero_is_exactly_cross_entropy_and_the_ablation_has_no_iit_numbers(
    tokenized_data: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tokenized_data()
    one = {"epochs": 1, "lambda_phi": 0.0}
    run(tiny(one), data, tmp_path / "zero")
    run(tiny({**one, "lambda_phi": 0.5}), data, tmp_path / "half")
    original = Infinito.forward

    def nan_aux(self: Infinito, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        out = original(self, idx, targets)
        return out._replace(aux_loss=out.aux_loss * float("nan"))

    monkeypatch.setattr(Infinito, "forward", nan_aux)
    run(tiny(one), data, tmp_path / "nan")  # lambda 0 leaves even a NaN aux term out
    monkeypatch.undo()
    zero, nan, half = (final_state(tmp_path / n)["model"] for n in ("zero", "nan", "half"))
    assert all(torch.equal(zero[k], nan[k]) for k in zero)
    assert not all(torch.equal(zero[k], half[k]) for k in zero)

    metrics = run(tiny({"epochs": 1, "model.iit": False}), data, tmp_path / "ablation")
    assert set(metrics) == TRAIN_KEYS
    # no PHI, no memory: those series are absent (not zero, not empty) from DVCLive's record
    live = train_outputs(tmp_path / "ablation")["live_dir"]
    assert set(read_series(live)) == BASE_SERIES
    assert set(json.loads((live / "metrics.json").read_text())) == BASE_SERIES | {"step"}


@pytest.mark.parametrize(
    "overrides,data_kwargs,message",
    [
        ({"batch_size": 100}, {}, "holds 93 windows .* fewer than batch_size=100"),
        ({}, {"vocab_size": 128}, "model.vocab_size=64 is smaller than .* vocab_size=128"),
        ({"train.nproc_per_node": 2}, {}, "train.nproc_per_node=2"),
        ({}, {"lengths": {"train": 3000, "test": 10}}, "validation.bin not found"),
    ],
)
def test_bad_input_fails_before_any_work(
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    overrides: dict[str, Any],
    data_kwargs: dict[str, Any],
    message: str,
) -> None:
    data = tokenized_data(**data_kwargs)
    with pytest.raises(ConfigError, match=message):
        run(tiny(overrides), data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_data_is_an_error_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="meta.json not found.*dvc repro tokenize"):
        run(tiny(), tmp_path / "nowhere", tmp_path / "run")


def test_cli_overrides_apply_on_top_of_params(
    tokenized_data: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = write_params(tmp_path / "params.yaml", {"train.device": "auto"})
    argv = [
        *train_cli_args(params, tokenized_data(), tmp_path),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--lambda-phi",
        "0",
        "--seed",
        "3",
        "--max-steps",
        "5",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert "best val loss" in capsys.readouterr().out
    used = final_state(tmp_path)["fingerprint_inputs"]
    assert (used["epochs"], used["batch_size"], used["lr"], used["lambda_phi"], used["seed"]) == (
        1,
        2,
        1e-3,
        0.0,
        3,
    )
    assert used["train"]["max_steps"] == 5
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 5 and metrics["epochs_completed"] == pytest.approx(5 / 46, abs=1e-4)
    assert len(history(tmp_path)) == 1  # validated where max_steps stopped it


def test_progress_lines_are_concise_without_a_terminal(
    tokenized_data: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="infinito.train")
    run(tiny({"epochs": 1, "train.log_every": 10}), tokenized_data(), tmp_path)
    lines = [r.getMessage() for r in caplog.records if "tok/s" in r.getMessage()]
    assert [line.split()[3] for line in lines] == ["10/23", "20/23"]
    assert all(len(line) < 120 for line in lines)
