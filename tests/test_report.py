"""``infinito report``: the experiments table, seed groups and the IIT-vs-ablation Welch test."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from infinito.report import ReportError, build_report, main, render_markdown, runs_table

IIT_PPL = {1: 210.0, 2: 205.0, 3: 214.0}
ABL_PPL = {1: 230.0, 2: 241.0, 3: 236.0}
MAIN_PPL = 220.0  # the baseline commit: seed 42, otherwise the IIT runs' params
IIT_GROUP = [MAIN_PPL, *IIT_PPL.values()]


def params(**over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "lr": 2e-4,
        "batch_size": 16,
        "epochs": 20,
        "lambda_phi": 0.1,
        "seed": 42,
        "model": {"iit": True, "d_model": 512},
        "evaluate": {"splits": ["validation", "test"]},
    }
    for key, value in over.items():
        if key == "iit":
            p["model"]["iit"] = value
        else:
            p[key] = value
    return p


def rev(name: str, p: dict[str, Any], metrics: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """One revision as `dvc exp show --json` (DVC 3) prints it."""
    return {
        "rev": hashlib.sha1(name.encode()).hexdigest(),
        "name": name,
        "error": None,
        "data": {
            "rev": name,
            "timestamp": "2026-01-01T00:00:00",
            "params": {"params.yaml": {"data": p}},
            "metrics": {f: {"data": d} for f, d in (metrics or {}).items()},
            "deps": {},
            "outs": {},
            "meta": {},
        },
    }


def exp(name: str, p: dict[str, Any], metrics: dict[str, Any] | None, state: str | None) -> dict:
    executor = None if state is None else {"state": state, "name": "dvc-task", "local": {}}
    return {"executor": executor, "name": name, "revs": [rev(name, p, metrics)]}


def metrics(ppl: float, loss: float = 5.0, tok_s: float = 1000.0) -> dict[str, dict[str, Any]]:
    return {
        "metrics/eval.json": {"test_ppl": ppl, "validation_ppl": ppl + 5},
        "metrics/train.json": {"best_val_loss": loss, "tokens_per_sec": tok_s},
        "metrics/benchmark.json": {"tokens_per_sec": tok_s / 10},
    }


def exp_show() -> list[dict[str, Any]]:
    experiments = [
        exp(f"iit-s{s}", params(seed=s), metrics(ppl), None) for s, ppl in IIT_PPL.items()
    ]
    experiments += [
        exp(f"abl-s{s}", params(seed=s, iit=False), metrics(ppl), "success")  # from the queue
        for s, ppl in ABL_PPL.items()
    ]
    experiments += [
        exp("lr-1e-4", params(lr=1e-4), metrics(250.0), None),
        exp("waiting", params(lr=3e-4), None, "queued"),
        exp("broken", params(lr=5e-4), None, "failed"),
    ]
    workspace = rev("workspace", params(), metrics(1.0))
    workspace["rev"], workspace["name"] = "workspace", None
    baseline = rev("main", params(), metrics(MAIN_PPL))
    baseline["experiments"] = experiments
    return [workspace, baseline]


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t and two-sided p from the textbook formulas."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(t), float(2 * stats.t.sf(abs(t), df))


def test_runs_table_has_one_row_per_finished_run() -> None:
    report = build_report(exp_show())
    table = runs_table(report)
    assert list(table["experiment"]) == [
        "main",
        "iit-s1",
        "iit-s2",
        "iit-s3",
        "abl-s1",
        "abl-s2",
        "abl-s3",
        "lr-1e-4",
    ]
    assert report.skipped == ["waiting", "broken"]
    assert set(table["baseline"][1:]) == {"main"}
    # Key params first, then the params that vary (here only the key ones do).
    assert report.params == ["lr", "batch_size", "epochs", "lambda_phi", "seed", "model.iit"]
    # A key in two metrics files is qualified by the file's stem; a unique one is not.
    columns = set(report.runs.columns)
    assert {"metric:train.tokens_per_sec", "metric:benchmark.tokens_per_sec"} <= columns
    assert "metric:tokens_per_sec" not in columns and "metric:test_ppl" in columns
    assert report.metrics == ["test_ppl", "validation_ppl", "best_val_loss"]
    row = table.set_index("experiment").loc["abl-s2"]
    assert row["test_ppl"] == 241.0 and row["model.iit"] == False  # noqa: E712
    assert row["seed"] == 2


def test_seed_groups_mean_and_std() -> None:
    groups = build_report(exp_show()).groups
    # IIT: main (seed 42) and three seeds; ablation: three seeds; lr-1e-4 stands alone.
    assert len(groups) == 2
    iit, abl = (groups[groups["group"].str.contains(f"model.iit={v}")] for v in (True, False))
    assert len(iit) == len(abl) == 1
    iit, abl = iit.iloc[0], abl.iloc[0]
    assert iit["n"] == 4 and iit["seeds"] == "42 1 2 3"
    assert iit["experiments"] == "main iit-s1 iit-s2 iit-s3"
    assert iit["test_ppl mean"] == pytest.approx(np.mean(IIT_GROUP))
    assert iit["test_ppl std"] == pytest.approx(np.std(IIT_GROUP, ddof=1))
    assert abl["test_ppl mean"] == pytest.approx(np.mean(list(ABL_PPL.values())))
    assert "seed=" not in iit["group"]


def test_welch_test_of_iit_against_ablation() -> None:
    tests = build_report(exp_show()).tests
    row = tests.set_index("metric").loc["test_ppl"]
    t, p = welch(IIT_GROUP, list(ABL_PPL.values()))
    assert row["t"] == pytest.approx(t) and row["p"] == pytest.approx(p)
    assert row["t"] < 0 and row["p"] < 0.05  # lower perplexity with IIT in this made-up data
    assert (row["iit n"], row["ablation n"]) == (4, 3)
    # Identical values on both sides: no test, said so.
    tok = tests.set_index("metric").loc["best_val_loss"]
    assert math.isnan(tok["p"]) and "no variance" in tok["note"]


def test_a_run_repeated_with_the_same_params_counts_once_and_is_named() -> None:
    """Two runs of identical params (seed included) are one sample, not two seeds."""
    data = exp_show()
    again = [
        exp("iit-s1-again", params(seed=1), metrics(IIT_PPL[1] + 1.0), None),  # a rerun
        exp("abl-s2-again", params(seed=2, iit=False), metrics(ABL_PPL[2]), "success"),
        exp("abl-s2-third", params(seed=2, iit=False), metrics(ABL_PPL[2]), None),
    ]
    data[1]["experiments"] += again
    report = build_report(data)
    assert report.duplicates == {  # the first of each configuration counts
        "iit-s1-again": "iit-s1",
        "abl-s2-again": "abl-s2",
        "abl-s2-third": "abl-s2",
    }
    assert len(runs_table(report)) == len(runs_table(build_report(exp_show()))) + 3
    iit = report.groups[report.groups["group"].str.contains("model.iit=True")].iloc[0]
    abl = report.groups[report.groups["group"].str.contains("model.iit=False")].iloc[0]
    assert (iit["n"], abl["n"]) == (4, 3)  # distinct seeds
    assert sorted(iit["seeds"].split()) == ["1", "2", "3", "42"]
    assert iit["test_ppl mean"] == pytest.approx(np.mean(IIT_GROUP))  # iit-s1's number, once
    row = report.tests.set_index("metric").loc["test_ppl"]
    assert (row["iit n"], row["ablation n"]) == (4, 3)
    assert row["t"] == pytest.approx(welch(IIT_GROUP, list(ABL_PPL.values()))[0])
    md = render_markdown(report)
    assert "iit-s1-again (= iit-s1)" in md and "abl-s2-third (= abl-s2)" in md


def test_too_few_seeds_is_reported_not_tested() -> None:
    data = exp_show()
    data[1]["experiments"] = [e for e in data[1]["experiments"] if e["name"] != "abl-s2"]
    data[1]["experiments"] = [e for e in data[1]["experiments"] if e["name"] != "abl-s3"]
    row = build_report(data).tests.set_index("metric").loc["test_ppl"]
    assert math.isnan(row["p"]) and row["note"] == "needs >= 2 seeds on each side"


def test_markdown_has_the_three_sections() -> None:
    md = render_markdown(build_report(exp_show()))
    assert "## Runs" in md and "## Seed groups" in md and "## IIT vs ablation" in md
    assert "| iit-s1 " in md
    assert "Skipped (no metrics: queued, running or failed): waiting, broken" in md
    mean, std = np.mean(IIT_GROUP), np.std(IIT_GROUP, ddof=1)
    assert f"{mean:.4g} ± {std:.4g}" in md


def test_chosen_metric_and_param_and_their_errors() -> None:
    report = build_report(exp_show(), metrics=["validation_ppl"], params=["lr"])
    assert report.metrics == ["validation_ppl"] and report.params == ["lr"]
    assert list(report.tests["metric"]) == ["validation_ppl"]
    with pytest.raises(ReportError, match="metric 'test_bpb' is in no experiment"):
        build_report(exp_show(), metrics=["test_bpb"])
    with pytest.raises(ReportError, match="param 'model.nope'"):
        build_report(exp_show(), params=["model.nope"])
    empty = [rev("main", params(), None)]
    with pytest.raises(ReportError, match="no experiment with metrics"):
        build_report(empty)
    with pytest.raises(ReportError, match="JSON list"):
        build_report({"not": "a list"})  # type: ignore[arg-type]


def test_main_writes_markdown_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "exp_show.json"
    source.write_text(json.dumps(exp_show()))
    out = tmp_path / "reports" / "experiments"
    assert main(["--input", str(source), "--out", str(out)]) == 0
    md = (tmp_path / "reports/experiments.md").read_text()
    assert "## Runs" in md and capsys.readouterr().out.strip() == md.strip()
    csv = pd.read_csv(tmp_path / "reports/experiments.csv")
    assert list(csv["experiment"])[:2] == ["main", "iit-s1"]
    assert csv.set_index("experiment").loc["iit-s3", "test_ppl"] == IIT_PPL[3]


def test_main_names_a_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--input", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.json not found" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


@pytest.mark.slow
def test_report_over_real_dvc_experiments(
    dvc_repo: Callable[..., Path], run_cmd: Callable, tmp_path: Path
) -> None:
    """Real `dvc exp show --json` from a toy pipeline (no model: a one-line stage)."""
    repo = dvc_repo()
    (repo / "stage.py").write_text(
        "import json\n"
        "from infinito.config import read_params\n"
        "p = read_params('params.yaml')\n"
        "ppl = 100 + p['seed'] + (0 if p['model']['iit'] else 7)\n"
        "json.dump({'test_ppl': ppl}, open('eval.json', 'w'))\n"
    )
    (repo / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: python stage.py\n    deps: [stage.py]\n"
        "    params: [seed, model.iit]\n"
        "    metrics:\n      - eval.json:\n          cache: false\n"
    )
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "toy"], cwd=repo, check=True)
    for seed in (1, 2):
        for iit in ("true", "false"):
            run_cmd(["dvc", "exp", "run", "-S", f"seed={seed}", "-S", f"model.iit={iit}"], repo)
    run_cmd(["infinito", "report", "--out", tmp_path / "r"], repo)
    csv = pd.read_csv(tmp_path / "r.csv")
    assert len(csv) == 4  # the four experiments; the commit itself has no metrics
    md = (tmp_path / "r.md").read_text()
    # Seeds 1 and 2 per side: IIT 101, 102; ablation 108, 109.
    assert "101.5 ± 0.7071" in md and "108.5 ± 0.7071" in md

    # The same configuration again (DVC restores it from its run-cache): one seed, not two.
    run_cmd(["dvc", "exp", "run", "-n", "again", "-S", "seed=1", "-S", "model.iit=true"], repo)
    run_cmd(["infinito", "report", "--out", tmp_path / "r"], repo)
    md = (tmp_path / "r.md").read_text()
    assert len(pd.read_csv(tmp_path / "r.csv")) == 5
    assert re.search(r"again \(= [\w-]+\)", md), md
    assert "101.5 ± 0.7071" in md  # counted twice it would be 101.3 ± 0.5774
