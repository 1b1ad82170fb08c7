"""IIT model against its ablation, several seeds, through the train and evaluate stages.

Runs the same commands as ``dvc.yaml`` (``python -m infinito.train`` then
``python -m infinito.evaluate``) for ``model.iit`` true and false and each seed, with a params
file and a tokenized data directory prepared beforehand, and writes every run's metrics plus a
summary: mean ± sample std per arm and Welch's t-test of IIT against the ablation. It needs
neither DVC nor the tokenizer, so it runs on a bare GPU machine::

    PYTHONPATH=. python scripts/gpu_compare.py --params P.yaml --data DIR --out OUT --seeds 1 2 3

Each run trains into its own directory under ``--work``; a run whose metrics exist is skipped,
so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scipy import stats

from infinito.atomic import write_json, write_text
from infinito.config import write_params
from infinito.trainlog import read_series

METRICS = (
    "validation_ppl",
    "test_ppl",
    "test_sliding_ppl",
    "test_bits_per_byte",
    "test_ppl_no_memory",
)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def one(params: Path, data: Path, work: Path, iit: bool, seed: int) -> dict[str, Any]:
    """Train and evaluate one arm at one seed; returns train and eval metrics merged."""
    name = f"{'iit' if iit else 'ablation'}-seed{seed}"
    d = work / name
    done = d / "eval.json"
    if not done.exists():
        d.mkdir(parents=True, exist_ok=True)
        run_params = d / "params.yaml"
        overrides = {"seed": seed, "model.iit": iit}
        write_params(run_params, overrides, base=params)
        py = sys.executable
        t0 = time.perf_counter()
        run(
            [
                py,
                "-m",
                "infinito.train",
                "--params",
                str(run_params),
                "--data",
                str(data),
                "--out",
                str(d / "best"),
                "--state",
                str(d / "state"),
                "--metrics",
                str(d / "train.json"),
                "--live",
                str(d / "live"),
            ]
        )
        run(
            [
                py,
                "-m",
                "infinito.evaluate",
                "--params",
                str(run_params),
                "--model",
                str(d / "best"),
                "--data",
                str(data),
                "--metrics",
                str(d / "eval.json"),
            ]
        )
        write_text(d / "wall_sec.txt", f"{time.perf_counter() - t0:.1f}\n")
    with (d / "train.json").open() as f:
        train = json.load(f)
    with done.open() as f:
        ev = json.load(f)
    return {"name": name, "iit": iit, "seed": seed, "train": train, "eval": ev}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in METRICS:
        arms = {
            arm: [
                r["eval"][metric]
                for r in runs
                if r["iit"] == (arm == "iit") and metric in r["eval"]
            ]
            for arm in ("iit", "ablation")
        }
        row: dict[str, Any] = {}
        for arm, xs in arms.items():
            if xs:
                row[f"{arm}_mean"] = statistics.fmean(xs)
                row[f"{arm}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
                row[f"{arm}_n"] = len(xs)
        if len(arms["iit"]) > 1 and len(arms["ablation"]) > 1:
            t = stats.ttest_ind(arms["iit"], arms["ablation"], equal_var=False)
            row["welch_t"], row["p_value"] = float(t.statistic), float(t.pvalue)
        out[metric] = row
    return out


def plot(histories: dict[str, Path], out: Path) -> None:
    """Validation perplexity and training loss per epoch of each run (their DVCLive
    directories), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(10, 4))
    for name, path in histories.items():
        series = read_series(path)
        epoch = dict(series["epoch"])  # step -> epoch
        style = "-" if name.startswith("iit") else "--"
        for ax, key in ((ax_val, "val_ppl"), (ax_train, "train_loss")):
            points = [(epoch[step], value) for step, value in series[key]]
            ax.plot(*zip(*points, strict=True), style, marker="o", label=name)
    ax_val.set(xlabel="epoch", ylabel="validation perplexity", yscale="log")
    ax_train.set(xlabel="epoch", ylabel="training loss (mean over the epoch)")
    for ax in (ax_val, ax_train):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--work", type=Path, default=Path("compare-runs"))
    p.add_argument("--out", type=Path, help="summary JSON")
    p.add_argument("--plot", type=Path, help="also draw every run's curves into this PNG")
    p.add_argument(
        "--plot-only",
        nargs="+",
        metavar="NAME=LIVE_DIR",
        help="only draw the given runs' DVCLive directories (e.g. copied back from a GPU machine)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--budget-sec", type=float, default=1e9, help="start no new run after this")
    args = p.parse_args(argv)
    if args.plot_only:
        if args.plot is None:
            p.error("--plot-only needs --plot PNG")
        plot({k: Path(v) for k, v in (item.split("=", 1) for item in args.plot_only)}, args.plot)
        return 0
    if args.params is None or args.data is None or args.out is None:
        p.error("--params, --data and --out are required to run the comparison")
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for iit in (True, False):
            if time.perf_counter() - t0 > args.budget_sec:
                print(f"budget spent: skipping iit={iit} seed={seed}", file=sys.stderr)
                continue
            runs.append(one(args.params, args.data, args.work, iit, seed))
            report = {"runs": runs, "summary": summarise(runs)}
            write_json(args.out, report)
    if args.plot:
        plot({r["name"]: args.work / r["name"] / "live" for r in runs}, args.plot)
    print(json.dumps(summarise(runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
