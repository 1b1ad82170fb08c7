"""train stage: train INFINITO on the tokenized corpus, keep the best model and a resumable state.

``python -m infinito.train --data data/tokenized --out models/best --state checkpoints
--metrics metrics/train.json --history metrics/train_history.csv --curves metrics/train_curves.png``
reads ``epochs``, ``batch_size``, ``lr``, ``lambda_phi``, ``seed`` and the ``model``,
``data.seq_len`` and ``train`` sections of ``params.yaml``; options such as ``--lr 1e-4`` override
them outside DVC (``infinito train --epochs 20 --batch-size 16 --lr 2e-4 --lambda-phi 0.1``).
README, Training and Scaling, describe the whole stage; its parts live beside this module:

- ``batches.py``: the windows of the memmapped train split, each epoch's seeded order, and how a
  global batch of ``batch_size`` windows is split over processes and micro-batches;
- ``optim.py``: AdamW (decay on matrices only) and the warmup + cosine/plateau/constant schedule;
- ``runstate.py``: the resumable state (bit-for-bit on CPU with one process; any number of
  processes resumes it), its fingerprint, SIGINT/SIGTERM as a flag checked at step boundaries;
- ``trainlog.py``: progress, the per-validation history and curves, ``metrics/train.json``;
- ``distributed.py``: torchrun (``train.nproc_per_node > 1`` re-executes this module under it),
  DistributedDataParallel, the gathered memory writes; rank 0 alone validates and writes files.

Loss = cross-entropy + ``lambda_phi`` * the model's Delta-Phi term (``lambda_phi = 0``:
cross-entropy exactly); after every optimizer step the model writes its memory candidates.
Validation (each epoch end, and every ``train.eval_every_steps`` steps) uses the evaluate stage's
non-overlapping protocol with ``batch_size`` windows per memory step; the training memory is
restored afterwards. The state is saved at each epoch end, every ``--save-every-sec`` seconds
(default 300: a ``kill -9`` loses at most five minutes), on SIGINT/SIGTERM (exit 130/143) and at
the end; rerunning the same command resumes it. A state from other params or data is refused
naming the keys that differ (``--stale-state discard``, which DVC's command passes, starts fresh
instead); a finished one is not retrained, its outputs are written again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from infinito import distributed
from infinito.batches import TrainData, epoch_order, load_windows, step_layout
from infinito.checkpoint import (
    AsyncSaver,
    portable_rng_state,
    restore_rng_state,
)
from infinito.config import ConfigError, Params, load_params
from infinito.optim import LRFactor, build_optimizer, build_schedulers
from infinito.runstate import (
    STATE_FILE,
    Accumulator,
    Loop,
    restore,
    shared_previous_state,
    snapshot,
    stop_on_signals,
)
from infinito.runtime import autocast, resolve_dtype, seed_everything
from infinito.scoring import Score, preserved_state, score
from infinito.trainlog import (
    Progress,
    export,
    final_metrics,
    history_row,
    log_parameters,
    peak_flops,
)

# Re-exported: the stage's public names (tests, scripts/gpu_check.py) import them from here.
__all__ = [
    "LRFactor",
    "NonFiniteLoss",
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


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved at a step boundary."""

    def __init__(self, signum: int, step: int, state_path: Path) -> None:
        self.signum = signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; the state is saved "
            f"in {state_path}; rerun the same command to resume"
        )


class NonFiniteLoss(Exception):
    """The loss or gradient norm became NaN/inf; nothing from that step was saved."""


def train(
    params: Params,
    data_dir: Path,
    out_dir: Path,
    state_dir: Path,
    metrics_path: Path,
    history_path: Path,
    curves_path: Path | None = None,
    *,
    save_every_sec: float = SAVE_EVERY_SEC,
    stale_state: str = "error",
) -> dict[str, Any]:
    """Train (or resume, or recognise as finished) and write all outputs; return the metrics.

    Runs in each process of a torchrun launch as well (every process returns the metrics).
    Raises ``ConfigError`` on bad input before any work, ``TrainingInterrupted`` after saving the
    state on SIGINT/SIGTERM, ``NonFiniteLoss`` (state of the last save kept) on NaN/inf.
    """
    from infinito.model import Infinito

    t_session = time.perf_counter()
    data_dir, out_dir, state_dir = Path(data_dir), Path(out_dir), Path(state_dir)
    tc = params.train
    if stale_state not in ("error", "discard"):
        raise ConfigError(f"stale_state={stale_state!r} must be 'error' or 'discard'")
    if tc.nproc_per_node > 1 and not distributed.launched():
        raise ConfigError(
            f"train.nproc_per_node={tc.nproc_per_node} trains in {tc.nproc_per_node} processes "
            "under torchrun: run `python -m infinito.train` (the DVC stage's command), which "
            "launches them, or your own torchrun command (README, Scaling); or set "
            "train.nproc_per_node: 1"
        )
    data = TrainData.open(data_dir, params)
    seq_len, batch_size = params.data.seq_len, params.batch_size
    steps_per_epoch = data.steps_per_epoch
    layout = step_layout(
        batch_size, distributed.env_world(), distributed.env_rank(), tc.micro_batch_size
    )
    total_steps = params.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)

    with distributed.process_group(tc.device) as dist:
        device = dist.device
        dtype = resolve_dtype(tc.precision, device)
        state_path, best_dir = state_dir / STATE_FILE, state_dir / "best"
        # rank 0 owns the files and decides; every process gets its decision and state
        state, fp, fp_inputs = shared_previous_state(dist, params, data_dir, state_dir, stale_state)
        if state is not None and state["loop"]["complete"]:
            done = Loop.from_dict(state["loop"])
            if not dist.is_main:
                assert done.final_metrics is not None
                return done.final_metrics
            log.info(
                "training already complete (state in %s matches the params); writing its "
                "outputs again. Delete %s to retrain.",
                state_path,
                state_dir,
            )
            return export(done, best_dir, out_dir, metrics_path, history_path, curves_path)

        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(params.seed)
        model = Infinito(params.model).to(device)
        optimizer = build_optimizer(model, params, device)
        scheduler, plateau = build_schedulers(optimizer, params, total_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if state is None:
            loop = Loop()
            log.info(
                "starting a fresh run: %d steps/epoch x %d epochs%s on %s (%s)%s",
                steps_per_epoch,
                params.epochs,
                f", stopping at step {tc.max_steps}" if tc.max_steps else "",
                device,
                str(dtype).removeprefix("torch."),
                f", {dist.world} processes" if dist.world > 1 else "",
            )
        else:
            restore(state, model, optimizer, scheduler, plateau, scaler, device)
            loop = Loop.from_dict(state["loop"])
            log.info(
                "resuming from %s at epoch %d, step %d/%d",
                state_path,
                loop.epoch + 1,
                loop.step,
                total_steps,
            )
            del state
        if dist.rank > 0:  # the model is initialised alike everywhere; dropout and noise differ
            torch.manual_seed(distributed.rank_seed(params.seed, dist.rank, loop.step))
        if dist.is_main:
            log_parameters(model)

        lam = params.lambda_phi

        def loss_of(out: Any) -> torch.Tensor:
            return out.loss if lam == 0 else out.loss + lam * out.aux_loss

        ddp = None
        if dist.world > 1:
            lo, hi = layout.parts[0]
            x, y = load_windows(data.train, torch.arange(lo, hi), seq_len, device)

            def probe() -> torch.Tensor:
                with autocast(device, dtype):
                    return loss_of(model(x, y))

            ddp = distributed.wrap_model(model, probe, dist)
        plain: Any = model if ddp is None else ddp
        want_compile = tc.compile is True or (tc.compile == "auto" and device.type == "cuda")
        forward: Any = torch.compile(plain) if want_compile else plain
        compiled = want_compile
        saver = AsyncSaver()
        progress = Progress(
            params.epochs,
            steps_per_epoch,
            total_steps,
            tc.log_every,
            batch_size * seq_len,
            enabled=dist.is_main,
        )
        last_save = time.perf_counter()
        wall_before = loop.wall_seconds  # earlier sessions of this run

        def current_state() -> dict[str, Any]:
            return snapshot(fp, fp_inputs, model, optimizer, scheduler, plateau, scaler, loop)

        # Each step's loss, grad norm and stats stay on the device until a flush reads them all
        # at once: a host read per step would stall the host until the device finished the
        # step, so it could not queue the next one meanwhile (launch-bound on a GPU).
        pending: list[tuple[int, int, int, torch.Tensor]] = []  # (step, epoch, batch, numbers)
        stat_keys: list[str] = []
        last_flush = time.perf_counter()

        def flush() -> tuple[float | None, float | None, int]:
            """Read the pending steps' numbers (one host sync); raise ``NonFiniteLoss`` naming
            the first bad step, else add them to the history accumulator. Runs before every
            validation and save, so no state or best model after a bad step is ever written.
            Returns the last step's cross-entropy, its stop flag (several processes) and the
            number of steps read."""
            nonlocal last_flush
            last_flush = time.perf_counter()
            if not pending:
                return None, None, 0
            rows = torch.stack([numbers for *_, numbers in pending]).tolist()
            where = [(step, epoch, batch) for step, epoch, batch, _ in pending]
            pending.clear()
            ce_v = flagged = None
            for (step, epoch, batch), row in zip(where, rows, strict=True):
                total_v, ce_v, *stat_v, gnorm_v = row
                flagged = stat_v.pop() if dist.world > 1 else None
                if not math.isfinite(total_v) or (
                    not math.isfinite(gnorm_v) and not scaler.is_enabled()
                ):
                    if dist.world > 1:  # no process exits while rank 0 saves
                        if dist.is_main:
                            with contextlib.suppress(Exception):
                                saver.wait()
                        distributed.barrier(dist)
                    raise NonFiniteLoss(
                        f"non-finite {'loss' if not math.isfinite(total_v) else 'gradient'}"
                        f" at step {step} (epoch {epoch}, batch {batch}): loss={total_v}, "
                        f"grad norm={gnorm_v}; stopped without saving it; the last good state "
                        f"is {state_path}"
                    )
                loop.acc.add(ce_v, dict(zip(stat_keys, stat_v, strict=True)))
            return ce_v, flagged, len(rows)

        def save(sync: bool = False) -> None:
            nonlocal last_save
            flush()
            if dist.is_main:
                loop.wall_seconds = wall_before + time.perf_counter() - t_session
                saver.save(current_state(), state_path)
                if sync:
                    saver.wait()
            last_save = time.perf_counter()

        def validate() -> Score:
            """Rank 0 scores the validation split; the others wait for its numbers."""
            flush()
            t0 = time.perf_counter()
            result = Score(0.0, 0)
            if dist.is_main:
                with preserved_state(model):
                    result = score(model, data.val, data.val_windows, batch_size, device, dtype)
            if dist.world > 1:
                nll, tokens = distributed.broadcast_floats([result.nll_sum, result.tokens], 2, dist)
                if not dist.is_main:
                    result = Score(nll, int(tokens))
            loop.eval_seconds += time.perf_counter() - t0
            return result

        def record(val: Score, epoch_end: bool) -> None:
            """A history row, the best checkpoint, the plateau schedule and early stopping."""
            row = history_row(loop, optimizer.param_groups[0]["lr"], steps_per_epoch, val)
            train_loss = row["train_loss"]
            loop.history.append(row)
            loop.acc = Accumulator()
            msg = (
                f"epoch {row['epoch']:g} step {loop.step}: train loss "
                f"{'-' if train_loss is None else f'{train_loss:.4f}'}  val loss {val.loss:.4f}  "
                f"val ppl {val.ppl:.2f}"
            )
            stopped_before = loop.early_stopped
            best = loop.track(val.loss, row["epoch"], epoch_end, tc.min_delta, tc.patience)
            if best:
                if dist.is_main:
                    model.save(best_dir)  # atomic: the old best stays whole until the new one is
                msg += "  (best so far)"
            progress.message(msg)
            if plateau is not None and loop.step >= tc.warmup_steps:
                plateau.step(val.loss)
            if loop.early_stopped and not stopped_before:
                progress.message(
                    f"early stopping: no val-loss drop of {tc.min_delta} in {tc.patience} epoch(s)"
                )

        def forward_backward(
            x: torch.Tensor, y: torch.Tensor, scale: float
        ) -> tuple[Any, torch.Tensor]:
            with autocast(device, dtype):
                out = forward(x, y)
            loss = loss_of(out)
            # scale: the micro-batch's share of the global batch x processes (batches.py)
            scaler.scale(loss if scale == 1.0 else loss * scale).backward()
            return out, loss

        def interrupt(signum: int) -> TrainingInterrupted:
            progress.end_epoch()
            save(sync=True)
            distributed.barrier(dist)  # rank 0's state is on disk before any process exits
            return TrainingInterrupted(signum, loop.step, state_path)

        model.train()
        first_step = True
        last_part = len(layout.parts) - 1
        try:
            with stop_on_signals() as stop:
                while (
                    not loop.early_stopped
                    and loop.epoch < params.epochs
                    and loop.step < total_steps
                ):
                    if loop.order is None:
                        loop.order = epoch_order(params.seed, loop.epoch, data.n_windows)
                    progress.start_epoch(loop.epoch, loop.pos, total_steps - loop.step)
                    while loop.pos < steps_per_epoch and loop.step < total_steps:
                        t0 = time.perf_counter()
                        batch = loop.order[loop.pos * batch_size : (loop.pos + 1) * batch_size]
                        parts: list[tuple[Any, int]] = []
                        sums: torch.Tensor | None = None
                        for k, (lo, hi) in enumerate(layout.parts):
                            x, y = load_windows(data.train, batch[lo:hi], seq_len, device)
                            scale = layout.loss_scales[k]
                            sync = ddp.no_sync() if ddp is not None and k < last_part else None
                            with sync or contextlib.nullcontext():
                                if first_step and k == 0 and compiled and tc.compile == "auto":
                                    rng = portable_rng_state()
                                    try:
                                        out, loss = forward_backward(x, y, scale)
                                    except Exception as e:  # dynamo/inductor errors vary
                                        log.warning(
                                            "torch.compile failed at the first step (%s: %s); "
                                            "training without it",
                                            type(e).__name__,
                                            e,
                                        )
                                        optimizer.zero_grad(set_to_none=True)
                                        restore_rng_state(rng)
                                        forward, compiled = plain, False
                                        out, loss = forward_backward(x, y, scale)
                                else:
                                    out, loss = forward_backward(x, y, scale)
                            stat_keys[:] = list(out.stats)
                            row = [loss.detach(), out.loss.detach(), *out.stats.values()]
                            v = torch.stack([t.float() for t in row]) * layout.shares[k]
                            sums = v if sums is None else sums + v  # means over the global batch
                            parts.append((out.candidates, hi - lo))
                            del out, loss
                        assert sums is not None
                        if scaler.is_enabled():
                            scaler.unscale_(optimizer)
                        gnorm = torch.nn.utils.clip_grad_norm_(
                            model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf
                        )
                        if dist.world > 1:  # the whole batch's means, and whether any got a signal
                            flag = torch.tensor([1.0 if stop else 0.0], device=device)
                            sums = distributed.all_reduce_sum(torch.cat([sums, flag]))
                        # the numbers are read (and checked) at the next flush
                        numbers = torch.cat([sums, gnorm.float().reshape(1)])
                        pending.append((loop.step + 1, loop.epoch + 1, loop.pos + 1, numbers))
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        if dist.world == 1 and len(parts) == 1:
                            model.write_memory(parts[0][0])
                        else:
                            model.write_memory(distributed.gather_candidates(parts, dist))
                        del parts
                        if plateau is None or loop.step < tc.warmup_steps:
                            scheduler.step()
                        loop.step += 1
                        loop.pos += 1
                        n_tok = batch_size * seq_len
                        loop.tokens_trained += n_tok
                        end_of_epoch = loop.pos == steps_per_epoch
                        eval_due = bool(
                            tc.eval_every_steps
                            and loop.step % tc.eval_every_steps == 0
                            and not end_of_epoch
                            and loop.step < total_steps
                        )
                        save_due = (
                            not end_of_epoch and time.perf_counter() - last_save >= save_every_sec
                        )
                        # Flushing before a validation or save here, not inside them, keeps
                        # the device's queued work in this step's time. One process on a
                        # device that runs ahead flushes every log_every steps (or second).
                        flagged, n_read = None, 0
                        if (
                            first_step
                            or dist.world > 1
                            or loop.step % tc.log_every == 0
                            or end_of_epoch
                            or eval_due
                            or save_due
                            or loop.step >= total_steps
                            or stop
                            or time.perf_counter() - last_flush >= 1.0
                        ):
                            ce_v, flagged, n_read = flush()
                        acc = loop.acc
                        dt = time.perf_counter() - t0
                        if first_step:
                            loop.first_step_sec, first_step = dt, False
                        else:
                            loop.timed_tokens += n_tok
                            loop.timed_seconds += dt
                            acc.tokens += n_tok
                            acc.seconds += dt
                        if n_read:
                            assert ce_v is not None
                            progress.step(loop, ce_v, optimizer.param_groups[0]["lr"], n_read)
                        if eval_due:
                            record(validate(), epoch_end=False)
                        signum = distributed.stop_signal(stop, dist, flagged)
                        if signum:
                            raise interrupt(signum)
                        if save_due:
                            save()
                    progress.end_epoch()
                    if loop.pos == steps_per_epoch:
                        record(validate(), epoch_end=True)
                        loop.epoch, loop.pos, loop.order = loop.epoch + 1, 0, None
                        save()
                    signum = distributed.stop_signal(stop, dist)
                    if signum:
                        raise interrupt(signum)

            if dist.world > 1:
                differ = distributed.replicas_differ(model, dist)
                if differ:
                    raise RuntimeError(
                        "the training processes hold different weights or memory in "
                        f"{', '.join(differ[:5])}: a distributed-training bug; please report it"
                    )
            # Finished. max_steps inside an epoch (or a stop just before its validation) leaves
            # the last step unvalidated: validate there, so the final row describes the final
            # weights.
            if not loop.history or loop.history[-1]["step"] != loop.step:
                record(validate(), epoch_end=False)
            if not dist.is_main:
                return distributed.broadcast_json(None, dist)
            # Measure the final weights on a train prefix, write everything.
            t0 = time.perf_counter()
            with preserved_state(model):
                train_sub = score(model, data.sub, data.sub_windows, batch_size, device, dtype)
            loop.eval_seconds += time.perf_counter() - t0
            loop.wall_seconds = wall_before + time.perf_counter() - t_session
            loop.final_metrics = final_metrics(
                params, model, loop, train_sub, device, dtype, steps_per_epoch, compiled, dist.world
            )
            loop.complete = True
            saver.save(current_state(), state_path)
            saver.wait()
        finally:
            progress.end_epoch()
            with contextlib.suppress(Exception):  # a failing save must not mask the real error
                saver.wait()
        metrics = export(loop, best_dir, out_dir, metrics_path, history_path, curves_path)
        if dist.world > 1:
            distributed.broadcast_json(metrics, dist)
        return metrics


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line; path defaults are dvc.yaml's (a test keeps them equal)."""
    parser = argparse.ArgumentParser(prog="infinito train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/tokenized"),
        help="tokenized data directory ({split}.bin + meta.json)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("models/best"), help="where the best model is written"
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=Path("checkpoints"),
        help="resumable state directory (state.pt and best/)",
    )
    parser.add_argument("--metrics", type=Path, default=Path("metrics/train.json"))
    parser.add_argument("--history", type=Path, default=Path("metrics/train_history.csv"))
    parser.add_argument(
        "--curves",
        type=Path,
        default=Path("metrics/train_curves.png"),
        help="PNG of the training curves",
    )
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
        params = load_params(args.params, overrides)
        nproc = params.train.nproc_per_node
        if nproc > 1 and not distributed.launched():
            log.info("train.nproc_per_node=%d: launching %d processes with torchrun", nproc, nproc)
            distributed.exec_torchrun(nproc, "infinito.train", argv)
        metrics = train(
            params,
            args.data,
            args.out,
            args.state,
            args.metrics,
            args.history,
            args.curves,
            save_every_sec=args.save_every_sec,
            stale_state=args.stale_state,
        )
    # Every process raises these alike (rank 0's decisions are shared): rank 0 says it once.
    except ConfigError as e:
        if main_rank:
            print(f"train: error: {e}", file=sys.stderr)
        return 2
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
