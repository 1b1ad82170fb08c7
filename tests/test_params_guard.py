"""Params are never misrecorded and bad params cost no outputs.

- Each stage reads its params at the start and again at the end (``config.stage_params``): a
  change in between (another ``dvc exp run -S`` rewriting params.yaml while ``dvc repro`` runs)
  fails the stage, so DVC never records in dvc.lock values the outputs were not computed with.
- The check-params stage validates the whole file before any other stage runs, so a bad value
  that only the stages reject fails before DVC has removed any output, and
  ``git checkout params.yaml && dvc checkout`` returns to the last good state.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import COMMITTED_PARAMS, REPO_ROOT, UP_TO_DATE_STATUS, command_env, write_params

from infinito import config
from infinito.config import ConfigError, load_params

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: str) -> Any:
    return importlib.import_module(shlex.split(STAGES[stage]["cmd"])[2])


# ---------------------------------------------------------------- the keys each stage watches


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_watches_the_params_dvc_yaml_gives_it(stage: str) -> None:
    """The keys a stage compares at its end are its ``params`` in dvc.yaml (one list, checked)."""
    declared = STAGES[stage].get("params")
    module = stage_module(stage)
    if declared is None:  # tokenize reads no params
        assert not hasattr(module, "PARAMS_KEYS")
        return
    if declared == [{"params.yaml": None}]:  # the whole file
        assert module.PARAMS_KEYS is None
        return
    assert list(module.PARAMS_KEYS) == declared


def test_every_stage_but_check_params_runs_after_it() -> None:
    marker = STAGES["check-params"]["outs"][0]
    assert STAGES["check-params"]["params"] == [{"params.yaml": None}]
    for name, stage in STAGES.items():
        if name != "check-params":
            assert marker in stage["deps"], name


def test_stage_params_fails_when_a_watched_key_changes(tmp_path: Path) -> None:
    from infinito.config import ParamsChanged, stage_params

    path = write_params(tmp_path / "params.yaml")
    with stage_params(path, ("lr", "model")) as params:  # an unwatched key may change
        write_params(path, {"generate.top_k": 5})
    assert params == load_params(COMMITTED_PARAMS)
    with (
        pytest.raises(ParamsChanged, match=r"seed: 42 -> 7\b.*rerun it \(dvc repro\)"),
        stage_params(path, ("seed",)),
    ):
        write_params(path, {"seed": 7})
    with (
        pytest.raises(ParamsChanged, match=r"model\.n_head: 8 -> 4"),
        stage_params(path, None),
    ):  # the whole file
        write_params(path, {"model.n_head": 4})
    with (
        pytest.raises(ParamsChanged, match=r"can no longer be read"),
        stage_params(path, ("seed",)),
    ):
        path.write_text("seed: [unclosed\n")


def test_an_error_inside_the_block_is_not_masked(tmp_path: Path) -> None:
    from infinito.config import stage_params

    path = write_params(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="the stage's own error"), stage_params(path, ("seed",)):
        write_params(path, {"seed": 7})
        raise ConfigError("the stage's own error")


# ---------------------------------------------------------------- every stage's main


class _Start:
    """What ``init.resolve`` returns, as the init stage uses it."""

    def record(self) -> dict[str, Any]:
        return {"init_from": "scratch"}

    def describe(self) -> str:
        return "scratch"


def _stage_call(stage: str) -> tuple[str, list[str], str, Any]:
    """(the stage function main calls, extra argv, a key the stage reads, what it returns)."""
    train_metrics = {"best_val_loss": 1.0, "best_val_ppl": 2.7, "best_epoch": 1.0}
    return {
        "check-params": ("resolve_source", [], "epochs", None),
        "download": ("download", ["--out", "raw"], "data.split_fractions", None),
        "init": ("resolve", ["--out", "init.json"], "train.init_from", _Start()),
        "train": (
            "train",
            [*(f"--{o} x" for o in ("data", "out", "state", "metrics", "live"))],
            "seed",
            {**train_metrics, "tokens_per_sec": 1.0},
        ),
        "evaluate": (
            "evaluate",
            ["--model", "m", "--data", "d", "--metrics", "e"],
            "evaluate.batch_size",
            {},
        ),
        "generate-samples": (
            "generate_samples",
            ["--model", "m"],
            "generate.top_k",
            {"samples": []},
        ),
        "benchmark-inference": ("run_benchmark", ["--model", "m"], "benchmark.repeats", {}),
    }[stage]


@pytest.mark.parametrize("stage", [s for s in STAGES if "params" in STAGES[s]])
def test_a_stage_fails_when_its_params_change_while_it_runs(
    stage: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What ``dvc repro & sleep 4; dvc exp run -S seed=7`` does to a running stage."""
    function, argv, key, result = _stage_call(stage)
    argv = [w for a in argv for w in a.split()]
    params = write_params(tmp_path / "params.yaml")
    module = stage_module(stage)
    value = {"epochs": 3, "data.split_fractions": [0.8, 0.1, 0.1], "seed": 7}.get(key, 2)

    def runs_while_params_change(*args: Any, **kwargs: Any) -> Any:
        write_params(params, {key: value})
        return result

    monkeypatch.setattr(module, function, runs_while_params_change)
    assert module.main(["--params", str(params), *argv]) != 0
    err = capsys.readouterr().err
    assert f"{params} changed while this stage ran ({key}: " in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- through DVC


def _digests(repo: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (directories walked), by path."""
    out = {}
    for rel in paths:
        root = repo / rel
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            out[f.relative_to(repo).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


OUTPUTS = ["models/best", "data/raw", "data/tokenized", "metrics", "samples", "dvc.lock"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=abc", r"lr='abc' must be a number"),
        ("model.n_head=7", r"model\.n_head=7 must divide model\.d_model=32"),
        ("batch_size=0", r"batch_size=0 must be a positive integer"),
        ("data.split_fractions=[0.5,0.5]", r"data\.split_fractions=\[0\.5, 0\.5\] must be three"),
    ],
)
def test_a_bad_param_costs_no_output_and_one_command_goes_back(
    pipeline_repo: Path, run_cmd: Callable[..., Any], override: str, message: str
) -> None:
    repo = pipeline_repo
    before = _digests(repo, OUTPUTS)
    assert any(k.startswith("models/best/") for k in before)
    assert any(k.startswith("data/raw/") for k in before)
    proc = run_cmd(["dvc", "exp", "run", "-S", override], repo, check=False)
    assert proc.returncode != 0, proc.stdout
    assert re.search(message, proc.stdout), proc.stdout
    assert "git checkout params.yaml && dvc checkout" in proc.stdout
    ran = [line for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'check-params':"], proc.stdout
    assert _digests(repo, OUTPUTS) == before  # models/best, metrics, data/raw untouched

    # the documented way back: the committed params and the outputs they describe
    run_cmd(["sh", "-c", "git checkout params.yaml && dvc checkout"], repo)
    status = json.loads(run_cmd(["dvc", "status", "--json"], repo).stdout)
    assert status == UP_TO_DATE_STATUS, status  # init is always changed, by design
    assert _digests(repo, OUTPUTS) == before


@pytest.mark.slow
def test_a_concurrent_exp_run_cannot_make_dvc_record_params_the_model_was_not_trained_with(
    pipeline_repo: Path, run_cmd: Callable[..., Any]
) -> None:
    """``dvc repro & sleep 4; dvc exp run -S seed=7; wait``: the second command is refused by
    DVC's lock only after it rewrote params.yaml; the running train stage must then fail instead
    of letting dvc.lock say seed 7 for a model trained with seed 42."""
    repo = pipeline_repo
    # a longer training, so the second command arrives while it runs
    # (a step of the GPT-2-vocabulary head takes 0.3 to 1 s on 2 cores)
    config.write_params(repo / "params.yaml", {"train.max_steps": 120, "train.log_every": 5})
    subprocess.run(["git", "commit", "-qam", "longer training"], cwd=repo, check=True)
    lock_before = (repo / "dvc.lock").read_text()
    env = command_env({"CI": "1"})
    log = (repo.parent / "repro.log").open("w+")
    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 600
        while "step 5/" not in (repo.parent / "repro.log").read_text():
            assert repro.poll() is None, (repo.parent / "repro.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        second = run_cmd(["dvc", "exp", "run", "-S", "seed=7"], repo, check=False)
        assert second.returncode != 0 and "lock" in second.stdout.lower(), second.stdout
        assert load_params(repo / "params.yaml").seed == 7  # what DVC did before refusing
        assert repro.wait(timeout=600) != 0
    finally:
        if repro.poll() is None:
            repro.kill()
        log.close()
    out = (repo.parent / "repro.log").read_text()
    assert "changed while this stage ran (seed: 42 -> 7)" in out, out
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["seed"] == 42
    assert lock["stages"]["train"] == yaml.safe_load(lock_before)["stages"]["train"]
    assert "train" in run_cmd(["dvc", "status"], repo).stdout  # not "up to date"


def test_check_params_writes_the_same_marker_for_any_valid_params(tmp_path: Path) -> None:
    from infinito import check_params

    out = tmp_path / "ok"
    for overrides in ({}, {"lr": 1e-3, "model.iit": False}):
        params = write_params(tmp_path / "params.yaml", overrides)
        assert check_params.main(["--params", str(params), "--out", str(out)]) == 0
        assert out.read_text() == check_params.MARKER
    params = write_params(tmp_path / "params.yaml", {"data.source": str(tmp_path / "nothing")})
    out.unlink()
    assert check_params.main(["--params", str(params), "--out", str(out)]) == 2
    assert not out.exists()


def test_check_params_names_the_way_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from infinito import check_params

    params = write_params(tmp_path / "params.yaml", {"lr": ".inf"})
    assert check_params.main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "lr=inf must be a finite number" in err
    assert f"git checkout {params} && dvc checkout" in err
    assert json.dumps(err.strip().splitlines()).count("check-params: error") == 1
