"""The memory study: does a PHI-guided memory, shared or per stream, beat more attention span?

Five arms at one scale on real WikiText-2 (the train split for training, the first articles of
validation for the train stage's validation, the first articles of test for the numbers; see
``ARTICLES``), two seeds each by default:

1. ``ablation-T``: ``model.iit: false`` at context T;
2. ``shared-seed``: the IIT model with the seed's memory rules (absolute threshold, no write
   budget), one shared memory;
3. ``shared``: the IIT model with the PHI-guided rules (standardised threshold, write budget),
   one shared memory;
4. ``stream``: as 3, one memory per stream (``model.memory_scope: stream``);
5. ``ablation-2T``: the ablation at context 2T, for as many training tokens.

Everything goes through the stages' own code, as ``dvc.yaml`` runs it: ``python -m
infinito.data.download`` (``data.source`` = the study's copy of ``--source``) and ``python -m
infinito.data.tokenize`` once, then per run ``python -m infinito.train`` and ``python -m
infinito.evaluate`` with that run's params file (this checkout's ``params.yaml`` with the study's
overrides). A run whose metrics exist is skipped, so an interrupted study resumes. The result
(every run's ``metrics/eval.json`` and ``metrics/train.json`` numbers, per-arm means and
standard deviations under the same keys, Welch's t-tests between arms, wall times) is written to
``--out``::

    nice -n 10 env OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python scripts/memory_study.py \\
        --source ../shared/data/wikitext-2 --work ../memory-study \\
        --out docs/results/memory-scope-cpu.json

docs/memory.md shows the table and what it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scipy import stats

from infinito.atomic import write_json
from infinito.config import load_params, write_params
from infinito.data.download import is_wikitext_title

REPO_ROOT = Path(__file__).resolve().parents[1]
T = 64  # the context of every arm but the last
STEPS = 200  # optimizer steps at context T; the 2T arm takes half as many, as many tokens
# Articles of WikiText-2's validation and test splits the study scores (of 60 each; all of
# train is read): the four evaluation passes of each IIT run over the whole test split alone
# would take hours on a shared 2-core CPU.
ARTICLES = {"validation": 9, "test": 15}

# The scale, the same for every arm (the arms below change only what they are about).
BASE: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 16,
    "lr": 1.0e-3,
    "lambda_phi": 0.1,
    "data.seq_len": T,
    "model.d_model": 64,
    "model.n_layer": 2,
    "model.n_head": 4,
    "model.block_size": T,
    "model.memory_slots": 64,
    "model.phi_chunk": 16,
    "train.max_steps": STEPS,
    "train.warmup_steps": 30,
    "train.log_every": 50,
    "train.device": "cpu",
    "train.precision": "fp32",
    "train.compile": False,
    "evaluate.batch_size": 16,  # = batch_size: the stream layout of evaluation is training's
    "evaluate.splits": ["test"],
}
SEED_RULES = {"model.threshold_mode": "absolute", "model.memory_write_fraction": 1.0}
ARMS: dict[str, dict[str, Any]] = {
    "ablation-T": {"model.iit": False},
    "shared-seed": {"model.memory_scope": "shared", **SEED_RULES},
    "shared": {"model.memory_scope": "shared"},
    "stream": {"model.memory_scope": "stream"},
    "ablation-2T": {
        "model.iit": False,
        "data.seq_len": 2 * T,
        "model.block_size": 2 * T,
        "train.max_steps": STEPS // 2,
    },
}
# Comparisons tested with Welch's t (a, b): a's mean minus b's.
COMPARISONS = (
    ("shared-seed", "ablation-T"),
    ("shared", "ablation-T"),
    ("stream", "ablation-T"),
    ("shared", "shared-seed"),
    ("stream", "shared"),
    ("stream", "ablation-2T"),
    ("ablation-2T", "ablation-T"),
)
TESTED = ("test_ppl", "test_sliding_ppl", "test_ppl_no_memory", "test_sliding_ppl_no_memory")
TRAIN_KEYS = (
    "best_val_ppl",
    "tokens_per_sec",
    "wall_time_sec",
    "steps",
    "tokens_trained",
    "iit_threshold",
    "iit_memory_utilisation",
    "iit_memory_accepted_fraction",
    "iit_memory_written_fraction",
    "iit_memory_evicted_age",
)


def run(cmd: list[str], log: Path) -> float:
    """Run a stage command (its output appended to ``log``); returns its wall time."""
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    return time.perf_counter() - t0


def run_params(path: Path, overrides: dict[str, Any]) -> None:
    """This checkout's params.yaml with ``overrides`` (as ``dvc exp run -S`` edits it),
    validated before any stage reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_params(path, overrides, base=REPO_ROOT / "params.yaml")
    load_params(path)


def corpus(source: Path, dest: Path) -> Path:
    """WikiText-2 as the study reads it: the whole train file, the first ``ARTICLES`` articles
    of the validation and test files (cut before the next article's title line)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, split in (("train.txt", "train"), ("valid.txt", "validation"), ("test.txt", "test")):
        text = (source / name).read_text(encoding="utf-8")
        lines = text.split("\n")
        if split in ARTICLES:
            titles = [
                i
                for i, line in enumerate(lines)
                if is_wikitext_title(line) and i > 0 and not lines[i - 1].strip()
            ]
            if len(titles) > ARTICLES[split]:  # up to the blank line before the next title
                text = "\n".join(lines[: titles[ARTICLES[split]] - 1]) + "\n"
        (dest / name).write_text(text, encoding="utf-8")
    return dest


def prepare_data(source: Path, work: Path) -> Path:
    """The study's corpus through the download and tokenize stages, once; returns the
    tokenized directory."""
    tokenized = work / "data" / "tokenized"
    if (tokenized / "meta.json").is_file():
        return tokenized
    params = work / "data" / "params.yaml"
    text = corpus(source, work / "data" / "wikitext-2-study")
    run_params(params, {**BASE, "data.source": str(text.resolve())})
    py, log = sys.executable, work / "data" / "stages.log"
    raw = work / "data" / "raw"
    run([py, "-m", "infinito.data.download", "--params", str(params), "--out", str(raw)], log)
    run([py, "-m", "infinito.data.tokenize", "--raw", str(raw), "--out", str(tokenized)], log)
    return tokenized


def one(arm: str, seed: int, data: Path, work: Path) -> dict[str, Any]:
    """Train and evaluate one arm at one seed (skipped when its metrics exist)."""
    d = work / f"{arm}-seed{seed}"
    metrics = d / "metrics"
    done = metrics / "wall.json"
    if not done.is_file():
        params = d / "params.yaml"
        run_params(params, {**BASE, **ARMS[arm], "seed": seed})
        py, log = sys.executable, d / "stages.log"
        train = [
            *(py, "-m", "infinito.train", "--params", str(params), "--data", str(data)),
            *("--out", str(d / "models" / "best"), "--state", str(d / "checkpoints")),
            *("--metrics", str(metrics / "train.json")),
            *("--live", str(d / "dvclive"), "--stale-state", "discard"),
        ]
        evaluate = [
            *(py, "-m", "infinito.evaluate", "--params", str(params)),
            *("--model", str(d / "models" / "best"), "--data", str(data)),
            *("--metrics", str(metrics / "eval.json")),
        ]
        wall = {"train_sec": run(train, log), "evaluate_sec": run(evaluate, log)}
        write_json(done, wall)
    read = {name: json.loads((metrics / f"{name}.json").read_text()) for name in ("train", "eval")}
    wall = json.loads(done.read_text())
    return {"arm": arm, "seed": seed, **read, "wall_sec": wall}


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def summarise(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per arm: mean, std and values of every numeric eval.json key (same names) and of the
    train stage's headline keys (``train_`` prefixed); Welch's t between arms on TESTED."""
    summary: dict[str, Any] = {}
    for arm in ARMS:
        members = [r for r in runs if r["arm"] == arm]
        if not members:
            continue
        row: dict[str, Any] = {}
        for key in members[0]["eval"]:
            vals = [r["eval"].get(key) for r in members]
            if all(isinstance(v, int | float) and math.isfinite(v) for v in vals):
                row[key] = _mean_std([float(v) for v in vals])
        for key in TRAIN_KEYS:
            vals = [r["train"].get(key) for r in members]
            if all(isinstance(v, int | float) and math.isfinite(v) for v in vals):
                row[f"train_{key}"] = _mean_std([float(v) for v in vals])
        summary[arm] = row
    tests = []
    for a, b in COMPARISONS:
        for metric in TESTED:
            xa = summary.get(a, {}).get(metric, {}).get("values", [])
            xb = summary.get(b, {}).get(metric, {}).get("values", [])
            if len(xa) < 2 or len(xb) < 2:
                continue
            res = stats.ttest_ind(xa, xb, equal_var=False)
            tests.append(
                {
                    "a": a,
                    "b": b,
                    "metric": metric,
                    "diff": statistics.fmean(xa) - statistics.fmean(xb),
                    "welch_t": float(res.statistic),
                    "p_value": float(res.pvalue),
                }
            )
    return summary, tests


TABLE = (  # (column, summary key)
    ("test ppl", "test_ppl"),
    ("reads off", "test_ppl_no_memory"),
    ("sliding ppl", "test_sliding_ppl"),
    ("sliding, reads off", "test_sliding_ppl_no_memory"),
    ("best val ppl", "train_best_val_ppl"),
    ("memory utilisation", "test_memory_utilisation"),
    ("accepted (test)", "test_memory_accepted_fraction"),
    ("accepted (training)", "train_iit_memory_accepted_fraction"),
    ("evicted age (test)", "test_memory_evicted_age"),
    ("threshold", "iit_threshold"),
    ("train tokens/s", "train_tokens_per_sec"),
)


def table(summary: dict[str, Any]) -> str:
    """The per-arm means ± standard deviations as a Markdown table (- where not measured)."""

    def cell(arm: str, key: str) -> str:
        v = summary.get(arm, {}).get(key)
        if v is None:
            return "-"
        digits = 3 if abs(v["mean"]) < 10 else 1
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    head = "| arm | " + " | ".join(name for name, _ in TABLE) + " |"
    rule = "|---" * (len(TABLE) + 1) + "|"
    rows = [f"| {arm} | " + " | ".join(cell(arm, k) for _, k in TABLE) + " |" for arm in summary]
    return "\n".join([head, rule, *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="the WikiText-2 folder")
    p.add_argument("--work", type=Path, required=True, help="runs and data (outside the repo)")
    p.add_argument("--out", type=Path, required=True, help="the study's JSON")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.source, args.work)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(one(arm, seed, data, args.work))
            summary, tests = summarise(runs)
            report = {
                "command": " ".join(
                    ["nice -n 10 env OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python", *sys.argv]
                ),
                "scale": BASE,
                "articles_scored": ARTICLES,
                "arms": ARMS,
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "threads": os.environ.get("OMP_NUM_THREADS"),
                },
                "study_wall_sec_this_session": time.perf_counter() - t0,
                "runs": runs,
                "summary": summary,
                "welch": tests,
                "table": table(summary),
            }
            write_json(args.out, report)
    print(table(summarise(runs)[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
