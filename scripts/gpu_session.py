"""One GPU session, in a wall-clock budget: the speed check, then the seed runs on WikiText-2.

Here, with the tokenizer (CPU, once)::

    python scripts/gpu_session.py prepare            # .device/wikitext-2: raw manifest + tokens

runs the download stage on ``../shared/data/wikitext-2`` (``data.source`` = that folder; the
manifest records the input files' SHA-256 and recognises WikiText-2 v1) and the tokenize stage,
into ``.device/wikitext-2/{raw,tokenized}`` (the raw text itself is left out: the GPU machine
needs only the tokens). ``--wheels`` also fetches, into ``.whl/``, the pure-Python wheels the
GPU machine lacks (liger-kernel for the Liger variant, ruamel.yaml for the params reader).

On the GPU machine (docs/speed.md gives the exact ``run`` command and its ``carry`` list)::

    python3 scripts/gpu_session.py run --out "$OUT" --budget-sec 560

1. checks the imports, the device and the data (a failure costs seconds, not the lease);
2. ``scripts/gpu_check.py``: every speed variant the speed share of the budget fits
   (``$OUT/gpu-speed.json``, log ``$OUT/gpu-check.log``);
3. ``scripts/gpu_compare.py``: the committed seed configuration (``params.yaml``), IIT model
   and ablation, seeds 1, 2, ... in turn, as many as the rest of the budget fits, through the
   train and evaluate stages (``$OUT/wikitext-2-seed.json``, ``$OUT/wikitext-2-seed.png``, log
   ``$OUT/seed-runs.log``), the two arms of a seed at the same time (``--parallel 2``: more
   seeds in a short lease; the speed check, alone on the GPU, gives the speed figures); runs
   still going at the deadline are stopped, so both files are written in time;
4. prints both tables. ``$OUT/session.json`` records the phases and their times.

The runs' directories are ``.device/runs`` (ignored by git): a second call on the same warm
machine with ``--skip-speed`` resumes the comparison where the first stopped. ``--tiny`` is
the same session at toy size on CPU, on the first lines of each real WikiText-2 split
(``prepare --tiny`` makes them): an end-to-end check of the script, never a result
(docs/results/ holds GPU results only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_2 = REPO.parent / "shared" / "data" / "wikitext-2"
DEVICE_DIR = REPO / ".device"
WHEELS = ("liger-kernel==0.8.5", "ruamel.yaml==0.19.1")  # pure Python: one wheel each
EPOCHS_GUESS = 12  # a run's epochs before the first one is measured (early stopping, patience 3)
SPEED_SHARE, SPEED_MAX_SEC = 0.3, 170.0  # of the budget, for the speed check
RESERVE_SEC = 15.0  # for the closing tables and files
KILL_GRACE_SEC = 10.0  # past a phase's deadline before its processes are stopped
# --tiny: toy dimensions, a few steps, the real text's first lines (a check, not a result)
TINY_LINES = {"train.txt": 3000, "valid.txt": 300, "test.txt": 300}
TINY_OVERRIDES: dict[str, Any] = {
    "epochs": 2,
    "data.seq_len": 64,
    "model.d_model": 64,
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.block_size": 64,
    "model.memory_slots": 16,
    "model.phi_chunk": 16,
    "train.max_steps": 24,
    "train.eval_every_steps": 8,
    "train.warmup_steps": 4,
    "train.device": "cpu",
    "train.compile": False,
}


def _stage(module: str, *args: str) -> None:
    cmd = [sys.executable, "-m", module, *args]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def prepare(source: Path, dest: Path, tiny: bool) -> dict[str, Any]:
    """The download and tokenize stages on ``source`` into ``dest``/{raw,tokenized}."""
    from infinito.config import write_params

    with tempfile.TemporaryDirectory() as tmp:
        corpus = source
        if tiny:  # the first lines of each split: real text, toy size
            corpus = Path(tmp) / "corpus"
            corpus.mkdir()
            for name, n in TINY_LINES.items():
                with (source / name).open(encoding="utf-8") as f:
                    lines = [next(f) for _ in range(n)]
                (corpus / name).write_text("".join(lines), encoding="utf-8")
        params = Path(tmp) / "params.yaml"
        write_params(params, {"data.source": str(corpus.resolve())}, base=REPO / "params.yaml")
        raw = Path(tmp) / "raw"
        _stage("infinito.data.download", "--params", str(params), "--out", str(raw))
        _stage("infinito.data.tokenize", "--raw", str(raw), "--out", str(dest / "tokenized.new"))
        (dest / "raw").mkdir(parents=True, exist_ok=True)
        shutil.copy2(raw / "manifest.json", dest / "raw" / "manifest.json")
    if (dest / "tokenized").exists():
        shutil.rmtree(dest / "tokenized")
    (dest / "tokenized.new").rename(dest / "tokenized")
    with (dest / "raw" / "manifest.json").open() as f:
        return json.load(f)


def fetch_wheels(dest: Path) -> None:
    """Pure-Python wheels for the GPU machine's Python 3.12, without their dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "py", "-d", str(dest), *WHEELS]
    subprocess.run(cmd, check=True)


def preflight(data: Path, tiny: bool) -> dict[str, Any]:
    """Imports, device and data, before any of the budget is spent on training."""
    import matplotlib  # noqa: F401  (curves)
    import scipy  # noqa: F401  (Welch's t-test)
    import torch

    import infinito.evaluate  # noqa: F401
    import infinito.train  # noqa: F401
    from infinito.config import load_params
    from infinito.data.splits import read_meta

    load_params(REPO / "params.yaml")
    cuda = torch.cuda.is_available()
    if not cuda and not tiny:
        raise SystemExit("gpu_session: no CUDA device visible (use --tiny for a CPU check)")
    meta = read_meta(data / "tokenized")
    info = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "train_tokens": meta["splits"]["train"]["tokens"],
    }
    try:
        import liger_kernel  # noqa: F401

        info["liger_kernel"] = True
    except ImportError:
        info["liger_kernel"] = False
    return info


def _script(name: str, args: list[str], log: Path, deadline: float) -> int:
    """Run ``scripts/NAME`` with its output in ``log``; its whole process group is stopped
    ``KILL_GRACE_SEC`` after ``deadline`` if the script's own budget guard has not ended it."""
    cmd = [sys.executable, str(REPO / "scripts" / name), *args]
    print("+", " ".join(cmd), f"> {log}", file=sys.stderr, flush=True)
    with log.open("wb") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=max(1.0, deadline + KILL_GRACE_SEC - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"gpu_session: {name} stopped at the deadline", file=sys.stderr)
            return -signal.SIGKILL


def run_estimate(speed: dict[str, Any]) -> float:
    """Seconds for one seed run, from the speed check (``EPOCHS_GUESS`` epochs; 240 without)."""
    r = speed.get("variants", {}).get("iit-chunked-default", {})
    if "step_ms" not in r:
        return 240.0
    epoch = speed["steps_per_epoch"] * r["step_ms"] / 1000 + speed["validation_pass_sec_iit"]
    evaluate = 14 * speed["validation_pass_sec_iit"]  # 2 splits x 3 window passes x 2, and load
    return r["compile_sec"] + EPOCHS_GUESS * epoch + evaluate + 20.0


def session(args: argparse.Namespace) -> int:
    start = time.monotonic()
    deadline = start + args.budget_sec
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or DEVICE_DIR / ("wikitext-2-tiny" if args.tiny else "wikitext-2")
    record: dict[str, Any] = {"budget_sec": args.budget_sec, "tiny": args.tiny, "phases": {}}

    def phase(name: str, t0: float, **extra: Any) -> None:
        record["phases"][name] = {"sec": time.monotonic() - t0, **extra}
        (out / "session.json").write_text(json.dumps(record, indent=2))

    t0 = time.monotonic()
    record["environment"] = preflight(data, args.tiny)
    phase("preflight", t0)

    t0 = time.monotonic()
    speed: dict[str, Any] = {}
    if not args.skip_speed:
        speed_budget = SPEED_SHARE * args.budget_sec
        if not args.tiny:  # the seed runs need the rest of a lease
            speed_budget = min(args.speed_sec, speed_budget)
        speed_args = ["--data", str(data / "tokenized"), "--out", str(out / "gpu-speed.json")]
        speed_args += ["--budget-sec", f"{speed_budget:.0f}"]
        if args.tiny:
            speed_args += ["--smoke", "--steps", "12", "--warmup", "3", "--variants"]
            speed_args += ["iit-full-default", "iit-chunked-default", "ablation-chunked-eager"]
        rc = _script("gpu_check.py", speed_args, out / "gpu-check.log", start + speed_budget)
        if (out / "gpu-speed.json").exists():
            speed = json.loads((out / "gpu-speed.json").read_text())
        phase("speed", t0, rc=rc)

    t0 = time.monotonic()
    overrides = dict(TINY_OVERRIDES) if args.tiny else {}
    if args.seed_compile:
        overrides["train.compile"] = args.seed_compile
    seeds_budget = deadline - time.monotonic() - RESERVE_SEC
    estimate = args.run_estimate_sec or (run_estimate(speed) if not args.tiny else 0.0)
    compare_args = ["--params", str(REPO / "params.yaml"), "--data", str(data / "tokenized")]
    work = args.work or DEVICE_DIR / ("runs-tiny" if args.tiny else "runs")
    compare_args += ["--work", str(work)]
    compare_args += ["--out", str(out / "wikitext-2-seed.json")]
    compare_args += ["--plot", str(out / "wikitext-2-seed.png")]
    compare_args += ["--manifest", str(data / "raw" / "manifest.json")]
    compare_args += ["--seeds", *map(str, args.seeds), "--budget-sec", f"{seeds_budget:.0f}"]
    compare_args += ["--run-estimate-sec", f"{estimate:.0f}", "--parallel", str(args.parallel)]
    compare_args += ["--set", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
    rc = _script("gpu_compare.py", compare_args, out / "seed-runs.log", deadline - RESERVE_SEC)
    phase("seed_runs", t0, rc=rc, run_estimate_sec=estimate)
    record["total_sec"] = time.monotonic() - start
    (out / "session.json").write_text(json.dumps(record, indent=2))
    print(closing_tables(out))
    return 0 if rc == 0 else 1


def closing_tables(out: Path) -> str:
    """The two results in brief: speed per variant, then perplexities per run and the t-test."""
    lines: list[str] = []
    if (out / "gpu-speed.json").exists():
        speed = json.loads((out / "gpu-speed.json").read_text())
        lines.append(f"speed on {speed['device']} (torch {speed['torch']}):")
        for name, r in speed["variants"].items():
            if "tokens_per_sec" in r:
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
                lines.append(
                    f"  {name:<34} {r['tokens_per_sec']:>10,.0f} tok/s {r['step_ms']:7.2f} ms "
                    f"MFU {mfu:>6} 20 ep {r['projected_20_epochs_training_sec']:7.1f} s"
                )
            else:
                lines.append(f"  {name:<34} {r.get('skipped') or r.get('error', '')[:80]}")
    if (out / "wikitext-2-seed.json").exists():
        seed = json.loads((out / "wikitext-2-seed.json").read_text())
        lines.append("seed runs:")
        for r in seed["runs"]:
            lines.append(
                f"  {r['name']:<16} val {r['validation_ppl']:8.2f} test {r['test_ppl']:8.2f} "
                f"sliding {r['test_sliding_ppl']:8.2f} best epoch {r['best_epoch']:g} of "
                f"{r['epochs_completed']:g}, {r['tokens_per_sec']:,.0f} tok/s"
            )
        row = seed["summary"].get("test_ppl", {})
        if "welch_t" in row:
            lines.append(
                f"  test ppl: IIT {row['iit_mean']:.2f} ± {row['iit_std']:.2f} (n={row['iit_n']})"
                f", ablation {row['ablation_mean']:.2f} ± {row['ablation_std']:.2f} "
                f"(n={row['ablation_n']}), Welch t {row['welch_t']:.2f}, p {row['p_value']:.3f}"
            )
        lines.extend(f"  skipped {s}" for s in seed["skipped"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize WikiText-2 into .device/ (here, once)")
    prep.add_argument("--source", type=Path, default=WIKITEXT_2)
    prep.add_argument("--dest", type=Path)
    prep.add_argument("--tiny", action="store_true", help="the first lines of each split only")
    prep.add_argument("--wheels", action="store_true", help="also fetch .whl/ for the GPU machine")
    go = sub.add_parser("run", help="the session (on the GPU machine)")
    go.add_argument("--out", type=Path, required=True, help="results folder ($OUT)")
    go.add_argument("--budget-sec", type=float, default=560.0, help="the whole session's wall time")
    go.add_argument("--data", type=Path, help="prepared folder (default .device/wikitext-2)")
    go.add_argument("--work", type=Path, help="the runs' directories (default .device/runs)")
    go.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 9)))
    go.add_argument("--seed-compile", help="train.compile for the seed runs (default: params)")
    go.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="seed runs at a time on the GPU (2: both arms of a seed together)",
    )
    go.add_argument("--tiny", action="store_true", help="toy size on CPU: checks the session")
    go.add_argument(
        "--speed-sec",
        type=float,
        default=SPEED_MAX_SEC,
        help=f"the speed check's seconds (at most {SPEED_SHARE} of the budget)",
    )
    go.add_argument(
        "--skip-speed",
        action="store_true",
        help="seed runs only (a second call on a warm machine: finished runs are reused)",
    )
    go.add_argument(
        "--run-estimate-sec",
        type=float,
        default=0.0,
        help="one seed run's seconds (default: from the speed check, or 240 s without it)",
    )
    args = parser.parse_args(argv)
    if args.command == "prepare":
        dest = args.dest or DEVICE_DIR / ("wikitext-2-tiny" if args.tiny else "wikitext-2")
        manifest = prepare(args.source, dest, args.tiny)
        print(f"prepared {dest}: dataset {manifest['dataset']}, {manifest['origin']}")
        if args.wheels:
            fetch_wheels(REPO / ".whl")
        return 0
    return session(args)


if __name__ == "__main__":
    sys.exit(main())
