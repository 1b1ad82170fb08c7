"""docs/experiments.md's workflow, verbatim, in a temporary repository with a tiny config.

``dvc repro``; ``dvc exp run -S lr=...`` re-running train and what follows it but not download or
tokenize; ``dvc metrics diff`` and ``dvc plots diff`` showing the change; a ``--queue`` sweep run
by ``dvc queue start``; and ``infinito report`` over the result.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import ALWAYS_CHANGED, UP_TO_DATE_STATUS, copy_repo

from infinito.config import load_params

pytestmark = pytest.mark.slow

DOWNSTREAM_OF_TRAIN = ["train", "evaluate", "generate-samples", "benchmark-inference"]
CHECK = "check-params"  # reads every key, so any params change re-runs it (its output does not)
QUEUE_TIMEOUT_S = 600
SECONDS: dict[str, float] = {}  # wall time of the module's experiment runs, by name


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(reproduced_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repo(reproduced_repo, tmp_path_factory.mktemp("experiments") / "repo")


@pytest.fixture(scope="module")
def lr_run(repo: Path, run_cmd: Callable) -> str:
    """``dvc exp run -n lr-1e-3 -S lr=1e-3``, once for the module; its output."""
    started = time.monotonic()
    out = run_cmd(["dvc", "exp", "run", "-n", "lr-1e-3", "-S", "lr=1e-3"], repo).stdout
    SECONDS["lr-1e-3"] = time.monotonic() - started
    return out


def test_repro_of_the_committed_baseline_is_up_to_date(repo: Path, run_cmd: Callable) -> None:
    out = run_cmd(["dvc", "repro"], repo).stdout
    assert ran_stages(out) == list(ALWAYS_CHANGED)  # init re-checks the start, nothing follows
    assert "Stage 'train' didn't change, skipping" in out
    assert json.loads(run_cmd(["dvc", "status", "--json"], repo).stdout) == UP_TO_DATE_STATUS


def test_exp_run_lr_reruns_train_and_downstream_only(repo: Path, lr_run: str) -> None:
    assert ran_stages(lr_run) == [CHECK, *ALWAYS_CHANGED, *DOWNSTREAM_OF_TRAIN]
    assert "Stage 'download' didn't change, skipping" in lr_run
    assert "Stage 'tokenize' didn't change, skipping" in lr_run
    assert "Ran experiment(s): lr-1e-3" in lr_run
    assert load_params(repo / "params.yaml").lr == 1e-3


def test_metrics_diff_shows_the_change(repo: Path, lr_run: str, run_cmd: Callable) -> None:
    diff = json.loads(run_cmd(["dvc", "metrics", "diff", "--json"], repo).stdout)
    loss = diff["metrics/train.json"]["best_val_loss"]
    assert loss["old"] != loss["new"] and loss["diff"] == pytest.approx(loss["new"] - loss["old"])
    assert "metrics/eval.json" in diff
    # The same comparison by name: baseline commit against the experiment.
    by_name = json.loads(
        run_cmd(["dvc", "metrics", "diff", "main", "lr-1e-3", "--json"], repo).stdout
    )
    assert by_name["metrics/train.json"]["best_val_loss"] == loss
    md = run_cmd(["dvc", "metrics", "diff", "--md"], repo).stdout
    assert "best_val_loss" in md


def test_plots_diff_shows_the_change(
    repo: Path, lr_run: str, run_cmd: Callable, tmp_path: Path
) -> None:
    spec = json.loads(run_cmd(["dvc", "plots", "diff", "--json"], repo).stdout)["data"]
    loss = spec["Loss (nats per token)"][0]
    assert set(loss["revisions"]) == {"workspace", "HEAD"}
    values = loss["content"]["data"]["values"]
    by_rev: dict[str, set[str]] = {}
    for row in values:  # rows of three series (step-level, training and validation loss)
        if "train_loss" in row:
            by_rev.setdefault(row["rev"], set()).add(row["train_loss"])
    assert set(by_rev) == {"workspace", "HEAD"} and by_rev["workspace"] != by_rev["HEAD"]
    out = tmp_path / "plots"
    run_cmd(["dvc", "plots", "diff", "main", "lr-1e-3", "-o", out], repo)
    html = (out / "index.html").read_text()
    assert "lr-1e-3" in html and "main" in html


def test_exp_run_of_params_already_run_restores_every_stage_from_the_run_cache(
    repo: Path, lr_run: str, run_cmd: Callable
) -> None:
    """Back to the committed params (the workspace holds lr-1e-3's): DVC's run-cache has every
    stage of that configuration, so nothing runs but init (always changed: it re-checks the
    start, a moment from scratch), not even training."""
    committed = load_params(repo / "params.yaml", {}).lr  # the workspace's, before the run
    assert committed == 1e-3
    seed_lr = yaml.safe_load(run_cmd(["git", "show", "HEAD:params.yaml"], repo).stdout)["lr"]
    started = time.monotonic()
    out = run_cmd(["dvc", "exp", "run", "-n", "seed-again", "-S", f"lr={seed_lr}"], repo).stdout
    seconds = time.monotonic() - started
    assert ran_stages(out) == list(ALWAYS_CHANGED), out
    for stage in DOWNSTREAM_OF_TRAIN:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out
    assert seconds < 0.5 * SECONDS["lr-1e-3"], (seconds, SECONDS)
    # the restored outputs are the committed baseline's, byte for byte
    for path in ("metrics/train.json", "metrics/eval.json", "dvclive/plots/metrics/val_loss.tsv"):
        assert (repo / path).read_text() == run_cmd(["git", "show", f"HEAD:{path}"], repo).stdout
    assert (repo / "models/best/model.safetensors").is_file()
    assert (repo / "samples/samples.md").is_file()


@pytest.fixture(scope="module")
def sweep(repo: Path, lr_run: str, run_cmd: Callable) -> Iterator[list[str]]:
    """``dvc exp run --queue -S 'generate.temperature=0.5,1.0'`` + ``dvc queue start``."""
    out = run_cmd(
        ["dvc", "exp", "run", "--queue", "-S", "generate.temperature=0.5,1.0"], repo
    ).stdout
    names = re.findall(r"Queued experiment '([^']+)'", out)
    try:
        run_cmd(["dvc", "queue", "start", "-j", "1"], repo)
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        while True:
            status = run_cmd(["dvc", "queue", "status"], repo).stdout
            rows = [line for line in status.splitlines() if any(n in line for n in names)]
            if rows and not any(s in line for line in rows for s in ("Queued", "Running")):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"queued experiments still pending after {QUEUE_TIMEOUT_S}s:\n{status}")
            time.sleep(2)
        yield names
    finally:
        run_cmd(["dvc", "queue", "stop", "--kill"], repo, check=False)


def test_queued_sweep_runs_every_combination(
    repo: Path, sweep: list[str], run_cmd: Callable
) -> None:
    assert len(sweep) == 2
    status = run_cmd(["dvc", "queue", "status"], repo).stdout
    for name in sweep:
        assert re.search(rf"{re.escape(name)}\s.*Success", status), status
        log = run_cmd(["dvc", "queue", "logs", name], repo).stdout
        # Only the stage that reads generate.* re-runs (after check-params, and init, which
        # always re-checks the start), even in the queue's clean copies.
        assert ran_stages(log) == [CHECK, *ALWAYS_CHANGED, "generate-samples"], log
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], repo).stdout)
    temps = {}
    for exp in shown[1]["experiments"]:
        rev = exp["revs"][0]
        params = rev["data"]["params"]["params.yaml"]["data"]
        temps[exp["name"]] = params["generate"]["temperature"]
        assert "metrics/generate.json" in rev["data"]["metrics"]
    assert {temps[n] for n in sweep} == {0.5, 1.0}
    assert temps["lr-1e-3"] == load_params(repo / "params.yaml").generate.temperature


def test_report_tabulates_the_experiments(
    repo: Path, sweep: list[str], run_cmd: Callable, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    md = run_cmd(["infinito", "report", "--repo", repo, "--out", out], repo).stdout
    csv = (tmp_path / "report.csv").read_text()
    for name in ("main", "lr-1e-3", *sweep):
        assert name in md and name in csv
    assert "best_val_loss" in csv.splitlines()[0]
    assert "generate.temperature" in csv.splitlines()[0]  # varies, so it is shown
