"""IIT model against its ablation, several seeds, through the train and evaluate stages.

Runs the same commands as ``dvc.yaml`` (``python -m infinito.train`` then
``python -m infinito.evaluate``) for ``model.iit`` true and false and each seed, with a params
file and a tokenized data directory prepared beforehand, and writes one JSON: every run's
``metrics/train.json`` and ``metrics/eval.json`` numbers under their own keys, plus ``arm``,
``seed``, ``device``, ``torch``, why training ended (``stop_reason``), the validation curve, and
the memory's writes over one validation pass of the best checkpoint; then a summary: mean,
sample std and n per arm and Welch's t-test of IIT against the ablation. It needs neither DVC
nor the tokenizer, so it runs on a bare GPU machine::

    PYTHONPATH=. python scripts/gpu_compare.py --params P.yaml --data DIR --out OUT.json \\
        --plot OUT.png --seeds 1 2 3 --budget-sec 400

Runs go in seed order, IIT first; ``--parallel 2`` runs the two arms of a seed at the same time
on the one GPU (more seeds in a short lease; each run's ``tokens_per_sec`` and
``wall_time_sec`` are then those of a shared GPU, and its entry says ``concurrent_runs: 2``).
``--budget-sec`` starts no batch of runs that the remaining time cannot fit (by the longest
batch so far, or ``--run-estimate-sec`` before the first) and stops runs still going at the
deadline, so the JSON and the plot are written in time. Each run trains into
its own directory under ``--work``; a run whose metrics exist is skipped, so an interrupted
comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from infinito.atomic import write_json
from infinito.config import parse_yaml, read_yaml, write_params
from infinito.trainlog import read_series

METRICS = (
    "validation_ppl",
    "validation_sliding_ppl",
    "test_ppl",
    "test_sliding_ppl",
    "test_bits_per_byte",
    "test_word_ppl",
    "test_ppl_no_memory",
    "best_epoch",
    "epochs_completed",
    "tokens_per_sec",
    "wall_time_sec",
)
ARMS = ("iit", "ablation")


class RunTimeout(Exception):
    """A run reached the comparison's deadline and was stopped."""


def run(cmd: list[str], deadline: float) -> None:
    """Run ``cmd``; stop it at ``deadline`` (``time.monotonic``) and raise ``RunTimeout``."""
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    try:
        subprocess.run(cmd, check=True, timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as e:
        raise RunTimeout(f"stopped at the time budget: {' '.join(cmd[:3])}") from e


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` overrides, values read as YAML scalars (as ``dvc exp run -S`` does)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not KEY=VALUE (e.g. train.compile=false)")
        out[key] = parse_yaml(value, f"--set {key}")
    return out


def one(
    params: Path,
    data: Path,
    work: Path,
    iit: bool,
    seed: int,
    deadline: float,
    sets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one arm at one seed (``sets``: more overrides); returns its entry."""
    name = f"{'iit' if iit else 'ablation'}-seed{seed}"
    d = work / name
    if not (d / "eval.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        run_params = d / "params.yaml"
        write_params(run_params, {**(sets or {}), "seed": seed, "model.iit": iit}, base=params)
        py = sys.executable
        t0 = time.perf_counter()
        run(
            [py, "-m", "infinito.train", "--params", str(run_params), "--data", str(data)]
            + ["--out", str(d / "best"), "--state", str(d / "state")]
            + ["--metrics", str(d / "train.json"), "--live", str(d / "live")]
            + ["--stale-state", "discard"],
            deadline,
        )
        shutil.rmtree(d / "state", ignore_errors=True)  # the resumable state: about 1 GB
        run(
            [py, "-m", "infinito.evaluate", "--params", str(run_params), "--model"]
            + [str(d / "best"), "--data", str(data), "--metrics", str(d / "eval.json.tmp")],
            deadline,
        )
        write_json(d / "memory_writes.json", memory_writes(d / "best", data, run_params))
        write_json(d / "wall.json", {"run_wall_sec": time.perf_counter() - t0})
        (d / "eval.json.tmp").rename(d / "eval.json")  # last: marks the run complete
    return entry(d, name, iit, seed)


def memory_writes(model_dir: Path, data: Path, params_path: Path) -> dict[str, float]:
    """The best checkpoint's memory writes over one validation pass (evaluation's protocol).

    Counts what ``write_memory`` reports after each batch: candidates, accepted writes and
    evictions; {} for a model without memory.
    """
    import torch

    from infinito.config import load_params
    from infinito.data.splits import nonoverlapping_windows, open_split, read_meta
    from infinito.model import Infinito
    from infinito.runtime import resolve_device, resolve_dtype
    from infinito.scoring import score

    params = load_params(params_path)
    device = resolve_device(params.train.device)
    dtype = resolve_dtype(params.train.precision, device)
    model = Infinito.from_checkpoint(model_dir, map_location="cpu").to(device)
    if model.memory is None:
        return {}
    totals: dict[str, Any] = {}
    write = model.write_memory

    def counting(candidates: Any) -> dict[str, Any]:
        stats = write(candidates)
        for key in ("candidates", "writes", "evictions"):
            if key in stats:
                totals[key] = totals.get(key, 0.0) + stats[key].double()
        return stats

    model.write_memory = counting  # type: ignore[method-assign]
    meta = read_meta(data)
    tokens = open_split(data, "validation", meta)
    windows = nonoverlapping_windows(len(tokens), params.data.seq_len)
    with torch.no_grad():
        score(model, tokens, windows, params.evaluate.batch_size, device, dtype)
    out = {f"validation_memory_{k}": float(v) for k, v in totals.items()}
    if out.get("validation_memory_candidates"):
        out["validation_memory_write_rate"] = (
            out["validation_memory_writes"] / out["validation_memory_candidates"]
        )
    return out


def read_history(live_dir: Path) -> list[dict[str, float | None]]:
    """A run's validation rows (epoch, step, losses, perplexity) from its DVCLive series."""
    series = {k: dict(v) for k, v in read_series(live_dir).items()}
    keys = ("train_loss", "val_loss", "val_ppl")
    return [
        {"epoch": epoch, "step": step, **{k: series.get(k, {}).get(step) for k in keys}}
        for step, epoch in sorted(series["epoch"].items())
    ]


def stop_reason(
    history: list[dict[str, Any]], train: dict[str, Any], params: dict[str, Any]
) -> str:
    """Why training ended, replaying the early-stopping rule (``Loop.track``) on the history."""
    tc = params.get("train", {})
    patience, min_delta = tc.get("patience", 3), tc.get("min_delta", 0.001)
    epochs = params.get("epochs", 20)
    if not train.get("early_stopped"):
        if tc.get("max_steps") and train["steps"] >= tc["max_steps"]:
            return f"train.max_steps={tc['max_steps']} reached at step {train['steps']}"
        return f"ran all {epochs} epochs"
    ref, counted = math.inf, 0.0
    for row in history:
        epoch = row["epoch"]
        if epoch is None or not float(epoch).is_integer():
            continue  # only epoch-end validations count for early stopping
        if row["val_loss"] < ref - min_delta:
            ref, counted = row["val_loss"], epoch
    return (
        f"early stopping after epoch {train['epochs_completed']:g}: {patience} epoch-end "
        f"validations without a validation-loss drop of {min_delta} below epoch {counted:g}'s "
        f"{ref:.4f} (best epoch {train['best_epoch']:g})"
    )


def entry(d: Path, name: str, iit: bool, seed: int) -> dict[str, Any]:
    """One run: train.json and eval.json keys as they are, plus what the comparison adds."""
    import torch

    with (d / "train.json").open() as f:
        train = json.load(f)
    with (d / "eval.json").open() as f:
        ev = json.load(f)
    params = read_yaml(d / "params.yaml")
    extra: dict[str, Any] = {}
    for extra_file in ("memory_writes.json", "wall.json"):
        if (d / extra_file).exists():
            with (d / extra_file).open() as f:
                extra |= json.load(f)
    history = read_history(d / "live")
    cuda = torch.cuda.is_available()
    return {
        "name": name,
        "arm": "iit" if iit else "ablation",
        "seed": seed,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        **train,
        **ev,
        **extra,
        "stop_reason": stop_reason(history, train, params),
        "history": [
            {k: row[k] for k in ("epoch", "step", "train_loss", "val_loss", "val_ppl")}
            for row in history
        ],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: mean, sample std and n per arm; Welch's t and p where both arms have n > 1."""
    from scipy import stats

    out: dict[str, Any] = {}
    for metric in METRICS:
        arms = {
            arm: [r[metric] for r in runs if r["arm"] == arm and r.get(metric) is not None]
            for arm in ARMS
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
        rows = read_history(path)
        epochs = [r["epoch"] for r in rows]
        style = "-" if name.startswith("iit") else "--"
        ax_val.plot(epochs, [r["val_ppl"] for r in rows], style, marker="o", label=name)
        train = [(r["epoch"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
        ax_train.plot(*zip(*train, strict=True), style, marker="o", label=name)
    ax_val.set(xlabel="epoch", ylabel="validation perplexity", yscale="log")
    ax_train.set(xlabel="epoch", ylabel="training loss (mean since the last validation)")
    for ax in (ax_val, ax_train):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Every (seed, arm) the budget allows, in seed order, ``args.parallel`` runs at a time
    (sharing the GPU); the report, written after each batch of runs."""
    start = time.monotonic()
    deadline = start + args.budget_sec
    report: dict[str, Any] = {"runs": [], "skipped": [], "summary": {}}
    if args.manifest:
        with args.manifest.open() as f:
            report["data_manifest"] = json.load(f)
    sets = parse_sets(args.set)
    report["overrides"], report["concurrent_runs"] = sets, args.parallel
    jobs = [(seed, iit) for seed in args.seeds for iit in (True, False)]
    batches = [jobs[i : i + args.parallel] for i in range(0, len(jobs), args.parallel)]
    # sharing the GPU, a batch of runs takes longer than one run alone: a guess until measured
    walls: list[float] = []
    first_guess = args.run_estimate_sec * (1 + 0.3 * (args.parallel - 1))
    for n, batch in enumerate(batches):
        labels = [f"{'iit' if iit else 'ablation'}-seed{seed}" for seed, iit in batch]
        remaining, need = deadline - time.monotonic(), max(walls, default=first_guess)
        if remaining < need:
            report["skipped"] += [
                f"{label}: {remaining:.0f} s of the budget left, a run takes about {need:.0f} s"
                for batch in batches[n:]
                for label in (f"{'iit' if i else 'ablation'}-seed{s}" for s, i in batch)
            ]
            break
        trains = any(not (args.work / label / "eval.json").exists() for label in labels)
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            futures = [
                pool.submit(one, args.params, args.data, args.work, iit, seed, deadline, sets)
                for seed, iit in batch
            ]
            for label, future in zip(labels, futures, strict=True):
                try:
                    report["runs"].append(future.result() | {"concurrent_runs": len(batch)})
                except RunTimeout as e:
                    report["skipped"].append(f"{label}: {e}")
        if trains:  # runs found complete (resumed) take no time and say nothing of a run's
            walls.append(time.monotonic() - t0)
        report["summary"] = summarise(report["runs"])
        report["total_sec"] = time.monotonic() - start
        write_json(args.out, report)
    report["summary"] = summarise(report["runs"])
    report["total_sec"] = time.monotonic() - start
    write_json(args.out, report)
    if args.plot and report["runs"]:
        plot({r["name"]: args.work / r["name"] / "live" for r in report["runs"]}, args.plot)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--work", type=Path, default=Path("compare-runs"))
    p.add_argument("--out", type=Path, help="the runs and their summary (JSON)")
    p.add_argument("--plot", type=Path, help="also draw every run's curves into this PNG")
    p.add_argument("--manifest", type=Path, help="the download stage's manifest, recorded")
    p.add_argument(
        "--plot-only",
        nargs="+",
        metavar="NAME=LIVE_DIR",
        help="only draw the given runs' DVCLive directories (e.g. copied back from a GPU machine)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of the params file for every run (seed and model.iit are the runs')",
    )
    p.add_argument("--budget-sec", type=float, default=1e9, help="wall-clock budget")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at a time on the one GPU (each run's tokens/s is then a shared GPU's)",
    )
    p.add_argument(
        "--run-estimate-sec",
        type=float,
        default=0.0,
        help="a run's duration before one has been measured (0: start the first run)",
    )
    args = p.parse_args(argv)
    if args.plot_only:
        if args.plot is None:
            p.error("--plot-only needs --plot PNG")
        plot({k: Path(v) for k, v in (item.split("=", 1) for item in args.plot_only)}, args.plot)
        return 0
    if args.params is None or args.data is None or args.out is None:
        p.error("--params, --data and --out are required to run the comparison")
    try:
        parse_sets(args.set)
    except ValueError as e:
        p.error(str(e))
    if args.parallel < 1:
        p.error(f"--parallel {args.parallel} must be at least 1")
    report = compare(args)
    print(json.dumps(report["summary"], indent=2))
    for line in report["skipped"]:
        print(f"skipped {line}", file=sys.stderr)
    return 0 if report["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
