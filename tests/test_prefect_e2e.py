"""End to end against a real Prefect server: pool, deployments, a worker, a run through the API.

The test starts ``prefect server start`` on 127.0.0.1 and a free port with a throwaway
PREFECT_HOME, creates the ``gpu`` process pool as docs/prefect.md does, registers the deployments
with ``python -m pipelines.deploy``, starts ``prefect worker start --pool gpu``, triggers the seed
deployment through the API with a tiny repository and an override, waits for the run and checks
its artifacts and the DVC experiment it recorded. Every wait is bounded; the server and the
worker are stopped (process group) whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings

from pipelines.deploy import DEFAULT_CRON, QUICKSTART_DEPLOYMENT, SEED_DEPLOYMENT
from pipelines.flows import (
    ARTIFACT_DIFF,
    ARTIFACT_HEADLINE,
    ARTIFACT_METRICS,
    ARTIFACT_SUMMARY,
    Overrides,
)
from pipelines.quickstart import QUICKSTART_OVERRIDES

SERVER_START_TIMEOUT_S = 180
WORKER_READY_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600
STOP_TIMEOUT_S = 20
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


class Proc:
    """A background process in its own process group, logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.log = log
        self._fh: IO[str] = log.open("w")
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL it if it is still there after STOP_TIMEOUT_S."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except ProcessLookupError:
                pass
        # Children (the flow-run process) share the group; make sure none outlives the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._fh.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout}s waiting for {what}\n"
                + "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs)
            )
        time.sleep(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A real Prefect server on 127.0.0.1; yields its API URL and the environment of its clients."""
    base = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            "PREFECT_HOME": str(base / "home"),  # throwaway: database, profiles, logs
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PREFECT_UI_ENABLED": "false",  # the API is what the test needs; skips building the UI
            "HF_HUB_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1",
        }
    )
    env.pop("PREFECT_API_URL", None)
    srv = Proc(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        base / "server.log",
        base,
    )
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        if not srv.alive():
            pytest.fail(f"prefect server exited ({srv.proc.returncode}):\n{_tail(srv.log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, SERVER_START_TIMEOUT_S, "the Prefect server", [srv.log])
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        srv.stop()


def test_deploy_refuses_to_run_without_a_server(capsys: pytest.CaptureFixture) -> None:
    from pipelines import deploy

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert deploy.main([]) == 2
    err = capsys.readouterr().err
    assert "PREFECT_API_URL is not set" in err and "prefect server start --host 127.0.0.1" in err


@pytest.mark.slow
def test_deploy_worker_and_a_run_through_the_api(
    server: tuple[str, dict[str, str]],
    pipeline_repo: Path,
    run_cmd: Callable,
    tmp_path: Path,
) -> None:
    url, env = server
    root = Path(__file__).resolve().parents[1]

    def cli(*args: str) -> str:
        proc = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    # docs/prefect.md's path: create the pools, deploy, start a worker on the pool.
    cli(*PREFECT, "work-pool", "create", "gpu", "--type", "process")
    cli(*PREFECT, "work-pool", "create", "cpu", "--type", "process")
    # prefect.yaml first (`prefect deploy --all`), then pipelines.deploy over it: the same two
    out = cli(*PREFECT, "--no-prompt", "deploy", "--all")
    assert "infinito-pipeline/seed" in out and "infinito-pipeline/quickstart-cpu" in out
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        from_yaml = {
            name: client.read_deployment_by_name(f"infinito-pipeline/{name}")
            for name in (SEED_DEPLOYMENT, QUICKSTART_DEPLOYMENT)
        }
    out = cli(sys.executable, "-m", "pipelines.deploy")
    assert "infinito-pipeline/seed" in out and "infinito-pipeline/quickstart-cpu" in out
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    worker = Proc(
        [*PREFECT, "worker", "start", "--pool", "gpu", "--limit", "1"],
        worker_env,
        tmp_path / "worker.log",
        root,
    )
    try:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            seed = client.read_deployment_by_name(f"infinito-pipeline/{SEED_DEPLOYMENT}")
            assert seed.work_pool_name == "gpu"
            assert [(s.schedule.cron, s.active) for s in seed.schedules] == [(DEFAULT_CRON, True)]
            quick = client.read_deployment_by_name(f"infinito-pipeline/{QUICKSTART_DEPLOYMENT}")
            assert quick.work_pool_name == "cpu"
            assert Overrides.of(quick.parameters["overrides"]).dotted() == QUICKSTART_OVERRIDES
            assert client.read_work_pool("cpu").type == "process"
            for name, dep in ((SEED_DEPLOYMENT, seed), (QUICKSTART_DEPLOYMENT, quick)):
                yaml_dep = from_yaml[name]
                assert dep.id == yaml_dep.id  # the same deployment, updated
                assert (yaml_dep.entrypoint, yaml_dep.work_pool_name, yaml_dep.parameters) == (
                    "pipelines.flows:infinito_pipeline",
                    dep.work_pool_name,
                    dep.parameters,
                )
                assert yaml_dep.tags == dep.tags and yaml_dep.description == dep.description
            assert [s.schedule.cron for s in from_yaml[SEED_DEPLOYMENT].schedules] == [DEFAULT_CRON]
            # the run form: the common overrides are typed fields
            form = seed.parameter_openapi_schema["definitions"]["Overrides"]["properties"]
            assert {"lr", "batch_size", "epochs", "lambda_phi", "seed"} <= set(form)
            assert {"model.iit", "data.source", "extra"} <= set(form)

            def worker_online() -> bool:
                assert worker.alive(), _tail(worker.log)
                workers = client.read_workers_for_work_pool("gpu")
                return any(w.status == "ONLINE" for w in workers)

            wait_for(worker_online, WORKER_READY_TIMEOUT_S, "the worker", [worker.log])

            run = client.create_flow_run_from_deployment(
                seed.id,
                parameters={
                    "overrides": {"evaluate.sliding_stride": 8},
                    "experiment": "e2e",
                    "repo": str(pipeline_repo),
                },
            )

            def finished() -> bool:
                assert worker.alive(), _tail(worker.log)
                state = client.read_flow_run(run.id).state
                return state is not None and state.is_final()

            wait_for(finished, RUN_TIMEOUT_S, "the flow run", [worker.log])
            flow_run = client.read_flow_run(run.id)
            assert flow_run.state is not None
            assert flow_run.state.is_completed(), f"{flow_run.state}\n{_tail(worker.log)}"
            assert flow_run.work_pool_name == "gpu"
            assert flow_run.name == "e2e"  # the DVC experiment's name
            arts = {
                a.key: a
                for a in client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])
                    )
                )
            }
    finally:
        worker.stop()

    assert {ARTIFACT_HEADLINE, ARTIFACT_METRICS, ARTIFACT_DIFF, ARTIFACT_SUMMARY} <= set(arts)
    diff = json.loads(arts[ARTIFACT_DIFF].data)
    assert any(r["metric"] == "validation_sliding_ppl" and r["baseline"] != r["run"] for r in diff)
    assert "experiment e2e" in arts[ARTIFACT_SUMMARY].data
    # The run happened in the repository it was given, and DVC recorded it.
    assert run_cmd(["dvc", "exp", "list", "--name-only"], pipeline_repo).stdout.split() == ["e2e"]
