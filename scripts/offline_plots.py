"""Make ``dvc plots show`` / ``dvc plots diff`` pages render offline (``make setup`` runs this).

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline it draws nothing.
This installs the three packages from npm at the versions ``web/package-lock.json`` pins (into
``build/dvc_plots/node_modules``, git-ignored), writes ``web/plots_page.html`` with their scripts
inline to ``build/dvc_plots/page.html`` and points DVC's ``plots.html_template`` at it in the
checkout's ``.dvc/config.local`` (this machine's DVC config, never committed). Every page DVC
writes then carries its scripts and opens anywhere, from any folder, with no network.

Without npm (or the npm registry) it says so and changes nothing, so ``make setup`` still
succeeds: DVC keeps its CDN page, which needs the network.

    python scripts/offline_plots.py                 # this checkout (what make setup does)
    python scripts/offline_plots.py --repo PATH     # also point another DVC repository at it
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from infinito.atomic import write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = REPO_ROOT / "web"  # package.json, package-lock.json, plots_page.html
BUILD = REPO_ROOT / "build" / "dvc_plots"
PAGE = BUILD / "page.html"
MARKER = "<!-- VEGA SCRIPTS"
# In load order: vega-lite needs vega; vega-embed needs both.
SCRIPTS = (
    "vega/build/vega.min.js",
    "vega-lite/build/vega-lite.min.js",
    "vega-embed/build/vega-embed.min.js",
)


class SetupError(RuntimeError):
    """The page cannot be built; the message says why."""


def install(build: Path = BUILD) -> Path:
    """``npm ci`` of web/package-lock.json into ``build``; returns its node_modules."""
    npm = shutil.which("npm")
    if npm is None:
        raise SetupError("npm not found")
    build.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(SOURCES / name, build / name)
    proc = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=build,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SetupError(f"npm ci failed in {build}:\n{proc.stdout}{proc.stderr}")
    return build / "node_modules"


def page_html(template: str, node_modules: Path) -> str:
    """``template`` with the Vega scripts inline where its marker comment is."""
    line = next((ln for ln in template.splitlines() if MARKER in ln), None)
    if line is None or "{plot_divs}" not in template:
        raise SetupError(f"the page template needs a '{MARKER} ...' line and {{plot_divs}}")
    indent = line[: len(line) - len(line.lstrip())]
    tags = []
    for rel in SCRIPTS:
        js = (node_modules / rel).read_text(encoding="utf-8")
        if "</script" in js or "{plot_divs}" in js:  # would end the tag or fill DVC's slot
            raise SetupError(f"{rel} cannot be inlined: it contains '</script' or '{{plot_divs}}'")
        tags.append(f"{indent}<script>/* {rel} */\n{js}\n{indent}</script>")
    return template.replace(line, "\n".join(tags))


def configure(repo: Path, page: Path) -> None:
    """Point ``repo``'s local DVC config (``.dvc/config.local``) at ``page``."""
    subprocess.run(
        [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", str(page)],
        cwd=repo,
        check=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/offline_plots.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--repo",
        type=Path,
        action="append",
        default=[],
        help="another DVC repository to configure (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        node_modules = install()
        write_text(PAGE, page_html((SOURCES / "plots_page.html").read_text("utf-8"), node_modules))
    except SetupError as e:
        print(f"offline plots: {e}; `dvc plots show` keeps DVC's CDN page", file=sys.stderr)
        return 0
    # relative to .dvc/ for this checkout (it may move); absolute for the others
    configure(REPO_ROOT, Path("..") / PAGE.relative_to(REPO_ROOT))
    for repo in args.repo:
        configure(repo, PAGE)
    print(f"offline plots: {PAGE.relative_to(REPO_ROOT)}, plots.html_template in .dvc/config.local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
