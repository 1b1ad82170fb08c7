"""download + tokenize through DVC in a temporary git repository, and the quickstart."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from infinito.config import SPLITS, load_params, parse_yaml, write_params

pytestmark = pytest.mark.slow


def _set_params(repo: Path, **values: object) -> None:
    """Edit params.yaml in place: dotted keys given with "__" for "." (data__seq_len=128)."""
    write_params(repo / "params.yaml", {k.replace("__", "."): v for k, v in values.items()})


def test_dvc_repro_download_tokenize(dvc_repo: Callable[..., Path], run_cmd: Callable) -> None:
    repo = dvc_repo(overrides={"data.source": "builtin"})
    out = run_cmd(["dvc", "repro", "tokenize"], repo).stdout
    assert "Running stage 'download'" in out and "Running stage 'tokenize'" in out
    manifest = json.loads((repo / "data/raw/manifest.json").read_text())
    meta = json.loads((repo / "data/tokenized/meta.json").read_text())
    assert manifest["source"] == "builtin"
    for split in SPLITS:
        size = (repo / f"data/tokenized/{split}.bin").stat().st_size
        assert meta["splits"][split]["tokens"] == size // 2 > 0
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["download"]["params"]["params.yaml"] == {
        "data.source": "builtin",
        "data.split_fractions": [0.9, 0.05, 0.05],
    }
    assert "params" not in lock["tokenize"]

    out = run_cmd(["dvc", "repro", "tokenize"], repo).stdout
    assert "Running stage" not in out
    assert "didn't change, skipping" in out or "up to date" in out

    # Keys neither stage reads change nothing (check-params, which reads them all, re-runs
    # and writes the same marker).
    _set_params(
        repo, lr=1e-3, epochs=2, model__d_model=64, data__seq_len=128, train__warmup_steps=5
    )
    out = run_cmd(["dvc", "repro", "tokenize"], repo).stdout
    assert re.findall(r"Running stage '([^']+)'", out) == ["check-params"]

    # A key download reads re-runs it, and tokenize after it (the raw splits changed).
    _set_params(repo, data__split_fractions=[0.8, 0.1, 0.1])
    out = run_cmd(["dvc", "repro", "tokenize"], repo).stdout
    assert "Running stage 'download'" in out and "Running stage 'tokenize'" in out
    meta2 = json.loads((repo / "data/tokenized/meta.json").read_text())
    assert meta2["splits"]["validation"]["tokens"] > meta["splits"]["validation"]["tokens"]


def test_exp_run_with_the_seed_flags(dvc_repo: Callable[..., Path], run_cmd: Callable) -> None:
    """``dvc exp run -S lr=2e-4 -S batch_size=32 ...`` works verbatim; params.yaml still loads."""
    repo = dvc_repo(overrides={"data.source": "builtin"})
    flags = ["-S", "lr=2e-4", "-S", "batch_size=32", "-S", "epochs=5", "-S", "lambda_phi=0"]
    run_cmd(["dvc", "exp", "run", "-n", "flags", *flags, "tokenize"], repo)
    p = load_params(repo / "params.yaml")
    assert (p.lr, p.batch_size, p.epochs, p.lambda_phi) == (2e-4, 32, 5, 0.0)
    out = run_cmd(["dvc", "exp", "run", "-n", "small-lr", "-S", "lr=1e-5", "tokenize"], repo).stdout
    # lr is read by neither stage: only check-params, which reads every key, re-runs
    assert re.findall(r"Running stage '([^']+)'", out) == ["check-params"]
    assert "lr: 1e-05" in (repo / "params.yaml").read_text()  # the form plain PyYAML misreads
    assert load_params(repo / "params.yaml").lr == 1e-5


def test_quickstart_in_a_fresh_repo_without_git_identity(
    dvc_repo: Callable[..., Path], run_cmd: Callable, tmp_path: Path
) -> None:
    repo = dvc_repo(git_identity=False)  # the seed configuration: a WikiText source
    home = tmp_path / "home"
    home.mkdir()
    env: dict[str, str | None] = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_GLOBAL": str(home / "gitconfig"),  # an empty global config
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = env[f"GIT_{role}_EMAIL"] = None
    who = run_cmd(["git", "config", "user.name"], repo, env=env, check=False)
    assert who.returncode != 0 and not who.stdout.strip()  # really no identity

    quickstart = [sys.executable, "-m", "pipelines.quickstart", "--target", "tokenize"]
    run_cmd(quickstart, repo, env=env)
    meta = json.loads((repo / "data/tokenized/meta.json").read_text())
    assert all(meta["splits"][s]["tokens"] > 0 for s in SPLITS)
    assert json.loads((repo / "data/raw/manifest.json").read_text())["source"] == "builtin"
    committed = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    assert parse_yaml(committed, "HEAD:params.yaml")["data"]["source"] == "wikitext-2-raw-v1"
    assert load_params(repo / "params.yaml").data.source == "builtin"
    names = run_cmd(["dvc", "exp", "list", "--name-only"], repo, env=env).stdout.split()
    assert names == ["quickstart"]
    author = subprocess.run(
        ["git", "log", "-1", "--format=%an", "--glob=refs/exps/*/quickstart"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert author == "INFINITO quickstart"

    out = run_cmd(quickstart, repo, env=env).stdout
    assert "Running stage" not in out  # everything cached; the experiment is replaced
    assert run_cmd(["dvc", "exp", "list", "--name-only"], repo, env=env).stdout.split() == [
        "quickstart"
    ]
