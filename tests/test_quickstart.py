"""The quickstart command of the README and docs/quickstart.md in a fresh clone, as on a fresh
machine: no git identity, no network, CPU only. It reuses this checkout's virtualenv (a
symlink, with make told that the setup step is done) instead of installing a new one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from infinito.config import load_params
from pipelines.quickstart import QUICKSTART_OVERRIDES

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_TIMEOUT_S = 1200


def first_command(section: str, where: str) -> str:
    """The first command in the first ```bash block of ``section``."""
    block = re.search(r"```(?:bash|sh)\n(.*?)```", section, re.S)
    assert block, f"{where} has no ```bash block"
    commands = [ln.split("#")[0].strip() for ln in block.group(1).splitlines()]
    return next(c for c in commands if c)


def readme_quickstart_command() -> str:
    """The first command in the code block of the README's quickstart section."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("<!-- section: quickstart -->", 1)[1].split("<!-- section:", 1)[0]
    return first_command(section, "the README's quickstart section")


def test_readme_quickstart_command_is_make_quickstart() -> None:
    assert readme_quickstart_command() == "make quickstart"
    page = (REPO_ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    assert first_command(page, "docs/quickstart.md") == "make quickstart"


@pytest.mark.slow
def test_quickstart_in_a_fresh_clone(tmp_path: Path, run_cmd: Callable) -> None:
    if shutil.which("make") is None:
        pytest.fail("make is not installed; the README's quickstart needs it")
    clone = tmp_path / "infinito"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    venv = REPO_ROOT / ".venv"
    (clone / ".venv").symlink_to(venv, target_is_directory=True)
    with (clone / ".git/info/exclude").open("a") as f:
        f.write(".venv\n")  # the symlink is not matched by .gitignore's "/.venv/"

    home = tmp_path / "home"
    home.mkdir()
    (home / "gitconfig").write_text("")
    env: dict[str, str | None] = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_GLOBAL": str(home / "gitconfig"),  # no user name or email anywhere
        "GIT_CONFIG_NOSYSTEM": "1",
        # Any attempt to reach the network goes to a closed port and fails.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = env[f"GIT_{role}_EMAIL"] = None
    assert run_cmd(["git", "config", "user.name"], clone, env=env, check=False).returncode != 0

    command = readme_quickstart_command().split()
    # `-o`: the setup step's stamp counts as done, so make reuses the linked virtualenv; so does
    # the offline plots page (it installs from npm, which this test's network refuses).
    args = [command[0], "-o", ".venv/.installed", "-o", "build/dvc_plots/page.html", *command[1:]]
    out = run_cmd(args, clone, env=env, timeout=QUICKSTART_TIMEOUT_S).stdout

    ran = re.findall(r"Running stage '([^']+)'", out)
    spec = yaml.safe_load((clone / "dvc.yaml").read_text())
    assert ran == list(spec["stages"])  # all seven, in order
    # It ends by pointing at the metrics, the samples and the plots, which exist.
    tail = out.strip().splitlines()[-8:]
    pointers = {
        ln.split(":", 1)[0]: ln.split(":", 1)[1].split("(")[0].split()
        for ln in tail
        if ln.split(":", 1)[0] in ("metrics", "samples", "plots")
    }
    assert set(pointers) == {"metrics", "samples", "plots"}, "\n".join(tail)
    for files in (pointers["metrics"], pointers["samples"]):
        assert files
        for rel in files:
            assert (clone / rel).is_file() and (clone / rel).stat().st_size > 0, rel
    assert "metrics/eval.json" in pointers["metrics"]
    assert pointers["plots"] == ["dvclive/plots/metrics"]  # DVCLive's series, one per file
    assert (clone / "dvclive/plots/metrics/val_ppl.tsv").stat().st_size > 0
    evaluation = json.loads((clone / "metrics/eval.json").read_text())
    assert evaluation["test_ppl"] > 1

    # The committed baseline (this quickstart's metrics, in git) gives the comparison numbers on
    # both sides.
    diff = json.loads(run_cmd(["dvc", "metrics", "diff", "--all", "--json"], clone).stdout)
    for file in pointers["metrics"]:
        numbers = {k: v for k, v in diff[file].items() if isinstance(v["new"], int | float)}
        assert numbers, file
        for key, value in numbers.items():  # device names and such are strings
            assert isinstance(value["old"], int | float), (file, key, value)
    shown = run_cmd(["dvc", "metrics", "diff"], clone).stdout
    assert "test_ppl" in shown or "wall_time_sec" in shown  # numbers that differ are listed

    # The seed configuration stays committed; the quickstart's overrides are a named experiment.
    seed = tmp_path / "seed.yaml"
    seed.write_text(run_cmd(["git", "show", "HEAD:params.yaml"], REPO_ROOT).stdout)
    assert run_cmd(["git", "show", "HEAD:params.yaml"], clone).stdout == seed.read_text()
    assert load_params(clone / "params.yaml") == load_params(seed, QUICKSTART_OVERRIDES)
    assert run_cmd(["dvc", "exp", "list", "--name-only"], clone, env=env).stdout.split() == [
        "quickstart"
    ]
    run_cmd(["git", "checkout", "params.yaml"], clone)
    assert load_params(clone / "params.yaml") == load_params(seed)
