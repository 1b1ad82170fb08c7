"""The INFINITO pipeline as a Prefect flow: one task per ``dvc.yaml`` stage; DVC caches and records.

Each task runs ``dvc repro <stage>``, so DVC decides what is stale and its lock file remains the
only cache: tasks have no Prefect result caching and persist no results. Only ``download`` (the one
network-bound stage) retries.

A run starts from the committed ``params.yaml`` plus the flow's ``overrides`` (dotted keys, as
``dvc exp run -S`` takes them), so a scheduled run never inherits what an earlier run left in the
workspace (uncommitted edits of ``params.yaml`` are refused, never overwritten). With overrides
or an ``experiment`` name the run is recorded as a DVC experiment: the
final task is ``dvc exp run -n NAME -S key=value ...``, which finds every stage up to date and
commits the workspace as that experiment (the same record ``dvc exp run`` makes from a
terminal; running ``dvc exp run`` per stage instead would clash on the name or force stages to
re-run). Without either, the run is a plain ``dvc repro`` of the committed configuration.

After ``evaluate`` the flow publishes the run's metrics and ``dvc metrics diff`` against the
baseline (git ``HEAD`` unless told otherwise) as Prefect table and markdown artifacts.

Run locally: ``python -m pipelines.flows --set lr=1e-4 --set model.iit=false --name ablation``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from infinito.config import (
    PARAMS_FILE,
    ConfigError,
    Params,
    apply_overrides,
    diff_keys,
    parse_yaml,
    read_yaml,
)

# The stages of dvc.yaml in the order the flow runs them.
STAGES: tuple[str, ...] = (
    "check-params",
    "download",
    "tokenize",
    "init",
    "train",
    "evaluate",
    "generate-samples",
    "benchmark-inference",
)
REPO_ROOT = Path(__file__).resolve().parents[1]
DOWNLOAD_RETRIES = 2
DOWNLOAD_RETRY_DELAYS_S = [30, 120]
ARTIFACT_METRICS = "infinito-metrics"
ARTIFACT_DIFF = "infinito-metrics-diff"
ARTIFACT_SUMMARY = "infinito-run-summary"
_OUTPUT_TAIL_LINES = 40


class PipelineError(RuntimeError):
    """A pipeline command failed or the run was asked for something impossible."""


def _log(message: str) -> None:
    """Log through Prefect inside a run, else print (the helpers are also used outside flows)."""
    try:
        get_run_logger().info(message)
    except Exception:  # no active flow or task run
        print(message, flush=True)


def command_env() -> dict[str, str]:
    """The environment for pipeline commands: this interpreter's bin first on PATH.

    Stage commands in dvc.yaml start with ``python``; putting the running interpreter's
    directory first makes them use the same virtualenv as the flow (and the Prefect worker).
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_command(args: Sequence[str], cwd: Path, log: Callable[[str], None] = _log) -> str:
    """Run ``args`` in ``cwd``, streaming its output to ``log``; return the output.

    Raises ``PipelineError`` with the command's last lines when it exits non-zero.
    """
    log(f"$ {' '.join(args)}")
    tail: deque[str] = deque(maxlen=_OUTPUT_TAIL_LINES)
    lines: list[str] = []
    with subprocess.Popen(
        list(args),
        cwd=cwd,
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            tail.append(line)
            log(line)
        rc = proc.wait()
    if rc != 0:
        raise PipelineError(
            f"command failed with exit code {rc} in {cwd}: {' '.join(args)}\n" + "\n".join(tail)
        )
    return "\n".join(lines)


def dvc(repo: Path, *args: str, log: Callable[[str], None] = _log) -> str:
    """Run ``dvc <args>`` with this interpreter's DVC in ``repo``."""
    return run_command([sys.executable, "-m", "dvc", *args], repo, log)


def _quiet(args: Sequence[str], repo: Path) -> str:
    """Run a short read-only command and return its stdout; raise PipelineError on failure."""
    proc = subprocess.run(
        list(args), cwd=repo, env=command_env(), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise PipelineError(
            f"{' '.join(args)} failed in {repo} (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def dvc_json(repo: Path, *args: str) -> Any:
    """Run a read-only ``dvc ... --json`` command and parse its output."""
    out = _quiet([sys.executable, "-m", "dvc", *args, "--json"], repo)
    return json.loads(out) if out.strip() else {}


# --- parameters -----------------------------------------------------------------------------


def override_args(overrides: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """``dvc exp run -S`` arguments for ``overrides``, encoding the values validated in ``params``.

    Values are taken from the already-overridden mapping (so a string such as ``"1e-4"`` is sent
    as the number it was parsed to) and written as JSON, which Hydra's override grammar (the one
    ``-S`` uses) reads as the same number, boolean, null, string or list.
    """
    out = []
    for key in overrides:
        node: Any = params
        for part in key.split("."):
            node = node[part]
        out.append(f"{key}={json.dumps(node)}")
    return out


def resolve_overrides(base_text: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``overrides`` to the params text ``base_text``, validate, return the raw mapping.

    Raises ``ConfigError`` naming the offending key before any stage runs.
    """
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"override key {key!r} must be a dotted name such as model.iit")
        if isinstance(value, dict):
            raise ConfigError(
                f"override {key} is a mapping; give its leaf keys instead ({key}.<name>=<value>)"
            )
    data = parse_yaml(base_text, f"HEAD:{PARAMS_FILE}") or {}
    data = apply_overrides(data, overrides)
    Params.from_dict(data)  # raises ConfigError naming the key
    return data


def check_experiment_name(repo: Path, name: str) -> None:
    """Fail early (before any stage runs) if ``name`` is not a usable new experiment name."""
    if not name or "/" in name or name.startswith("-"):
        raise PipelineError(f"experiment name {name!r} is invalid: use letters, digits, - and _")
    probe = subprocess.run(
        ["git", "check-ref-format", f"refs/exps/aa/bb/{name}"], cwd=repo, check=False
    )
    if probe.returncode != 0:
        raise PipelineError(f"experiment name {name!r} is not a valid git ref name")
    existing = _quiet([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], repo).split()
    if name in existing:
        raise PipelineError(
            f"experiment {name!r} already exists for this commit; choose another name or remove "
            f"it with: dvc exp remove {name}"
        )


@task(
    name="prepare-params", task_run_name="prepare-params", cache_policy=NONE, persist_result=False
)
def prepare_params(repo: Path, overrides: dict[str, Any]) -> list[str]:
    """Write the committed params.yaml plus ``overrides`` to the workspace; return the -S args.

    Uncommitted edits of params.yaml are refused, never overwritten (``refuse_uncommitted_params``).
    """
    log = get_run_logger()
    try:
        base_text = _quiet(["git", "show", f"HEAD:{PARAMS_FILE}"], repo)
    except PipelineError as e:
        raise PipelineError(
            f"{repo} has no committed {PARAMS_FILE}; the pipeline runs from a git commit "
            f"(git add params.yaml dvc.yaml && git commit)"
        ) from e
    data = resolve_overrides(base_text, overrides)
    path = repo / PARAMS_FILE
    if refuse_uncommitted_params(repo, base_text):  # an earlier run's overrides: replaced
        log.info("params.yaml held an earlier flow run's overrides; starting from HEAD's")
        # Written directly (not through atomic.py) to keep the file's mode and inode for git.
        path.write_text(base_text, encoding="utf-8")
    args = override_args(overrides, data)
    if args:
        # DVC's own implementation of `dvc exp run -S`, so the file is edited exactly as the
        # final `dvc exp run -S` would (comments and order kept) and that step finds no change.
        from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

        dvc_apply_overrides(str(path), args)
        log.info("params.yaml overrides: %s", " ".join(args))
    remember_flow_params(repo)
    return args


# A copy of the params.yaml the flow last wrote, in DVC's git-ignored scratch directory: the one
# uncommitted content of params.yaml a later run may replace (its values are that run's record).
FLOW_PARAMS_COPY = Path(".dvc") / "tmp" / "infinito-flow-params.yaml"


def remember_flow_params(repo: Path) -> None:
    """Keep a copy of the params.yaml this run wrote."""
    copy = repo / FLOW_PARAMS_COPY
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text((repo / PARAMS_FILE).read_text(encoding="utf-8"), encoding="utf-8")


def refuse_uncommitted_params(repo: Path, base_text: str) -> bool:
    """Refuse to start over uncommitted edits of params.yaml: a user's edit is data.

    Returns False when the workspace file is the committed one, True when it holds what an
    earlier flow run wrote (its overrides, recorded by that run, which this run may replace);
    otherwise raises ``PipelineError`` naming the changed keys and the two ways on.
    """
    path = repo / PARAMS_FILE
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if current == base_text:
        return False
    try:
        now = parse_yaml(current, str(path))
        copy = repo / FLOW_PARAMS_COPY
        if copy.is_file() and parse_yaml(copy.read_text(encoding="utf-8"), str(copy)) == now:
            return True
        changed = diff_keys(parse_yaml(base_text, f"HEAD:{PARAMS_FILE}"), now)
    except ConfigError:  # not even YAML: the diff below shows it
        changed = []
    diff = "".join(
        difflib.unified_diff(
            base_text.splitlines(keepends=True),
            current.splitlines(keepends=True),
            f"HEAD:{PARAMS_FILE}",
            f"workspace {PARAMS_FILE}",
        )
    )
    keys = "; ".join(changed[:8]) if changed else "the text, not the values"
    raise PipelineError(
        f"{path} has uncommitted changes ({keys}), which this run would replace; the flow runs "
        "from the committed file plus its overrides. Either commit them (git commit "
        f"{PARAMS_FILE}) and run again, or pass them as the run's overrides (--set KEY=VALUE, "
        f"or the overrides parameter) and restore the committed file (git checkout "
        f"{PARAMS_FILE}; an earlier `dvc exp run`'s params stay in `dvc exp show`).\n{diff}"
    )


# --- stages ---------------------------------------------------------------------------------


def _run_stage(stage: str, repo: Path) -> None:
    dvc(repo, "repro", stage)


def _stage_task(stage: str) -> Any:
    """One Prefect task running ``dvc repro <stage>``; only the network-bound download retries."""
    retries = DOWNLOAD_RETRIES if stage == "download" else 0
    return task(
        _run_stage,
        name=stage,
        task_run_name=stage,
        retries=retries,
        retry_delay_seconds=DOWNLOAD_RETRY_DELAYS_S if retries else 0,
        cache_policy=NONE,
        persist_result=False,
    )


STAGE_TASKS: dict[str, Any] = {stage: _stage_task(stage) for stage in STAGES}


@task(
    name="record-experiment",
    task_run_name="record-experiment",
    cache_policy=NONE,
    persist_result=False,
)
def record_experiment(repo: Path, name: str | None, set_args: list[str]) -> str:
    """Commit the finished workspace as a DVC experiment with ``dvc exp run -n NAME -S ...``.

    Every stage is already up to date (init, always_changed, re-runs and finds its manifest
    unchanged), so DVC only records; returns the experiment's name.
    """
    args = ["exp", "run"]
    if name:
        args += ["-n", name]
    for s in set_args:
        args += ["-S", s]
    out = dvc(repo, *args)
    stages = read_yaml(repo / "dvc.yaml")["stages"]
    always = [f"Running stage '{st}'" for st, spec in stages.items() if spec.get("always_changed")]
    reran = [
        line
        for line in out.splitlines()
        if line.startswith("Running stage") and not line.startswith(tuple(always))
    ]
    if reran:
        # The stages ran moments ago with these params, so this points at a changed dependency.
        get_run_logger().warning("dvc exp run re-ran stages while recording: %s", reran)
    if name:
        return name
    for line in out.splitlines():
        if line.startswith("Ran experiment(s):"):
            return line.split(":", 1)[1].strip()
    raise PipelineError(f"could not find the experiment name in dvc's output:\n{out}")


# --- metrics artifacts ----------------------------------------------------------------------


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def metrics_rows(show: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (file, metric, value) from ``dvc metrics show --json`` for the workspace."""
    rows: list[dict[str, Any]] = []
    for rev_data in show.values():
        for file, entry in sorted(rev_data.get("data", {}).items()):
            if "data" not in entry:
                continue
            flat: dict[str, Any] = {}
            _flatten("", entry["data"], flat)
            rows += [{"file": file, "metric": k, "value": v} for k, v in flat.items()]
    return rows


def diff_rows(diff: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (file, metric, baseline, run, change) from ``dvc metrics diff --json``."""
    rows: list[dict[str, Any]] = []
    for file, metrics in sorted(diff.items()):
        flat: dict[str, Any] = {}
        # Each leaf is {"old": .., "new": .., "diff": ..}; flatten down to that level.
        stack = [("", metrics)]
        while stack:
            prefix, node = stack.pop()
            if isinstance(node, dict) and ("new" in node or "old" in node):
                flat[prefix] = node
            elif isinstance(node, dict):
                stack += [(f"{prefix}.{k}" if prefix else k, v) for k, v in node.items()]
        for key in sorted(flat):
            d = flat[key]
            rows.append(
                {
                    "file": file,
                    "metric": key,
                    "baseline": d.get("old"),
                    "run": d.get("new"),
                    "change": d.get("diff"),
                }
            )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


def summary_markdown(
    title: str, overrides: list[str], baseline: str, diff: list[dict[str, Any]]
) -> str:
    """The markdown artifact: what ran, then the metrics diff against the baseline."""
    lines = [f"# {title}", ""]
    lines.append(
        "Overrides: " + (" ".join(f"`-S {o}`" for o in overrides) if overrides else "none")
    )
    lines += ["", f"Metrics against `{baseline}` (`dvc metrics diff --json {baseline}`):", ""]
    if not diff:
        lines.append("No metric differs from the baseline.")
    else:
        lines += ["| file | metric | baseline | this run | change |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['file']} | {r['metric']} | {_fmt(r['baseline'])} | {_fmt(r['run'])} "
            f"| {_fmt(r['change'])} |"
            for r in diff
        ]
    return "\n".join(lines) + "\n"


def stage_metric_files(repo: Path, stages: Sequence[str]) -> list[str]:
    """The metrics files that ``stages`` declare in dvc.yaml (their one home)."""
    spec = read_yaml(repo / "dvc.yaml") or {}
    files: list[str] = []
    for stage in stages:
        for entry in spec.get("stages", {}).get(stage, {}).get("metrics", []) or []:
            files += [entry] if isinstance(entry, str) else list(entry)
    return files


@task(
    name="publish-metrics", task_run_name="publish-metrics", cache_policy=NONE, persist_result=False
)
def publish_metrics(repo: Path, title: str, set_args: list[str], baseline: str) -> dict[str, Any]:
    """Publish the metrics of the stages run so far and their diff against ``baseline``.

    Only the files of train and evaluate: the later stages' files still hold an earlier run's
    numbers at this point.
    """
    files = stage_metric_files(repo, STAGES[: STAGES.index("evaluate") + 1])
    if not files:
        raise PipelineError("dvc.yaml declares no metrics for the train and evaluate stages")
    rows = metrics_rows(dvc_json(repo, "metrics", "show", *files))
    if not rows:
        raise PipelineError(f"dvc metrics show found none of {files} in {repo} after evaluation")
    diff = diff_rows(dvc_json(repo, "metrics", "diff", baseline, "--targets", *files))
    create_table_artifact(
        rows, key=ARTIFACT_METRICS, description=f"{title}: metrics (dvc metrics show)"
    )
    create_table_artifact(
        diff or [{"file": "-", "metric": "-", "baseline": None, "run": None, "change": None}],
        key=ARTIFACT_DIFF,
        description=f"{title}: dvc metrics diff {baseline}",
    )
    create_markdown_artifact(
        summary_markdown(title, set_args, baseline, diff),
        key=ARTIFACT_SUMMARY,
        description=f"{title}: summary",
    )
    return {"metrics": rows, "diff": diff}


# --- the flow -------------------------------------------------------------------------------


@flow(name="infinito-pipeline", persist_result=False)
def infinito_pipeline(
    overrides: dict[str, Any] | None = None,
    experiment: str | None = None,
    baseline: str = "HEAD",
    repo: str | None = None,
) -> dict[str, Any]:
    """Run the DVC stages in order; record a DVC experiment when given overrides or a name.

    Args:
        overrides: params.yaml overrides by dotted key, e.g. ``{"lr": 1e-4, "model.iit": false}``.
        experiment: name for the recorded DVC experiment (``dvc exp run -n``).
        baseline: git revision the metrics are diffed against.
        repo: the DVC repository to run in; default, the checkout holding this file.
    """
    root = Path(repo).resolve() if repo else REPO_ROOT
    if not (root / "dvc.yaml").is_file():
        raise PipelineError(f"{root} has no dvc.yaml; pass repo=<path to an INFINITO checkout>")
    overrides = dict(overrides or {})
    as_experiment = bool(overrides) or experiment is not None
    if experiment is not None:
        check_experiment_name(root, experiment)
    title = f"experiment {experiment}" if experiment else ("experiment" if overrides else "repro")

    set_args = prepare_params(root, overrides)
    published: dict[str, Any] = {}
    for stage in STAGES:
        STAGE_TASKS[stage](stage, root)
        if stage == "evaluate":
            published = publish_metrics(root, title, set_args, baseline)
    name = record_experiment(root, experiment, set_args) if as_experiment else None
    get_run_logger().info(
        "pipeline finished%s; compare with: dvc metrics diff %s",
        f" as experiment {name}" if name else "",
        baseline,
    )
    return {"experiment": name, "overrides": set_args, **published}


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
        out[key] = value  # parsed as YAML by infinito.config.apply_overrides
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the flow once from the command line (against Prefect's API or a temporary server)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.flows", description=__doc__)
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", "-n", default=None, help="record as this DVC experiment")
    parser.add_argument("--baseline", default="HEAD", help="git revision to diff metrics against")
    parser.add_argument("--repo", default=None, help="DVC repository (default: this checkout)")
    args = parser.parse_args(argv)
    infinito_pipeline(
        overrides=_parse_set(args.set),
        experiment=args.name,
        baseline=args.baseline,
        repo=args.repo,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
