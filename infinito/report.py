"""``infinito report``: a table of DVC experiments, seed statistics and IIT-vs-ablation tests.

Reads ``dvc exp show --json`` (or a saved copy of it), builds one row per baseline commit and
experiment with its key params and metrics (pandas), and writes the table as markdown and CSV.
Runs whose params are identical except for ``seed`` form a group; for each group of two or more
seeds the report gives mean ± sample standard deviation of every key metric. Groups that differ
only in ``model.iit`` (the IIT model against its ablation, same everything else) are compared
with Welch's t-test (scipy), seed by seed as independent samples. A group counts one run per
distinct seed: runs whose full params (seed included) equal an earlier run's are the same
configuration run again, so they are left out of the statistics and named as duplicates.

    infinito report                      # experiments of the current commit
    infinito report --all-commits --out reports/experiments --metric test_ppl

Experiments without metrics (queued, running or failed) are listed as skipped, never averaged.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from infinito.atomic import write_text

# Params always shown (when present); any other param that varies between rows is shown too.
KEY_PARAMS: tuple[str, ...] = (
    "lr",
    "batch_size",
    "epochs",
    "lambda_phi",
    "seed",
    "model.iit",
)
# Metrics shown by default (those present in at least one row), in this order.
KEY_METRICS: tuple[str, ...] = (
    "test_ppl",
    "test_sliding_ppl",
    "validation_ppl",
    "test_bits_per_byte",
    "test_memory_contribution_ppl",
    "best_val_loss",
    "best_val_ppl",
    "tokens_per_sec",
)
SEED_PARAM = "seed"
IIT_PARAM = "model.iit"
ID_COLUMNS: tuple[str, ...] = ("experiment", "rev", "baseline", "created")


class ReportError(ValueError):
    """The experiments cannot be reported as asked; the message says why and what to do."""


@dataclass
class Report:
    """The report's three tables and the runs left out."""

    runs: pd.DataFrame
    params: list[str]
    metrics: list[str]
    groups: pd.DataFrame
    tests: pd.DataFrame
    skipped: list[str] = field(default_factory=list)
    # runs left out of the statistics: experiment -> the earlier run with the same full params
    duplicates: dict[str, str] = field(default_factory=dict)


# --- reading dvc exp show --json ------------------------------------------------------------


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _rev_row(
    entry: dict[str, Any], name: str | None, baseline: str | None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(ids, params, metrics by file) of one ``dvc exp show`` revision, None without data."""
    data = entry.get("data") or {}
    if entry.get("error") or not data:
        return None
    params: dict[str, Any] = {}
    for file, content in (data.get("params") or {}).items():
        flat: dict[str, Any] = {}
        _flatten("", (content or {}).get("data") or {}, flat)
        # params.yaml keys stand alone; another params file's keys carry the file name.
        params.update(
            flat if file == "params.yaml" else {f"{file}:{k}": v for k, v in flat.items()}
        )
    metrics: dict[str, dict[str, Any]] = {}
    for file, content in (data.get("metrics") or {}).items():
        flat = {}
        _flatten("", (content or {}).get("data") or {}, flat)
        if flat:
            metrics[file] = flat
    rev = str(entry.get("rev") or data.get("rev") or "")
    ids = {
        "experiment": name or entry.get("name") or rev[:7],
        "rev": rev[:7],
        "baseline": baseline or "",
        "created": data.get("timestamp") or "",
    }
    return ids, params, metrics


def collect_runs(
    exp_show: list[dict[str, Any]], include_workspace: bool = False
) -> tuple[list[tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]], list[str]]:
    """Every baseline commit and experiment in ``dvc exp show --json``; and the names skipped."""
    runs = []
    skipped: list[str] = []
    for top in exp_show:
        if top.get("rev") == "workspace" and not include_workspace:
            continue
        top_name = top.get("name") or str(top.get("rev", ""))[:7]
        row = _rev_row(top, top_name, None)
        if row and row[2]:
            runs.append(row)
        elif top.get("rev") != "workspace":
            skipped.append(top_name)
        for exp in top.get("experiments") or []:
            revs = exp.get("revs") or []
            name = exp.get("name")
            if not revs:
                skipped.append(name or "?")
                continue
            row = _rev_row(revs[0], name, top_name)
            # Queued/running/failed runs carry an executor state; finished queue runs "success".
            state = (exp.get("executor") or {}).get("state", "success")
            if row and row[2] and state == "success":
                runs.append(row)
            else:
                skipped.append(name or str(revs[0].get("rev", ""))[:7])
    return runs, skipped


def _metric_columns(runs: Sequence[tuple[Any, Any, dict[str, dict[str, Any]]]]) -> dict:
    """Map (file, key) to a column name: the key alone when unique across files, else stem.key."""
    files_by_key: dict[str, set[str]] = {}
    for _, _, metrics in runs:
        for file, flat in metrics.items():
            for key in flat:
                files_by_key.setdefault(key, set()).add(file)
    out = {}
    for key, files in files_by_key.items():
        for file in files:
            out[(file, key)] = key if len(files) == 1 else f"{Path(file).stem}.{key}"
    return out


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def build_report(
    exp_show: list[dict[str, Any]],
    metrics: Sequence[str] | None = None,
    params: Sequence[str] | None = None,
    include_workspace: bool = False,
) -> Report:
    """Build the report from parsed ``dvc exp show --json`` output."""
    if not isinstance(exp_show, list):
        raise ReportError("expected the JSON list that `dvc exp show --json` prints")
    runs, skipped = collect_runs(exp_show, include_workspace)
    if not runs:
        raise ReportError(
            "no experiment with metrics found; run the pipeline first (dvc repro, or "
            "dvc exp run -S lr=1e-4)"
            + (f"; skipped without metrics: {', '.join(skipped)}" if skipped else "")
        )
    columns = _metric_columns(runs)
    records = []
    all_params: list[str] = []
    for ids, p, m in runs:
        rec = dict(ids)
        for k, v in p.items():
            if k not in all_params:
                all_params.append(k)
            rec[f"param:{k}"] = json.dumps(v) if isinstance(v, list | dict) else v
        for file, flat in m.items():
            for key, v in flat.items():
                rec[f"metric:{columns[(file, key)]}"] = v
        records.append(rec)
    df = pd.DataFrame.from_records(records)

    metric_names = [c.removeprefix("metric:") for c in df.columns if c.startswith("metric:")]
    if metrics:
        missing = [m for m in metrics if m not in metric_names]
        if missing:
            raise ReportError(
                f"metric {missing[0]!r} is in no experiment; available: {', '.join(metric_names)}"
            )
        key_metrics = list(metrics)
    else:
        key_metrics = [m for m in KEY_METRICS if m in metric_names]
        if not key_metrics:
            key_metrics = [m for m in metric_names if df[f"metric:{m}"].map(_numeric).any()]

    if params:
        missing = [p for p in params if p not in all_params]
        if missing:
            raise ReportError(f"param {missing[0]!r} is in no experiment's params")
        key_params = list(params)
    else:
        varying = [p for p in all_params if df[f"param:{p}"].astype(str).nunique(dropna=False) > 1]
        key_params = [p for p in KEY_PARAMS if p in all_params]
        key_params += [p for p in varying if p not in key_params]

    unique, duplicates = drop_duplicate_runs(df, all_params)
    groups = seed_groups(unique, all_params, key_metrics)
    tests = iit_tests(unique, all_params, key_metrics)
    return Report(df, key_params, key_metrics, groups, tests, skipped, duplicates)


# --- statistics -----------------------------------------------------------------------------


def _group_key(row: pd.Series, params: Iterable[str]) -> str:
    return json.dumps({p: _plain(row.get(f"param:{p}")) for p in params}, sort_keys=True)


def _plain(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def _describe(row: pd.Series, varying: set[str], exclude: Iterable[str]) -> str:
    """The key params and every varying param of ``row``, except ``exclude``."""
    shown = [p for p in KEY_PARAMS if f"param:{p}" in row.index]
    shown += sorted(varying - set(shown))
    skip = set(exclude)
    return ", ".join(f"{p}={_plain(row.get(f'param:{p}'))}" for p in shown if p not in skip)


def drop_duplicate_runs(
    df: pd.DataFrame, all_params: list[str]
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The earliest run of each distinct full params (seed included), and every later one by
    name with the run it repeats."""
    keys = df.apply(lambda r: _group_key(r, all_params), axis=1)
    first: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    dropped = []
    order = df["created"].astype(str).sort_values(kind="stable").index  # oldest first
    for i in order:
        name = df.at[i, "experiment"]
        if keys[i] in first:
            duplicates[name] = first[keys[i]]
            dropped.append(i)
        else:
            first[keys[i]] = name
    return df.drop(index=dropped), duplicates


def seed_groups(df: pd.DataFrame, all_params: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean ± std per key metric over runs whose params differ only in the seed (n >= 2).

    ``df`` holds one run per distinct full params (``drop_duplicate_runs``), so n counts seeds.
    """
    others = [p for p in all_params if p != SEED_PARAM]
    varying = {p for p in others if df[f"param:{p}"].astype(str).nunique(dropna=False) > 1}
    rows = []
    keys = df.apply(lambda r: _group_key(r, others), axis=1)
    for _, members in df.groupby(keys, sort=False):
        if len(members) < 2:
            continue
        first = members.iloc[0]
        row: dict[str, Any] = {
            "group": _describe(first, varying, (SEED_PARAM,)),
            "n": len(members),
            "seeds": " ".join(str(_plain(s)) for s in members.get(f"param:{SEED_PARAM}", [])),
            "experiments": " ".join(members["experiment"]),
        }
        for m in metrics:
            col = f"metric:{m}"
            vals = pd.to_numeric(members[col], errors="coerce").dropna() if col in members else []
            row[f"{m} mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m} std"] = float(vals.std(ddof=1)) if len(vals) >= 2 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def iit_tests(df: pd.DataFrame, all_params: list[str], metrics: list[str]) -> pd.DataFrame:
    """Welch's t-test of IIT vs ablation for runs identical except seed and ``model.iit``."""
    if IIT_PARAM not in all_params:
        return pd.DataFrame()
    others = [p for p in all_params if p not in (SEED_PARAM, IIT_PARAM)]
    varying = {p for p in others if df[f"param:{p}"].astype(str).nunique(dropna=False) > 1}
    rows = []
    keys = df.apply(lambda r: _group_key(r, others), axis=1)
    for _, members in df.groupby(keys, sort=False):
        iit = members[members[f"param:{IIT_PARAM}"] == True]  # noqa: E712 (pandas mask)
        abl = members[members[f"param:{IIT_PARAM}"] == False]  # noqa: E712
        if iit.empty or abl.empty:
            continue
        context = _describe(members.iloc[0], varying, (SEED_PARAM, IIT_PARAM))
        for m in metrics:
            col = f"metric:{m}"
            if col not in members:
                continue
            a = pd.to_numeric(iit[col], errors="coerce").dropna().to_numpy(dtype=float)
            b = pd.to_numeric(abl[col], errors="coerce").dropna().to_numpy(dtype=float)
            row: dict[str, Any] = {
                "group": context,
                "metric": m,
                "iit n": len(a),
                "iit mean": float(a.mean()) if len(a) else math.nan,
                "iit std": float(a.std(ddof=1)) if len(a) >= 2 else math.nan,
                "ablation n": len(b),
                "ablation mean": float(b.mean()) if len(b) else math.nan,
                "ablation std": float(b.std(ddof=1)) if len(b) >= 2 else math.nan,
                "t": math.nan,
                "p": math.nan,
                "note": "",
            }
            if len(a) < 2 or len(b) < 2:
                row["note"] = "needs >= 2 seeds on each side"
            elif np.ptp(a) == 0 and np.ptp(b) == 0:
                row["note"] = "no variance within either side"
            else:
                res = stats.ttest_ind(a, b, equal_var=False)
                row["t"], row["p"] = float(res.statistic), float(res.pvalue)
            rows.append(row)
    return pd.DataFrame(rows)


# --- rendering ------------------------------------------------------------------------------


def runs_table(report: Report) -> pd.DataFrame:
    """The one-row-per-run table with readable column names (what the CSV holds)."""
    cols = list(ID_COLUMNS)
    cols += [f"param:{p}" for p in report.params]
    cols += [f"metric:{m}" for m in report.metrics]
    table = report.runs.reindex(columns=cols)
    return table.rename(columns=lambda c: c.split(":", 1)[1] if ":" in c else c)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown(df: pd.DataFrame) -> str:
    return df.map(_fmt).to_markdown(index=False)


def render_markdown(report: Report) -> str:
    """The report as markdown: runs, seed groups, IIT-vs-ablation tests."""
    parts = ["# INFINITO experiments", "", "Source: `dvc exp show --json`.", ""]
    parts += ["## Runs", "", _markdown(runs_table(report)), ""]
    if report.skipped:
        parts += [
            f"Skipped (no metrics: queued, running or failed): {', '.join(report.skipped)}",
            "",
        ]
    if report.duplicates:
        same = ", ".join(f"{dup} (= {orig})" for dup, orig in report.duplicates.items())
        parts += [
            "Duplicates left out of the statistics (the same params, seed included, as an "
            f"earlier run): {same}",
            "",
        ]
    parts += ["## Seed groups (params identical except the seed)", ""]
    if report.groups.empty:
        parts += ["No two runs differ only in the seed.", ""]
    else:
        g = report.groups.copy()
        for m in report.metrics:
            mean, std = g.pop(f"{m} mean"), g.pop(f"{m} std")
            g[m] = [f"{_fmt(a)} ± {_fmt(b)}" for a, b in zip(mean, std, strict=True)]
        parts += ["Mean ± sample standard deviation over the seeds.", "", _markdown(g), ""]
    parts += ["## IIT vs ablation (Welch's t-test)", ""]
    if report.tests.empty:
        parts += ["No IIT run has an ablation twin (same params except seed and model.iit).", ""]
    else:
        t = report.tests.copy()
        t["iit"] = [
            f"{_fmt(a)} ± {_fmt(b)} (n={n})"
            for a, b, n in zip(t["iit mean"], t["iit std"], t["iit n"], strict=True)
        ]
        t["ablation"] = [
            f"{_fmt(a)} ± {_fmt(b)} (n={n})"
            for a, b, n in zip(t["ablation mean"], t["ablation std"], t["ablation n"], strict=True)
        ]
        t = t[["group", "metric", "iit", "ablation", "t", "p", "note"]]
        parts += [
            "Two-sided Welch's t-test over seeds (unequal variances); "
            "p is not corrected for the number of metrics tested.",
            "",
            _markdown(t),
            "",
        ]
    return "\n".join(parts)


# --- the command ----------------------------------------------------------------------------


def read_exp_show(repo: Path, all_commits: bool = False) -> list[dict[str, Any]]:
    """Run ``dvc exp show --json`` in ``repo`` with the interpreter's DVC."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    if all_commits:
        cmd.append("--all-commits")
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ReportError(f"dvc exp show failed in {repo}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infinito report",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="DVC repository")
    parser.add_argument(
        "--input",
        type=Path,
        default=None,
        help="read this saved `dvc exp show --json` output instead of running it",
    )
    parser.add_argument(
        "--all-commits",
        "-A",
        action="store_true",
        help="experiments of every commit, not only HEAD's",
    )
    parser.add_argument("--workspace", action="store_true", help="include the workspace row")
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        metavar="NAME",
        help="key metric to show and test (repeatable); default: "
        + ", ".join(KEY_METRICS)
        + " (those present)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=None,
        metavar="NAME",
        help="param column to show (repeatable); default: "
        + ", ".join(KEY_PARAMS)
        + " and every param that varies",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("reports/experiments"),
        help="writes OUT.md and OUT.csv (default: reports/experiments)",
    )
    args = parser.parse_args(argv)
    try:
        if args.input is not None:
            if not args.input.is_file():
                raise ReportError(f"--input {args.input} not found")
            exp_show = json.loads(args.input.read_text(encoding="utf-8"))
        else:
            exp_show = read_exp_show(args.repo, args.all_commits)
        report = build_report(exp_show, args.metric, args.param, args.workspace)
    except (ReportError, json.JSONDecodeError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    markdown = render_markdown(report)
    md_path = args.out.with_name(args.out.name + ".md")
    csv_path = args.out.with_name(args.out.name + ".csv")
    write_text(md_path, markdown)
    write_text(csv_path, runs_table(report).to_csv(index=False))
    print(markdown)
    print(f"wrote {md_path} and {csv_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
