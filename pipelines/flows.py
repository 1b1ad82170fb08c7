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
from prefect.runtime import flow_run as current_run
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
ARTIFACT_HEADLINE = "infinito-headline"
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


class Overrides(BaseModel):
    """A run's ``params.yaml`` overrides, as ``dvc exp run -S`` takes them: the common keys as
    typed fields (the Prefect UI shows them as a form), any other dotted key in ``extra``.

    Empty fields keep the committed value. A flat mapping of dotted keys (``{"lr": 1e-4,
    "train.max_steps": 100}``) is accepted too: the keys without a field go to ``extra``. The
    values are validated with the stages' own rules (``infinito.config``) before anything runs.
    """

    # extra="allow" only so the JSON schema (which the server checks runs against) accepts a flat
    # mapping; _flat_keys moves every key without a field into ``extra`` before validation.
    model_config = ConfigDict(populate_by_name=True, protected_namespaces=(), extra="allow")

    lr: float | None = Field(None, title="lr", description="peak learning rate")
    batch_size: int | None = Field(
        None, title="batch_size", description="sequences per optimizer step"
    )
    epochs: int | None = Field(None, title="epochs", description="passes over the training split")
    lambda_phi: float | None = Field(
        None, title="lambda_phi", description="weight of the Delta-Phi loss; 0: none"
    )
    seed: int | None = Field(
        None, title="seed", description="initialisation, data order, noise, sampling"
    )
    model_iit: bool | None = Field(
        None, alias="model.iit", title="model.iit", description="false: the ablation (no IIT parts)"
    )
    data_source: str | None = Field(
        None,
        alias="data.source",
        title="data.source",
        description="builtin, wikitext-2-raw-v1, wikitext-2-v1, wikitext-103-raw-v1, "
        "wikitext-103-v1 or a local path",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        title="other keys",
        description='any other params.yaml key by dotted name, e.g. {"train.max_steps": 1000}',
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        """Move the dotted keys that have no field into ``extra``."""
        if not isinstance(data, dict):
            return data
        dotted = {n: f.alias or n for n, f in cls.model_fields.items() if n != "extra"}
        names = {*dotted, *dotted.values()}  # python names and dotted keys
        known = {k: v for k, v in data.items() if k in names}
        extra = dict(data.get("extra") or {})
        extra.update({k: v for k, v in data.items() if k not in names and k != "extra"})
        given = {dotted.get(k, k) for k in known}
        clash = sorted(given & set(extra))
        if clash:
            raise ValueError(f"{clash[0]} is given twice (as a field and in extra)")
        return {**known, "extra": extra}

    def dotted(self) -> dict[str, Any]:
        """The overrides as {dotted key: value}, fields first, unset fields left out."""
        out = {
            (field.alias or name): getattr(self, name)
            for name, field in type(self).model_fields.items()
            if name != "extra" and getattr(self, name) is not None
        }
        return {**out, **self.extra}

    @classmethod
    def of(cls, value: Overrides | dict[str, Any] | None) -> Overrides:
        return value if isinstance(value, cls) else cls.model_validate(value or {})


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


def new_experiment_name(repo: Path) -> str:
    """A free DVC experiment name for ``repo``'s HEAD, as ``dvc exp run`` would pick one."""
    from dvc.repo.experiments.utils import gen_random_name, get_random_exp_name
    from dvc.scm import SCM

    try:
        scm = SCM(str(repo))
        return get_random_exp_name(scm, scm.get_rev())
    except Exception:  # no git repository yet: the flow reports that itself
        return gen_random_name()


def run_name() -> str:
    """The flow run's name: the DVC experiment the run records (``experiment``, or a new name
    for a run with overrides), or ``repro-<HEAD>`` for a plain repro of the committed params."""
    params = current_run.get_parameters()
    if params.get("experiment"):
        return str(params["experiment"])
    repo = Path(params["repo"]).resolve() if params.get("repo") else REPO_ROOT
    if Overrides.of(params.get("overrides")).dotted():
        return new_experiment_name(repo)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    return f"repro-{head or 'uncommitted'}"


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
def record_experiment(repo: Path, name: str, set_args: list[str]) -> str:
    """Commit the finished workspace as a DVC experiment with ``dvc exp run -n NAME -S ...``.

    Every stage is already up to date (init, always_changed, re-runs and finds its manifest
    unchanged), so DVC only records; returns the experiment's name.
    """
    args = ["exp", "run", "-n", name]
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
    return name


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


# The headline artifact's numbers: (stage, metric key, label); the file is the stage's metrics
# file that holds the key (dvc.yaml declares them).
HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("evaluate", "validation_ppl", "validation perplexity"),
    ("evaluate", "test_ppl", "test perplexity"),
    ("evaluate", "test_bits_per_byte", "test bits per byte"),
    ("evaluate", "test_memory_contribution_ppl", "memory contribution (test ppl, no reads - with)"),
    ("train", "tokens_per_sec", "training tokens/s"),
)


def sig4(value: Any) -> Any:
    """A number rounded to 4 significant digits (other values as they are)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return value
    return float(f"{value:.4g}") if isinstance(value, float) else value


def _fmt(value: Any, sign: bool = False) -> str:
    """4 significant digits, without an exponent for large numbers."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    r = float(f"{value:.4g}")
    text = f"{r:,.0f}" if abs(r) >= 1e4 else f"{r:.4g}"
    return f"+{text}" if sign and r > 0 else text


def rounded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: sig4(v) for k, v in row.items()} for row in rows]


def headline_markdown(
    title: str, baseline: str, diff: list[dict[str, Any]], stage_files: dict[str, list[str]]
) -> str:
    """The short artifact: the headline numbers of this run against the baseline."""
    by_key = {(r["file"], r["metric"]): r for r in diff}
    lines = [
        f"# {title}",
        "",
        f"| | this run | baseline (`{baseline}`) | change |",
        "|---|---|---|---|",
    ]
    for stage, key, label in HEADLINE:
        found = [by_key[(f, key)] for f in stage_files.get(stage, []) if (f, key) in by_key]
        row = found[0] if found else None
        if row is None:
            continue  # e.g. no test split evaluated
        change = row.get("change")
        if change is None and row["run"] is not None and row["baseline"] is not None:
            change = row["run"] - row["baseline"]
        lines.append(
            f"| {label} | {_fmt(row['run'])} | {_fmt(row['baseline'])} | {_fmt(change, True)} |"
        )
    return "\n".join(lines) + "\n"


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
    """Publish the headline numbers, the metrics and their diff against ``baseline``.

    Only the files of train and evaluate: the later stages' files still hold an earlier run's
    numbers at this point. The headline artifact comes first (the UI lists artifacts in order);
    numbers are rounded to 4 significant digits.
    """
    stage_files = {s: stage_metric_files(repo, [s]) for s in STAGES[: STAGES.index("evaluate") + 1]}
    files = [f for fs in stage_files.values() for f in fs]
    if not files:
        raise PipelineError("dvc.yaml declares no metrics for the train and evaluate stages")
    rows = metrics_rows(dvc_json(repo, "metrics", "show", *files))
    if not rows:
        raise PipelineError(f"dvc metrics show found none of {files} in {repo} after evaluation")
    every = diff_rows(dvc_json(repo, "metrics", "diff", baseline, "--all", "--targets", *files))
    diff = [r for r in every if r["baseline"] != r["run"]]
    create_markdown_artifact(
        headline_markdown(title, baseline, every, stage_files),
        key=ARTIFACT_HEADLINE,
        description=f"{title}: headline numbers against {baseline}",
    )
    create_table_artifact(
        rounded(rows), key=ARTIFACT_METRICS, description=f"{title}: metrics (dvc metrics show)"
    )
    create_table_artifact(
        rounded(diff) or [dict.fromkeys(("file", "metric", "baseline", "run", "change"), "-")],
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


@flow(name="infinito-pipeline", flow_run_name=run_name, persist_result=False)
def infinito_pipeline(
    overrides: Overrides | None = None,
    experiment: str | None = None,
    baseline: str = "HEAD",
    repo: str | None = None,
) -> dict[str, Any]:
    """Run the DVC stages in order; record a DVC experiment when given overrides or a name.

    The flow run is named after the experiment it records (a new DVC-style name when only
    overrides are given), so Prefect's runs and ``dvc exp show`` use the same names.

    Args:
        overrides: params.yaml overrides: lr, batch_size, epochs, lambda_phi, seed, model.iit,
            data.source, and any other dotted key in ``extra`` (``{"train.max_steps": 100}``).
        experiment: name for the recorded DVC experiment (``dvc exp run -n``).
        baseline: git revision the metrics are diffed against.
        repo: the DVC repository to run in; default, the checkout holding this file.
    """
    root = Path(repo).resolve() if repo else REPO_ROOT
    if not (root / "dvc.yaml").is_file():
        raise PipelineError(f"{root} has no dvc.yaml; pass repo=<path to an INFINITO checkout>")
    dotted = Overrides.of(overrides).dotted()
    name: str | None = None
    if dotted or experiment is not None:
        # the run's own name (run_name) unless the flow runs without Prefect (.fn)
        name = experiment or current_run.get_name() or new_experiment_name(root)
        check_experiment_name(root, name)
    title = f"experiment {name}" if name else "repro"

    set_args = prepare_params(root, dotted)
    published: dict[str, Any] = {}
    for stage in STAGES:
        STAGE_TASKS[stage](stage, root)
        if stage == "evaluate":
            published = publish_metrics(root, title, set_args, baseline)
    if name is not None:
        record_experiment(root, name, set_args)
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
        overrides=Overrides.of(_parse_set(args.set)),
        experiment=args.name,
        baseline=args.baseline,
        repo=args.repo,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
