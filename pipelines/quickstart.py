"""``python -m pipelines.quickstart``: the pipeline on CPU, offline, on the builtin corpus.

It runs ``dvc exp run --name quickstart -S data.source=builtin -S ... <TARGET>`` in the
repository root, so:

- the committed ``params.yaml`` stays the seed configuration; the quickstart's overrides live in
  the workspace and in the DVC experiment ``quickstart`` (``dvc exp show`` lists it;
  ``git checkout params.yaml`` returns the workspace to the seed configuration);
- DVC caches every stage, so a second run re-executes nothing that is up to date; an earlier
  ``quickstart`` experiment of the same commit is replaced.

``dvc exp run`` commits the experiment with git: when git has no user name or email configured
(a fresh machine or CI), a neutral identity is passed through ``GIT_AUTHOR_*``/``GIT_COMMITTER_*``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from infinito.config import ConfigError, load_params

# The quickstart's configuration: the offline corpus and a model small enough for a CPU.
QUICKSTART_OVERRIDES: dict[str, Any] = {"data.source": "builtin", "model.d_model": 64}
EXPERIMENT = "quickstart"
TARGET = "tokenize"  # the last stage the pipeline runs so far
FALLBACK_IDENTITY = {"NAME": "INFINITO quickstart", "EMAIL": "quickstart@infinito.invalid"}


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
    for key in ("NAME", "EMAIL"):
        configured = subprocess.run(
            ["git", "config", f"user.{key.lower()}"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        if not configured:
            for role in ("AUTHOR", "COMMITTER"):
                if not env.get(f"GIT_{role}_{key}"):
                    env[f"GIT_{role}_{key}"] = FALLBACK_IDENTITY[key]
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.quickstart", description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="repository root")
    parser.add_argument("--name", default=EXPERIMENT, help="DVC experiment name")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    try:  # the overrides must give valid params before DVC touches anything
        load_params(repo / "params.yaml", overrides=QUICKSTART_OVERRIDES)
    except ConfigError as e:
        print(f"quickstart: error: {e}", file=sys.stderr)
        return 1
    env = command_env(repo)
    dvc = [sys.executable, "-m", "dvc"]
    existing = subprocess.run(
        [*dvc, "exp", "list", "--name-only"], cwd=repo, env=env, capture_output=True, text=True
    ).stdout.split()
    if args.name in existing:  # re-running replaces the earlier quickstart of this commit
        subprocess.run([*dvc, "exp", "remove", args.name], cwd=repo, env=env, check=True)
    cmd = [*dvc, "exp", "run", "--name", args.name, *set_param_args(QUICKSTART_OVERRIDES), TARGET]
    print("quickstart:", " ".join(cmd[2:]), flush=True)
    rc = subprocess.run(cmd, cwd=repo, env=env).returncode
    if rc:
        print(f"quickstart: dvc exp run failed (exit {rc})", file=sys.stderr)
        return rc
    print(
        f"quickstart: done; outputs in data/, experiment {args.name!r} in `dvc exp show`. The "
        f"workspace params.yaml carries the quickstart overrides; `git checkout params.yaml` "
        f"restores the seed configuration."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
