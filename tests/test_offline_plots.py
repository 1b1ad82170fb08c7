"""``dvc plots`` pages render with no network, checked in a real headless browser.

``make setup`` (scripts/offline_plots.py) installs Vega, Vega-Lite and Vega-Embed from npm and
builds build/dvc_plots/page.html with them inline; DVC's ``plots.html_template`` points at it.
The end-to-end test runs the IIT model and its ablation in a temporary repository, draws
``dvc plots diff main ablation`` with that page and with DVC's default (CDN) page, and opens
both in Debian's chromium with every host name unresolvable: the offline page draws every chart,
DVC's own draws none. It also checks what the charts say: perplexity on a log axis, named y
axes, and the ablation's IIT series absent (no "failed to load", no zeros).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import command_env

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE = REPO_ROOT / "build" / "dvc_plots" / "page.html"
CHROMIUM = shutil.which("chromium")
BROWSER_TIMEOUT_S = 120


def built_page() -> Path:
    if not PAGE.is_file():
        pytest.fail(f"{PAGE} is missing: run `make setup` (or python scripts/offline_plots.py)")
    return PAGE


def browser_dom(html: Path, profile: Path) -> tuple[str, str]:
    """The DOM of ``html`` after its scripts ran, and the browser's console log. Headless,
    as root, a fresh profile, and no host name resolves: nothing can be fetched."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium; .ci/run installs it)")
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=20000",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = "\n".join(ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln)
    return proc.stdout, console


def test_the_setup_page_carries_its_scripts() -> None:
    html = built_page().read_text(encoding="utf-8")
    assert "{plot_divs}" in html and "{scripts}" not in html  # DVC's CDN tags are never added
    assert not re.search(r"""src=["']?https?:""", html)
    for lib in ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js"):
        assert f"<script>/* {lib.split('.')[0]}/build/{lib} */" in html
    config = subprocess.run(
        ["dvc", "config", "--local", "plots.html_template"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert (REPO_ROOT / ".dvc" / config.stdout.strip()).resolve() == PAGE.resolve()


def plot_specs(repo: Path, *revs: str) -> dict[str, Any]:
    """``dvc plots diff REVS --json``; DVC says nothing on stderr (no "failed to load")."""
    proc = subprocess.run(
        ["dvc", "plots", "diff", *revs, "--json"],
        cwd=repo,
        env=command_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stderr.strip() == "", proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_plots_diff_of_iit_and_ablation_renders_offline(
    pipeline_repo: Path, run_cmd: Callable, tmp_path: Path
) -> None:
    repo = pipeline_repo
    run_cmd(["dvc", "exp", "run", "-n", "ablation", "-S", "model.iit=false"], repo)
    shown = plot_specs(repo, "main", "ablation")
    assert not shown.get("errors"), shown["errors"]
    data = shown["data"]
    # every series has its chart; the ablation has no IIT series at all (absent, not zero)
    phi = data["dvclive/plots/metrics/phi_mean.tsv"][0]["content"]["data"]["values"]
    assert {row["rev"] for row in phi} == {"main"}
    loss = data["Loss (nats per token)"][0]["content"]
    assert {row["rev"] for row in loss["data"]["values"]} == {"main", "ablation"}
    # perplexity on a log axis; y axes named
    ppl = json.dumps(data["Perplexity (log scale)"][0]["content"])
    assert '"type": "log"' in ppl and '"title": "perplexity"' in ppl
    assert '"title": "cross-entropy (nats per token)"' in json.dumps(loss)
    assert '"title": "val_ppl"' in json.dumps(data["dvclive/plots/metrics/val_ppl.tsv"][0])

    offline, cdn = tmp_path / "offline", tmp_path / "cdn"
    # what scripts/offline_plots.py --repo does (make setup built the page)
    run_cmd(["dvc", "config", "--local", "plots.html_template", built_page()], repo)
    out = run_cmd(["dvc", "plots", "diff", "main", "ablation", "-o", offline], repo).stdout
    assert "failed to load" not in out
    run_cmd(["dvc", "config", "--local", "--unset", "plots.html_template"], repo)
    run_cmd(["dvc", "plots", "diff", "main", "ablation", "-o", cdn], repo)
    charts = (offline / "index.html").read_text().count("vegaEmbed('#")  # one per chart
    assert charts == len(data)

    dom, console = browser_dom(offline / "index.html", tmp_path / "profile-offline")
    assert dom.count('class="vega-embed') == charts, console
    assert len(re.findall(r"<canvas", dom)) == charts
    assert "Uncaught" not in console and "Error" not in console, console
    # DVC's default page loads Vega from a CDN: with no network it draws nothing
    dom, console = browser_dom(cdn / "index.html", tmp_path / "profile-cdn")
    assert "<canvas" not in dom and "vegaEmbed is not defined" in console
