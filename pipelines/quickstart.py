"""``python -m pipelines.quickstart``: the whole pipeline on CPU, offline, on the builtin corpus.

It runs ``dvc exp run --name quickstart -S data.source=builtin -S ...`` (the overrides below) in
the repository root, then points at the metrics, the samples and the plots. So:

- the committed ``params.yaml`` stays the seed configuration; the quickstart's overrides are
  visible in the workspace ``params.yaml`` (``git diff params.yaml``) and in the DVC experiment
  ``quickstart`` (``dvc exp show``); ``git checkout params.yaml`` returns the workspace to the
  seed configuration, which the next ``dvc repro`` then runs;
- DVC caches every stage, so a second run re-executes nothing that is up to date; an earlier
  ``quickstart`` experiment of the same commit is replaced.

The model is a small INFINITO (2 layers, d_model 64, context 64) trained for 120 steps of 8
windows, about half a pass over the builtin corpus: minutes on two CPU cores, and nothing like
the seed's quality.

``dvc exp run`` commits the experiment with git: when git has no user name or email configured
(a fresh machine or CI), a neutral identity is passed through ``GIT_AUTHOR_*``/``GIT_COMMITTER_*``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from infinito.config import ConfigError, load_params, read_yaml

# The quickstart's configuration: the offline corpus, a model small enough for a CPU, and a
# light benchmark grid. Every other key keeps its params.yaml value.
QUICKSTART_OVERRIDES: dict[str, Any] = {
    "data.source": "builtin",
    "data.seq_len": 64,
    "epochs": 1,
    "batch_size": 8,
    "lr": 1.0e-3,
    "model.d_model": 64,
    "model.n_layer": 2,
    "model.n_head": 4,
    "model.block_size": 64,
    "model.memory_slots": 64,
    "model.phi_chunk": 16,
    "train.max_steps": 120,  # about half an epoch of the builtin corpus
    "train.warmup_steps": 10,
    "train.eval_every_steps": 30,  # a few points on the training curves
    "train.log_every": 20,
    "train.device": "cpu",
    "train.compile": False,
    "evaluate.batch_size": 16,
    "generate.max_new_tokens": 32,
    "generate.samples_per_prompt": 1,
    "benchmark.batch_sizes": [1],
    "benchmark.prompt_lengths": [16],
    "benchmark.new_tokens": 16,
    "benchmark.repeats": 2,
    "benchmark.hf_reference": False,
}
EXPERIMENT = "quickstart"
FALLBACK_IDENTITY = {"NAME": "INFINITO quickstart", "EMAIL": "quickstart@infinito.invalid"}
# Headline numbers printed at the end, by metrics file (those present are shown).
HEADLINE: dict[str, tuple[str, ...]] = {
    "metrics/train.json": ("best_val_ppl", "steps", "tokens_per_sec", "wall_time_sec"),
    "metrics/eval.json": ("validation_ppl", "test_ppl", "test_bits_per_byte"),
    "metrics/generate.json": ("distinct_2", "repeated_4gram_rate"),
}


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """``-S key=value`` arguments; values are written as YAML scalars, as DVC parses them."""
    args: list[str] = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        args += ["-S", f"{key}={text}"]
    return args


def command_env(repo: Path) -> dict[str, str]:
    """Environment for the DVC run: this interpreter first on PATH, CPU only, no Hub access."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""  # the quickstart promises CPU, even on a GPU machine
    env["HF_HUB_OFFLINE"] = "1"  # nothing in the quickstart may reach the network
    env.setdefault("DVC_NO_ANALYTICS", "1")
    for key in ("NAME", "EMAIL"):
        configured = subprocess.run(
            ["git", "config", f"user.{key.lower()}"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        if not configured:
            for role in ("AUTHOR", "COMMITTER"):
                env.setdefault(f"GIT_{role}_{key}", FALLBACK_IDENTITY[key])
    return env


def outputs(repo: Path) -> dict[str, list[str]]:
    """Metrics files, plot files and the samples file, as dvc.yaml declares them."""
    spec = read_yaml(repo / "dvc.yaml") or {}
    found: dict[str, list[str]] = {"metrics": [], "plots": [], "samples": []}

    def paths(entries: list[Any] | None) -> list[str]:
        return [p for e in entries or [] for p in ([e] if isinstance(e, str) else list(e))]

    for stage in (spec.get("stages") or {}).values():
        found["metrics"] += paths(stage.get("metrics"))
        found["plots"] += paths(stage.get("plots"))
        found["samples"] += [p for p in paths(stage.get("outs")) if p.endswith(".md")]
    return found


def summary(repo: Path, name: str, seconds: float) -> str:
    """What the run produced and where to look next."""
    out = outputs(repo)
    lines = [f"quickstart: done in {seconds / 60:.1f} min; experiment {name!r} (dvc exp show)", ""]
    for file, keys in HEADLINE.items():
        path = repo / file
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text(encoding="utf-8"))
        shown = [f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), int | float)]
        if shown:
            lines.append(f"  {file}: {'  '.join(shown)}")
    existing = {kind: [p for p in ps if (repo / p).exists()] for kind, ps in out.items()}
    lines += [
        "",
        f"metrics:  {' '.join(existing['metrics'])}   (all of them: dvc metrics show)",
        f"samples:  {' '.join(existing['samples'])}",
        f"plots:    {' '.join(existing['plots'])}   (drawn: dvc plots show)",
        "compare:  dvc metrics diff   (against the committed baseline: docs/experiments.md)",
        "",
        "params.yaml now holds the quickstart's overrides (git diff params.yaml); "
        "git checkout params.yaml returns to the seed configuration.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="repository root")
    parser.add_argument("--name", default=EXPERIMENT, help="DVC experiment name")
    parser.add_argument(
        "--target", default=None, help="run only up to this dvc.yaml stage (default: all)"
    )
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    try:  # the overrides must give valid params before DVC touches anything
        load_params(repo / "params.yaml", overrides=QUICKSTART_OVERRIDES)
    except ConfigError as e:
        print(f"quickstart: error: {e}", file=sys.stderr)
        return 1
    started = time.monotonic()
    env = command_env(repo)
    dvc = [sys.executable, "-m", "dvc"]
    existing = subprocess.run(
        [*dvc, "exp", "list", "--name-only"], cwd=repo, env=env, capture_output=True, text=True
    ).stdout.split()
    if args.name in existing:  # re-running replaces the earlier quickstart of this commit
        subprocess.run([*dvc, "exp", "remove", args.name], cwd=repo, env=env, check=True)
    cmd = [*dvc, "exp", "run", "--name", args.name, *set_param_args(QUICKSTART_OVERRIDES)]
    if args.target:
        cmd.append(args.target)
    print("quickstart:", " ".join(["dvc", *cmd[3:]]), flush=True)
    rc = subprocess.run(cmd, cwd=repo, env=env).returncode
    if rc:
        print(f"quickstart: dvc exp run failed (exit {rc})", file=sys.stderr)
        return rc
    print(summary(repo, args.name, time.monotonic() - started), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
