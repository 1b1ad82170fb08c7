"""Register INFINITO's Prefect deployments with the Prefect server named by ``PREFECT_API_URL``.

Two deployments of the ``infinito-pipeline`` flow (pipelines/flows.py):

* ``infinito-pipeline/seed`` on the ``gpu`` work pool (a process pool: the worker on the GPU
  machine runs the flow in its own checkout and virtualenv). It runs the committed seed
  configuration on a cron schedule, which users edit or pause in the UI; redeploying keeps an
  edited schedule unless ``--cron`` is given. Runs started from the UI fill in ``overrides``
  (a form: lr, batch_size, epochs, lambda_phi, seed, model.iit, data.source, extra) and may
  name the ``experiment``.
* ``infinito-pipeline/quickstart-cpu`` on the ``cpu`` pool: the quickstart's small configuration,
  CPU only, unscheduled; each run is recorded as a DVC experiment.

The deployments name the flow by module (``pipelines.flows:infinito_pipeline``), so a worker
imports it from the virtualenv it runs in: start each worker from its machine's checkout
(``.venv/bin/prefect worker start --pool gpu``). Missing process pools are created.

``prefect.yaml`` declares the same two deployments for ``prefect deploy --all``
(tests/test_flows.py keeps it equal to ``deployment_specs``).

Usage: ``PREFECT_API_URL=http://127.0.0.1:4200/api python -m pipelines.deploy [--cron ...]``
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL

from pipelines.flows import Overrides, infinito_pipeline
from pipelines.quickstart import QUICKSTART_OVERRIDES

GPU_POOL = "gpu"
CPU_POOL = "cpu"
SEED_DEPLOYMENT = "seed"
QUICKSTART_DEPLOYMENT = "quickstart-cpu"
DEFAULT_CRON = "0 3 * * *"  # nightly; a run whose inputs did not change finds every stage cached
SCHEDULE_SLUG = "seed-nightly"


class DeployError(RuntimeError):
    """The deployments cannot be registered as asked; the message says how to fix it."""


def ensure_process_pool(name: str) -> bool:
    """Create the process work pool ``name`` if it does not exist; return True if created."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True
    if pool.type != "process":
        raise DeployError(
            f"work pool {name!r} exists with type {pool.type!r}; INFINITO's deployments need a "
            f"process pool (prefect work-pool delete {name}; prefect work-pool create {name} "
            "--type process)"
        )
    return False


def deployment_specs(
    gpu_pool: str = GPU_POOL, cpu_pool: str = CPU_POOL
) -> dict[str, dict[str, Any]]:
    """The two deployments by name: work pool, parameters, description, tags (the schedule is
    the seed's ``DEFAULT_CRON``); prefect.yaml says the same."""
    return {
        SEED_DEPLOYMENT: {
            "work_pool": gpu_pool,
            "parameters": {},
            "description": (
                "The seed configuration (committed params.yaml) through every DVC stage. "
                "Fill in overrides (lr, model.iit, ...; any other key in extra) and an "
                "experiment name to record a DVC experiment."
            ),
            "tags": ["infinito", "gpu"],
        },
        QUICKSTART_DEPLOYMENT: {
            "work_pool": cpu_pool,
            # in the form's shape: the common keys as fields, the rest in extra
            "parameters": {
                "overrides": Overrides.of(QUICKSTART_OVERRIDES).model_dump(
                    by_alias=True, exclude_none=True
                )
            },
            "description": "The quickstart: a small INFINITO on the builtin corpus, CPU only.",
            "tags": ["infinito", "cpu", "quickstart"],
        },
    }


def _deployment_exists(full_name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(full_name)
        except ObjectNotFound:
            return False
    return True


def deploy(
    cron: str | None = None,
    timezone: str = "UTC",
    gpu_pool: str = GPU_POOL,
    cpu_pool: str = CPU_POOL,
) -> dict[str, UUID]:
    """Register both deployments; return their ids by full name.

    ``cron`` replaces the seed deployment's schedule; ``None`` keeps the schedule it already has
    (as edited in the UI) or, on first deployment, sets ``DEFAULT_CRON``.
    """
    if not PREFECT_API_URL.value():
        raise DeployError(
            "PREFECT_API_URL is not set, so the deployments would go to a temporary server and "
            "vanish. Start a server (prefect server start --host 127.0.0.1) and run: "
            "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    for pool in (gpu_pool, cpu_pool):
        if ensure_process_pool(pool):
            print(f"created process work pool {pool!r}")

    flow_name = infinito_pipeline.name
    seed_name = f"{flow_name}/{SEED_DEPLOYMENT}"
    keep_schedule = cron is None and _deployment_exists(seed_name)
    # By module: each worker imports the flow from its own checkout and virtualenv. No
    # deployment concurrency limit: workers on several machines may each run the seed; one
    # checkout runs one flow at a time through the worker's own --limit 1.
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH}
    specs = deployment_specs(gpu_pool, cpu_pool)
    seed_spec, quick_spec = specs[SEED_DEPLOYMENT], specs[QUICKSTART_DEPLOYMENT]
    seed = infinito_pipeline.to_deployment(
        name=SEED_DEPLOYMENT,
        work_pool_name=seed_spec["work_pool"],
        # No schedules given on an update keeps the deployment's own (as edited in the UI).
        schedules=None
        if keep_schedule
        else [Cron(cron or DEFAULT_CRON, timezone=timezone, slug=SCHEDULE_SLUG)],
        parameters=seed_spec["parameters"],
        description=seed_spec["description"],
        tags=seed_spec["tags"],
        **common,
    )
    quickstart = infinito_pipeline.to_deployment(
        name=QUICKSTART_DEPLOYMENT,
        work_pool_name=quick_spec["work_pool"],
        parameters=quick_spec["parameters"],
        description=quick_spec["description"],
        tags=quick_spec["tags"],
        **common,
    )
    ids = {
        seed_name: seed.apply(),
        f"{flow_name}/{QUICKSTART_DEPLOYMENT}": quickstart.apply(),
    }
    for name, dep_id in ids.items():
        print(f"deployed {name} ({dep_id})")
    if keep_schedule:
        print(f"{seed_name}: kept its existing schedule (pass --cron to replace it)")
    else:
        print(f"{seed_name}: schedule {cron or DEFAULT_CRON} ({timezone}); edit it in the UI")
    print(f"start a worker: prefect worker start --pool {gpu_pool} --limit 1")
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cron",
        default=None,
        help=f"seed schedule (default on first deploy: {DEFAULT_CRON!r}; "
        "later deploys keep the schedule unless this is given)",
    )
    parser.add_argument("--timezone", default="UTC", help="time zone of the cron schedule")
    parser.add_argument("--gpu-pool", default=GPU_POOL, help="work pool of the seed deployment")
    parser.add_argument("--cpu-pool", default=CPU_POOL, help="work pool of the quickstart")
    args = parser.parse_args(argv)
    try:
        deploy(args.cron, args.timezone, args.gpu_pool, args.cpu_pool)
    except DeployError as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
