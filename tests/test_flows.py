"""The Prefect pipeline flow: task settings, parameter handling, and runs under a test harness."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import COMMITTED_PARAMS
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import TaskRunSort
from prefect.states import State
from prefect.testing.utilities import prefect_test_harness

from infinito.config import ConfigError, Params, load_params, write_params
from pipelines import flows
from pipelines.flows import (
    ARTIFACT_DIFF,
    ARTIFACT_HEADLINE,
    ARTIFACT_METRICS,
    ARTIFACT_SUMMARY,
    STAGE_TASKS,
    STAGES,
    PipelineError,
    infinito_pipeline,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- settings, without running


def test_one_task_per_dvc_stage_in_dvc_yaml_order() -> None:
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert list(STAGES) == list(spec["stages"])
    assert {name: t.name for name, t in STAGE_TASKS.items()} == {s: s for s in STAGES}


def test_only_download_retries_and_nothing_is_cached_by_prefect() -> None:
    tasks = [*STAGE_TASKS.values(), flows.prepare_params, flows.publish_metrics]
    tasks.append(flows.record_experiment)
    for t in tasks:
        assert t.cache_policy == NONE, t.name
        assert t.persist_result is False, t.name
        assert t.retries == (flows.DOWNLOAD_RETRIES if t.name == "download" else 0), t.name
    assert flows.DOWNLOAD_RETRIES >= 1
    assert infinito_pipeline.persist_result is False


def test_override_args_round_trip_through_dvc_set_param(tmp_path: Path) -> None:
    """The -S strings the flow writes give exactly the params infinito.config validated."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    overrides: dict[str, Any] = {
        "lr": "1e-4",  # a string, as typed into a form: parsed like `-S lr=1e-4`
        "batch_size": 32,
        "model.iit": False,
        "data.source": "data/my corpus.txt",
        "train.max_steps": None,
        "benchmark.batch_sizes": [1, 2],
        "generate.prompts": ['He said "hi"', "x: y"],
    }
    base = COMMITTED_PARAMS.read_text()
    data = flows.resolve_overrides(base, overrides)
    args = flows.override_args(overrides, data)
    assert args[:3] == ["lr=0.0001", "batch_size=32", "model.iit=false"]
    path = tmp_path / "params.yaml"
    path.write_text(base)
    dvc_apply_overrides(str(path), args)
    assert load_params(path) == load_params(COMMITTED_PARAMS, overrides)


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("lr: 2.0e-4", "lr: 1e-05", None),  # YAML 1.2: a float (PyYAML read a string)
        ("iit: true", "iit: yes", r"model\.iit='yes' must be true or false"),  # not a boolean
        ("seed: 42", "seed: 42\nseed: 7", r"duplicate key 'seed'"),
    ],
)
def test_flow_precheck_reads_params_as_the_stages_do(
    tmp_path: Path, old: str, new: str, error: str | None
) -> None:
    """The flow's pre-check and the stages share one reader: neither accepts what the other
    refuses."""
    text = COMMITTED_PARAMS.read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    if error is None:
        data = flows.resolve_overrides(path.read_text(), {})
        assert Params.from_dict(data) == load_params(path)
        assert load_params(path).lr == 1e-5
        return
    with pytest.raises(ConfigError, match=error):
        load_params(path)
    with pytest.raises(ConfigError, match=error):
        flows.resolve_overrides(path.read_text(), {})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model.bogus": 1}, "unknown key model.bogus"),
        ({"lr": -1}, "lr=-1"),
        ({"model.n_head": 7}, "model.n_head=7"),
        ({"model": {"iit": False}}, "give its leaf keys"),
        ({"lr.": 1}, "dotted name"),
    ],
)
def test_bad_overrides_name_the_key(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        flows.resolve_overrides(COMMITTED_PARAMS.read_text(), overrides)


def test_metrics_and_diff_rows_flatten_dvc_json() -> None:
    show = {
        "": {
            "data": {
                "metrics/eval.json": {"data": {"validation_ppl": 12.5, "n": {"a": 1}}},
                "metrics/bad.json": {"error": {"type": "X"}},
            }
        }
    }
    assert flows.metrics_rows(show) == [
        {"file": "metrics/eval.json", "metric": "validation_ppl", "value": 12.5},
        {"file": "metrics/eval.json", "metric": "n.a", "value": 1},
    ]
    diff = {"metrics/eval.json": {"validation_ppl": {"old": 13.0, "new": 12.5, "diff": -0.5}}}
    rows = flows.diff_rows(diff)
    assert rows == [
        {
            "file": "metrics/eval.json",
            "metric": "validation_ppl",
            "baseline": 13.0,
            "run": 12.5,
            "change": -0.5,
        }
    ]
    md = flows.summary_markdown("experiment x", ["lr=0.0001"], "HEAD", rows)
    assert "`-S lr=0.0001`" in md
    assert "| metrics/eval.json | validation_ppl | 13 | 12.5 | -0.5 |" in md


def test_stage_metric_files_come_from_dvc_yaml() -> None:
    assert flows.stage_metric_files(REPO_ROOT, ["train", "evaluate"]) == [
        "metrics/train.json",
        "dvclive/metrics.json",
        "metrics/eval.json",
    ]


def test_headline_has_the_key_numbers_to_four_significant_digits() -> None:
    def row(file: str, metric: str, baseline: float | None, run: float) -> dict[str, Any]:
        return {"file": f"metrics/{file}", "metric": metric, "baseline": baseline, "run": run}

    every = [
        row("eval.json", "validation_ppl", 462.53, 460.0),
        row("eval.json", "test_ppl", 383.5, 383.5),
        row("eval.json", "test_bits_per_byte", None, 1.9361),
        row("train.json", "tokens_per_sec", 9876.4, 12345.6),
        row("other.json", "test_ppl", 1.0, 2.0),  # another stage's file: not the headline's
    ]
    files = {"train": ["metrics/train.json"], "evaluate": ["metrics/eval.json"]}
    md = flows.headline_markdown("experiment x", "HEAD", every, files)
    lines = md.splitlines()
    assert lines[0] == "# experiment x"
    assert "| validation perplexity | 460 | 462.5 | -2.53 |" in lines
    assert "| test perplexity | 383.5 | 383.5 | 0 |" in lines
    assert "| test bits per byte | 1.936 | - | - |" in lines
    assert "| training tokens/s | 12,350 | 9876 | +2469 |" in lines
    assert not any("memory contribution" in ln for ln in lines)  # absent: left out
    assert len(lines) == 8  # title, blank, header, rule, four numbers
    assert flows.rounded([{"a": 0.123456, "b": 3, "c": "x", "d": True}]) == [
        {"a": 0.1235, "b": 3, "c": "x", "d": True}
    ]


def test_overrides_are_a_typed_form_with_free_form_extras() -> None:
    from pipelines.flows import Overrides
    from pipelines.quickstart import QUICKSTART_OVERRIDES

    schema = infinito_pipeline.parameters.model_dump()
    fields = schema["definitions"]["Overrides"]["properties"]
    assert list(fields) == [
        "lr",
        "batch_size",
        "epochs",
        "lambda_phi",
        "seed",
        "model.iit",
        "data.source",
        "extra",
    ]
    assert {"number", "null"} == {t["type"] for t in fields["lr"]["anyOf"]}
    assert {"boolean", "null"} == {t["type"] for t in fields["model.iit"]["anyOf"]}
    # a flat mapping of dotted keys, as -S takes them: the keys without a field go to extra
    o = Overrides.of({"lr": "1e-4", "model.iit": False, "train.max_steps": 5})
    assert (o.lr, o.model_iit, o.extra) == (1e-4, False, {"train.max_steps": 5})
    assert o.dotted() == {"lr": 1e-4, "model.iit": False, "train.max_steps": 5}
    assert Overrides.of(QUICKSTART_OVERRIDES).dotted() == QUICKSTART_OVERRIDES
    assert Overrides.of(None).dotted() == {}
    with pytest.raises(ValueError, match="lr is given twice"):
        Overrides.of({"lr": 1e-4, "extra": {"lr": 2e-4}})
    with pytest.raises(ValueError, match="lr"):
        Overrides.of({"lr": "fast"})


def test_prefect_yaml_declares_the_deployments_of_pipelines_deploy() -> None:
    """`prefect deploy --all` and `python -m pipelines.deploy` register the same deployments."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    from pipelines.deploy import DEFAULT_CRON, SCHEDULE_SLUG, SEED_DEPLOYMENT, deployment_specs

    spec = PrefectYamlModel.model_validate(yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text()))
    assert spec.pull == []  # the worker imports the flow from its own checkout
    declared = {d.name: d for d in spec.deployments}
    expected = deployment_specs()
    assert set(declared) == set(expected)
    for name, want in expected.items():
        got = declared[name]
        flow_ = load_flow_from_entrypoint(got.entrypoint)
        assert flow_.name == infinito_pipeline.name and flow_.fn is infinito_pipeline.fn
        assert got.work_pool is not None and got.work_pool.name == want["work_pool"]
        assert got.parameters == want["parameters"]
        assert got.description == want["description"] and got.tags == want["tags"]
        schedules = [(s.cron, s.timezone, s.slug) for s in got.schedules or []]
        seed = [(DEFAULT_CRON, "UTC", SCHEDULE_SLUG)]
        assert schedules == (seed if name == SEED_DEPLOYMENT else [])


def test_experiment_names_are_checked_before_any_stage(
    dvc_repo: Callable[..., Path],
) -> None:
    repo = dvc_repo()
    for bad in ("", "a/b", "-x", "bad name", "a..b"):
        with pytest.raises(PipelineError, match="experiment name"):
            flows.check_experiment_name(repo, bad)
    flows.check_experiment_name(repo, "lr-1e-4_b32")


def test_flow_refuses_a_repository_without_dvc_yaml(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="has no dvc.yaml"):
        infinito_pipeline.fn(repo=str(tmp_path))


# ---------------------------------------------------------------- runs under the test harness


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    # None: use PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (2-core machines are slow).
    with prefect_test_harness(server_startup_timeout=None):
        yield


def _task_runs(state: State) -> list[tuple[str, str]]:
    """(task name, state name) of the flow run's task runs, in start order."""
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
    return [(r.name, r.state_name) for r in runs]


def _artifacts(state: State) -> dict[str, Any]:
    """The flow run's artifacts by key, in the order they were created."""
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in sorted(arts, key=lambda a: a.created)}


def _run_name(state: State) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.slow
def test_flow_runs_an_experiment_and_publishes_metrics(
    harness: None, pipeline_repo: Path, run_cmd: Callable
) -> None:
    repo = pipeline_repo
    committed = _git(repo, "show", "HEAD:params.yaml")
    # evaluate.sliding_stride changes the evaluate stage only: the diff is real and cheap.
    state = infinito_pipeline(
        overrides={"evaluate.sliding_stride": 8},
        experiment="stride-8",
        repo=str(repo),
        return_state=True,
    )
    assert state.is_completed(), state
    result = state.result()
    assert result["experiment"] == "stride-8" == _run_name(state)  # Prefect's name is DVC's
    assert result["overrides"] == ["evaluate.sliding_stride=8"]

    names = [n for n, _ in _task_runs(state)]
    stage_runs = [n for n in names if n in STAGES]
    assert stage_runs == list(STAGES)  # one task per stage, in order
    assert names.index("publish-metrics") == names.index("evaluate") + 1
    assert names[-1] == "record-experiment"

    # DVC is the record: the named experiment, the committed seed params untouched.
    exps = run_cmd(["dvc", "exp", "list", "--name-only"], repo).stdout.split()
    assert exps == ["stride-8"]
    assert _git(repo, "show", "HEAD:params.yaml") == committed
    assert load_params(repo / "params.yaml").evaluate.sliding_stride == 8
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], repo).stdout)
    exp = shown[1]["experiments"][0]["revs"][0]
    assert exp["name"] == "stride-8"
    assert exp["data"]["params"]["params.yaml"]["data"]["evaluate"]["sliding_stride"] == 8

    diff = {r["metric"]: r for r in result["diff"]}
    assert diff["validation_sliding_ppl"]["baseline"] != diff["validation_sliding_ppl"]["run"]
    assert "validation_ppl" not in diff  # the non-overlapping protocol did not change
    files = {"metrics/train.json", "dvclive/metrics.json", "metrics/eval.json"}
    assert {r["file"] for r in result["metrics"]} == files

    arts = _artifacts(state)
    assert list(arts)[:4] == [ARTIFACT_HEADLINE, ARTIFACT_METRICS, ARTIFACT_DIFF, ARTIFACT_SUMMARY]
    headline = arts[ARTIFACT_HEADLINE].data
    assert arts[ARTIFACT_HEADLINE].type == "markdown" and "| validation perplexity |" in headline
    assert len(headline.splitlines()) <= 10  # short: the full tables follow
    # against the committed baseline: its numbers are on the baseline side (4 significant)
    committed = json.loads(_git(repo, "show", "HEAD:metrics/eval.json"))
    assert f" {flows._fmt(committed['validation_ppl'])} |" in headline
    assert arts[ARTIFACT_METRICS].type == "table"
    table_values = [r["value"] for r in json.loads(arts[ARTIFACT_METRICS].data)]
    assert all(v == flows.sig4(v) for v in table_values)
    table = json.loads(arts[ARTIFACT_DIFF].data)
    assert any(row["metric"] == "validation_sliding_ppl" for row in table)
    summary = arts[ARTIFACT_SUMMARY].data
    assert arts[ARTIFACT_SUMMARY].type == "markdown"
    assert "experiment stride-8" in summary and "validation_sliding_ppl" in summary

    # Overrides without a name: the run gets a DVC-style name, and the experiment the same.
    unnamed = infinito_pipeline(
        overrides={"evaluate.sliding_stride": 4}, repo=str(repo), return_state=True
    )
    assert unnamed.is_completed(), unnamed
    name = _run_name(unnamed)
    assert unnamed.result()["experiment"] == name and re.fullmatch(r"[a-z]+-[a-z]+", name)
    assert name in run_cmd(["dvc", "exp", "list", "--name-only"], repo).stdout.split()

    # The same name again is refused before any stage runs.
    again = infinito_pipeline(
        overrides={"evaluate.sliding_stride": 4},
        experiment="stride-8",
        repo=str(repo),
        return_state=True,
    )
    assert again.is_failed()
    with pytest.raises(PipelineError, match="already exists"):
        again.result()
    assert _task_runs(again) == []


@pytest.mark.slow
def test_flow_without_overrides_reruns_the_committed_configuration(
    harness: None, pipeline_repo: Path, run_cmd: Callable
) -> None:
    repo = pipeline_repo
    lock = (repo / "dvc.lock").read_text()
    params = repo / "params.yaml"
    committed = params.read_text()
    write_params(params, {"lr": 0.5})  # an edit nobody committed: refused, never overwritten
    edited = params.read_text()
    refused = infinito_pipeline(repo=str(repo), return_state=True)
    assert refused.is_failed()
    with pytest.raises(PipelineError, match=r"uncommitted changes \(lr: 0\.0002 -> 0\.5\)"):
        refused.result()
    assert params.read_text() == edited
    assert _task_runs(refused) == [("prepare-params", "Failed")]

    run_cmd(["git", "checkout", "params.yaml"], repo)
    state = infinito_pipeline(repo=str(repo), return_state=True)
    assert state.is_completed(), state
    assert state.result()["experiment"] is None
    assert _run_name(state) == f"repro-{_git(repo, 'rev-parse', '--short', 'HEAD').strip()}"
    assert params.read_text() == committed  # started from the committed file
    assert (repo / "dvc.lock").read_text() == lock  # every stage was up to date
    assert run_cmd(["dvc", "exp", "list", "--name-only"], repo).stdout.split() == []
    assert [n for n, s in _task_runs(state) if n in STAGES] == list(STAGES)


def _committed_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(COMMITTED_PARAMS.read_text())
    for args in (["init", "-q"], ["add", "params.yaml"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"],
        cwd=repo,
        check=True,
    )
    return repo


def test_uncommitted_params_are_refused_naming_the_change_and_the_ways_on(
    tmp_path: Path,
) -> None:
    repo = _committed_repo(tmp_path)
    base = COMMITTED_PARAMS.read_text()
    assert flows.refuse_uncommitted_params(repo, base) is False  # clean: nothing to replace
    write_params(repo / "params.yaml", {"lr": 0.5, "model.iit": False})
    edited = (repo / "params.yaml").read_text()
    with pytest.raises(PipelineError) as refused:
        flows.refuse_uncommitted_params(repo, base)
    message = str(refused.value)
    assert "uncommitted changes (lr: 0.0002 -> 0.5; model.iit: True -> False)" in message
    assert "git commit params.yaml" in message and "--set KEY=VALUE" in message
    assert "-lr: 2.0e-4" in message and "+lr: 0.5" in message  # the diff itself
    assert (repo / "params.yaml").read_text() == edited  # never rewritten


def test_an_earlier_flow_run_s_overrides_may_be_replaced(tmp_path: Path) -> None:
    repo = _committed_repo(tmp_path)
    base = COMMITTED_PARAMS.read_text()
    write_params(repo / "params.yaml", {"evaluate.sliding_stride": 8})  # as a run left it
    flows.remember_flow_params(repo)
    assert flows.refuse_uncommitted_params(repo, base) is True
    write_params(repo / "params.yaml", {"seed": 3})  # then a user edits it: that is data
    with pytest.raises(PipelineError, match=r"seed: 42 -> 3"):
        flows.refuse_uncommitted_params(repo, base)


@pytest.mark.slow
def test_flow_with_a_bad_override_fails_before_any_stage(
    harness: None, pipeline_repo: Path
) -> None:
    lock = (pipeline_repo / "dvc.lock").read_text()
    state = infinito_pipeline(
        overrides={"model.n_head": 7}, repo=str(pipeline_repo), return_state=True
    )
    assert state.is_failed()
    with pytest.raises(ConfigError, match="model.n_head=7"):
        state.result()
    assert _task_runs(state) == [("prepare-params", "Failed")]
    assert (pipeline_repo / "dvc.lock").read_text() == lock
