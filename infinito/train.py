"""train stage: train INFINITO on the tokenized corpus, keep the best model and a resumable state.

``python -m infinito.train --data DIR --out DIR --state DIR --metrics JSON --live DIR``
(dvc.yaml's train command gives the paths) reads ``epochs``, ``batch_size``,
``lr``, ``lambda_phi``, ``seed`` and the ``model``, ``data.seq_len`` and ``train`` sections of
``params.yaml``; options such as ``--epochs 20 --batch-size 16 --lr 2e-4 --lambda-phi 0.1``
override them outside DVC.
docs/training.md and docs/scaling.md describe the whole stage; its parts live beside it:

- ``trainer.py``: one session in parts (setup, the optimizer step, the flush of pending numbers,
  validation and best-keeping, saves) over one explicit state;
- ``batches.py``: the windows of the memmapped train split, each epoch's seeded order, and how a
  global batch of ``batch_size`` windows is split over processes and micro-batches;
- ``optim.py``: AdamW (decay on matrices only) and the warmup + cosine/plateau/constant schedule;
- ``runstate.py``: the resumable state (bit-for-bit on CPU with one process; any number of
  processes resumes it), its fingerprint, SIGINT/SIGTERM as a flag checked at step boundaries;
- ``trainlog.py``: progress, the DVCLive series (``--live``), ``metrics/train.json``;
- ``distributed.py``: torchrun (``train.nproc_per_node > 1`` re-executes this module under it),
  DistributedDataParallel, the gathered memory writes; rank 0 alone validates and writes files.

Loss = cross-entropy + ``lambda_phi`` * the model's Delta-Phi term (``lambda_phi = 0``:
cross-entropy exactly); after every optimizer step the model writes its memory candidates.
Validation (each epoch end, and every ``train.eval_every_steps`` steps) runs ``scoring.score``,
the evaluate stage's non-overlapping protocol, with ``batch_size`` windows per memory step; the
training memory is restored afterwards. The state is saved at each epoch end, every
``--save-every-sec`` seconds (default 300: a ``kill -9`` loses at most five minutes), on
SIGINT/SIGTERM (exit 130/143) and at the end; rerunning the same command resumes it. A state
from other params, data or initial weights (``train.init_from``, ``infinito/init.py``) is
refused naming the keys that differ (``--stale-state discard``, which DVC's command passes,
starts fresh instead); a finished one is not retrained, its outputs are written again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from infinito import distributed, supervision
from infinito.atomic import DiskFull
from infinito.batches import TrainData, epoch_order, step_layout
from infinito.config import PARAMS_FILE, ConfigError, Params, stage_params
from infinito.init import resolve as resolve_init
from infinito.optim import LRFactor, build_optimizer, build_schedulers
from infinito.runstate import (
    STATE_FILE,
    Loop,
    TrainingAborted,
    shared_previous_state,
    stop_on_signals,
)
from infinito.trainer import NonFiniteLoss, Trainer, TrainingInterrupted
from infinito.trainlog import LiveLog, export, peak_flops

# Re-exported: the stage's public names (tests, scripts/gpu_check.py) import them from here.
__all__ = [
    "LRFactor",
    "NonFiniteLoss",
    "TrainingAborted",
    "TrainingInterrupted",
    "build_optimizer",
    "build_parser",
    "build_schedulers",
    "epoch_order",
    "main",
    "peak_flops",
    "train",
]

log = logging.getLogger(__name__)

SAVE_EVERY_SEC = 300.0
# The params.yaml keys this stage reads: dvc.yaml's train params (tests keep them equal).
PARAMS_KEYS = ("epochs", "batch_size", "lr", "lambda_phi", "seed", "model", "data.seq_len", "train")


def train(
    params: Params,
    data_dir: Path,
    out_dir: Path,
    state_dir: Path,
    metrics_path: Path,
    live_dir: Path | None = None,
    *,
    save_every_sec: float = SAVE_EVERY_SEC,
    stale_state: str = "error",
) -> dict[str, Any]:
    """Train (or resume, or recognise as finished) and write all outputs; return the metrics.

    ``live_dir`` receives the DVCLive record (series, metrics.json, params.yaml; None: none).
    Runs in each process of a torchrun launch as well (every process returns the metrics).
    Raises ``ConfigError`` on bad input before any work, ``TrainingInterrupted`` after saving the
    state on SIGINT/SIGTERM, ``NonFiniteLoss`` (state of the last save kept) on NaN/inf.
    """
    started = time.perf_counter()
    data_dir, out_dir, state_dir = Path(data_dir), Path(out_dir), Path(state_dir)
    tc = params.train
    if stale_state not in ("error", "discard"):
        raise ConfigError(f"stale_state={stale_state!r} must be 'error' or 'discard'")
    if tc.nproc_per_node > 1 and not distributed.launched():
        raise ConfigError(
            f"train.nproc_per_node={tc.nproc_per_node} trains in {tc.nproc_per_node} processes "
            "under torchrun: run `python -m infinito.train` (the DVC stage's command), which "
            "launches them, or your own torchrun command (docs/scaling.md); or set "
            "train.nproc_per_node: 1"
        )
    start = resolve_init(tc.init_from)  # a bad start fails here, before any work
    start.check(params.model)
    data = TrainData.open(data_dir, params)
    layout = step_layout(
        params.batch_size, distributed.env_world(), distributed.env_rank(), tc.micro_batch_size
    )
    total_steps = params.epochs * data.steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    outputs = (out_dir, metrics_path)
    # rank 0 owns the state directory: one trainer at a time on it
    lock = supervision.state_lock(state_dir) if distributed.env_rank() == 0 else None

    with lock or contextlib.nullcontext(), distributed.process_group(tc.device) as dist:
        # rank 0 owns the files and decides; every process gets its decision and state
        state, fp, fp_inputs = shared_previous_state(
            dist, params, data_dir, state_dir, stale_state, start
        )
        live = LiveLog(live_dir, params) if dist.is_main and live_dir is not None else None
        if state is not None and state["loop"]["complete"]:
            done = Loop.from_dict(state["loop"])
            if not dist.is_main:
                assert done.final_metrics is not None
                return done.final_metrics
            log.info(
                "training already complete (state in %s matches the params); writing its "
                "outputs again. Delete %s to retrain.",
                state_dir / STATE_FILE,
                state_dir,
            )
            if live is not None:
                live.replay(done)
                live.end()
            return export(done, state_dir / "best", *outputs)

        trainer = Trainer(
            params,
            data,
            layout,
            dist,
            total_steps,
            state,
            (fp, fp_inputs),
            state_dir,
            save_every_sec,
            started,
            start,
            live,
        )
        del state  # restored into the trainer; the copy would only hold memory
        try:
            with stop_on_signals() as stop:
                trainer.fit(stop)
                # a signal now lets the last validation and save finish; a second aborts
                on_rank0 = trainer.finish()
            if not on_rank0:
                return distributed.broadcast_json(None, dist)
        except TrainingAborted:
            trainer.abandon()  # exit now: no waiting for a save in flight
            raise
        finally:
            trainer.close()
        metrics = export(trainer.loop, trainer.best_dir, *outputs)
        if dist.world > 1:
            distributed.broadcast_json(metrics, dist)
        return metrics


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line. Paths have no defaults: dvc.yaml's command gives them."""
    parser = argparse.ArgumentParser(prog="infinito train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    paths = parser.add_argument_group("paths (dvc.yaml's train command passes them)")
    for flag, help_ in (
        ("--data", "tokenized data directory ({split}.bin + meta.json)"),
        ("--out", "where the best model is written"),
        ("--state", "resumable state directory (state.pt and best/)"),
        ("--metrics", "train.json: the run's flat metrics"),
        ("--live", "DVCLive directory: the series, metrics.json, params.yaml"),
    ):
        paths.add_argument(flag, type=Path, required=True, help=help_)
    parser.add_argument(
        "--stale-state",
        choices=("error", "discard"),
        default="error",
        help="what to do with a state saved under other params (default: error)",
    )
    parser.add_argument(
        "--save-every-sec",
        type=float,
        default=SAVE_EVERY_SEC,
        help="also save the state mid-epoch this often (seconds)",
    )
    over = parser.add_argument_group("overrides of params.yaml")
    over.add_argument("--epochs", type=int)
    over.add_argument("--batch-size", type=int)
    over.add_argument("--lr", type=float)
    over.add_argument("--lambda-phi", type=float)
    over.add_argument("--seed", type=int)
    over.add_argument("--max-steps", type=int, help="train.max_steps")
    over.add_argument("--device", help="train.device: auto, cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The stage's entry; with ``train.nproc_per_node > 1`` it re-executes under torchrun."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    main_rank = distributed.env_rank() == 0  # the other processes report nothing new
    logging.basicConfig(
        level=logging.INFO if main_rank else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    overrides = {
        key: value
        for key, value in {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lambda_phi": args.lambda_phi,
            "seed": args.seed,
            "train.max_steps": args.max_steps,
            "train.device": args.device,
        }.items()
        if value is not None
    }
    try:
        # the launcher's death stops the trainer (saving its state); torchrun inherits it
        with (
            supervision.stop_when_orphaned(through_launcher=distributed.launched()),
            stage_params(args.params, PARAMS_KEYS, overrides) as params,
        ):
            nproc = params.train.nproc_per_node
            if nproc > 1 and not distributed.launched():
                msg = "train.nproc_per_node=%d: launching %d processes with torchrun"
                log.info(msg, nproc, nproc)
                distributed.exec_torchrun(nproc, "infinito.train", argv)
            metrics = train(
                params,
                args.data,
                args.out,
                args.state,
                args.metrics,
                args.live,
                save_every_sec=args.save_every_sec,
                stale_state=args.stale_state,
            )
    # Every process raises these alike (rank 0's decisions are shared): rank 0 says it once.
    except (ConfigError, DiskFull) as e:
        if main_rank:
            print(f"train: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        if main_rank:
            print(f"train: {e}", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLoss as e:
        if main_rank:
            print(f"train: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        if main_rank:
            print(f"train: {e}", file=sys.stderr)
        return 128 + e.signum
    if main_rank:
        print(
            f"best val loss {metrics['best_val_loss']:.4f} (ppl {metrics['best_val_ppl']:.2f}) "
            f"at epoch {metrics['best_epoch']:g}; {metrics['tokens_per_sec']:,.0f} tokens/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
