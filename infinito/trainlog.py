"""What a training run reports: progress, its DVCLive series, train.json.

``Progress`` shows a tqdm bar per epoch on a terminal that can draw one and otherwise one
concise line every ``train.log_every`` steps, both with the whole run's ETA. ``history_row`` is
one validation's row of the run's history (kept in the resumable state); ``LiveLog`` logs every
row, and the training loss every ``log_every`` steps, with DVCLive while the run trains (``dvc
plots show`` draws them, docs/training.md); ``final_metrics`` are the flat numbers of
``metrics/train.json``, which ``export`` writes with the best model once a run is finished. In a
run of several processes only rank 0 reports.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from infinito.atomic import atomic_dir, write_json
from infinito.config import Params
from infinito.runstate import Loop, train_stage_params
from infinito.runtime import is_tty
from infinito.scoring import Score, perplexity

# The train stage's log: one logger for all its lines, wherever the code lives.
log = logging.getLogger("infinito.train")

# Dense bf16 tensor-core peak per device, matched on torch.cuda.get_device_name (first hit wins).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("GH200", 989.4e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312.0e12),
)
# The history row's own columns; every other key of a row is one of the model's stats (PHI and
# its components, threshold, Delta-Phi, memory numbers ...: whatever the model reports, so new
# statistics flow through to DVCLive and train.json without a list to update). The ablation
# reports none, so its rows, series and train.json have no IIT key at all.
BASE_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_ppl",
    "val_loss",
    "val_ppl",
    "tokens_per_sec",
)
# DVCLive series of one step's training loss (cross-entropy, training mode) at the first and
# every train.log_every-th optimizer step: the curve between validations.
STEP_LOSS = "train_loss_step"
# Where DVCLive keeps its series, under the run's DVCLive directory (DVCLive's own layout).
SERIES_DIR = Path("plots") / "metrics"


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense bf16/fp16 peak in FLOP/s, or None when unknown or not mixed precision."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def history_row(loop: Loop, lr: float, steps_per_epoch: int, val: Score) -> dict[str, Any]:
    """The history row of a validation: the training means since the previous row and ``val``.

    Numbers a period does not have (a training loss when no step ran since the previous row) are
    left out, never written as zero.
    """
    acc = loop.acc
    train_loss = acc.loss_sum / acc.steps if acc.steps else None
    row: dict[str, Any] = {
        "epoch": round(loop.step / steps_per_epoch, 4),
        "step": loop.step,
        "lr": lr,
        "train_loss": train_loss,
        "train_ppl": perplexity(train_loss) if train_loss is not None else None,
        "val_loss": val.loss,
        "val_ppl": val.ppl,
        "tokens_per_sec": acc.tokens / acc.seconds if acc.seconds > 0 else None,
        **acc.means(),  # each over the steps that measured it (a write's, a step's)
    }
    return {k: v for k, v in row.items() if v is not None}


def stat_keys(row: dict[str, Any]) -> list[str]:
    """The model statistics in a history row (every key but the row's own columns)."""
    return [k for k in row if k not in BASE_COLUMNS]


class LiveLog:
    """The run's DVCLive record: one series per history column plus the step-level loss.

    DVCLive (``dvclive.Live``) writes ``DIR/plots/metrics/NAME.tsv`` (one row per logged step)
    and ``DIR/metrics.json`` (the latest value of each series and the step) at every validation,
    so ``dvc plots show``, ``dvc exp show`` and the VS Code extension follow a run while it
    trains, and ``DIR/params.yaml`` with the params it trains with. The x axis is the optimizer
    step. Inside ``dvc exp run`` DVC itself records the experiment: ``save_dvc_exp=False``, and
    ``dvcyaml=False`` because the project's dvc.yaml declares these files as the train stage's
    outputs (DVCLive writing its own dvc.yaml would change the pipeline during the run).

    The trainer's resumable state is the source of truth: the directory is always opened fresh
    (DVCLive's own ``resume=True`` would keep the steps logged after the last saved state and
    then log them again) and ``replay`` rewrites the saved history into it, so after a resume,
    even from ``kill -9``, each step is in each series once. Only rank 0 keeps one.
    """

    def __init__(self, live_dir: Path, params: Params) -> None:
        from dvclive import Live

        self.dir = Path(live_dir)
        self.live = Live(
            dir=str(self.dir), resume=False, save_dvc_exp=False, dvcyaml=False, report=None
        )
        self.live.log_params(train_stage_params(params))
        self.ended = False

    def _log(self, step: int, values: dict[str, Any]) -> None:
        self.live.step = step
        for name, value in values.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.live.log_metric(name, value)

    def replay(self, loop: Loop) -> None:
        """Write the saved state's series (an empty state writes nothing)."""
        for row in loop.step_log:
            self._log(row["step"], row)
        for row in loop.history:
            self._log(row["step"], row)
        if loop.step_log or loop.history:
            self.live.step = max(r["step"] for r in (*loop.step_log, *loop.history))
            self.live.sync()

    def step_loss(self, row: dict[str, Any]) -> None:
        """One step-level row (``step`` and ``train_loss_step``); written, not yet summarised."""
        self._log(row["step"], row)

    def validation(self, row: dict[str, Any]) -> None:
        """A history row: every number in it, then DVCLive's step (metrics.json, VS Code)."""
        self._log(row["step"], row)
        self.live.next_step()

    def end(self) -> None:
        """DVCLive's end of the run (summary and dvc.yaml-free bookkeeping); once."""
        if not self.ended:
            self.ended = True
            self.live.end()


def read_series(live_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every DVCLive series under ``live_dir``: name -> [(step, value), ...] in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    root = Path(live_dir) / SERIES_DIR
    for path in sorted(root.rglob("*.tsv")):
        name = path.relative_to(root).with_suffix("").as_posix()
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        out[name] = [(int(r["step"]), float(r[path.stem])) for r in rows]
    return out


def export(loop: Loop, best_dir: Path, out_dir: Path, metrics_path: Path) -> dict[str, Any]:
    """Write the run's outputs from the finished state: the best model and train.json."""
    with atomic_dir(out_dir) as tmp:
        for f in best_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
    assert loop.final_metrics is not None
    write_json(metrics_path, loop.final_metrics)
    return loop.final_metrics


class Progress:
    """A tqdm bar per epoch on a terminal that can show one; otherwise one line every
    ``log_every`` steps. Both show the whole run's ETA: the steps left at this session's pace so
    far (wall time, so validations and saves count too).

    ``enabled=False`` (processes other than rank 0) shows nothing.
    """

    def __init__(
        self,
        epochs: int,
        steps_per_epoch: int,
        total_steps: int,
        log_every: int,
        tokens_per_step: int,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.tty = enabled and is_tty()
        self.epochs, self.spe, self.total = epochs, steps_per_epoch, total_steps
        self.every, self.tokens_per_step = log_every, tokens_per_step
        self.bar: Any = None
        self.start: tuple[float, int] | None = None  # (clock, step) at this session's first step

    def start_epoch(self, epoch: int, pos: int, steps_left: int) -> None:
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=min(self.spe, pos + steps_left),  # max_steps may end it early
                initial=pos,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                unit="step",
                dynamic_ncols=True,
                leave=True,
            )

    def run_eta(self, step: int) -> float | None:
        """Seconds until the run's last step at the pace since this session's first step."""
        now = time.perf_counter()
        if self.start is None:
            self.start = (now, step)
            return None
        t0, step0 = self.start
        if step <= step0:
            return None
        return (self.total - step) * (now - t0) / (step - step0)

    def step(self, loop: Loop, loss: float, lr: float, steps: int = 1) -> None:
        """``steps`` steps ended at ``loop.step``, the last with training loss ``loss``. The
        trainer reports every ``log_every`` steps at the latest, so no line is skipped."""
        tok_s = loop.timed_tokens / loop.timed_seconds if loop.timed_seconds > 0 else 0.0
        eta = self.run_eta(loop.step)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}",
                tok_s=f"{tok_s:,.0f}",
                run_eta="-" if eta is None else _duration(eta),
                refresh=False,
            )
            self.bar.update(steps)
        elif self.enabled and loop.step % self.every == 0:
            log.info(
                "epoch %d/%d  step %d/%d  loss %.4f  lr %.2e  %s tok/s  run eta %s",
                loop.epoch + 1,
                self.epochs,
                loop.step,
                self.total,
                loss,
                lr,
                f"{tok_s:,.0f}",
                "-" if eta is None else _duration(eta),
            )

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            log.info("%s", text)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def log_parameters(model: Any) -> None:
    """Log the parameter count and its breakdown by part."""
    total = model.num_params()
    lines = [f"parameters: {total:,}"]
    for name, n in model.param_breakdown().items():
        lines.append(f"  {name:<28} {n:>12,}  {100 * n / total:5.1f}%")
    log.info("%s", "\n".join(lines))


def final_metrics(
    params: Params,
    model: Any,
    loop: Loop,
    train_sub: Score,
    device: torch.device,
    dtype: torch.dtype,
    steps_per_epoch: int,
    compiled: bool,
    world: int = 1,
) -> dict[str, Any]:
    """train.json's numbers (docs/training.md). tokens/s counts every process's tokens, so
    with ``world`` processes the MFU is against ``world`` devices' peak."""
    last = loop.history[-1]
    tok_s = loop.timed_tokens / loop.timed_seconds if loop.timed_seconds > 0 else 0.0
    m: dict[str, Any] = {
        "best_epoch": loop.best_epoch,
        "best_step": loop.best_step,
        "best_val_loss": loop.best_val_loss,
        "best_val_ppl": perplexity(loop.best_val_loss),
        "final_val_loss": last["val_loss"],
        "final_val_ppl": last["val_ppl"],
        "final_train_loss": train_sub.loss,
        "final_train_ppl": train_sub.ppl,
        "tokens_per_sec": tok_s,
        "wall_time_sec": loop.wall_seconds,
        "eval_time_sec": loop.eval_seconds,
        "first_step_sec": loop.first_step_sec,
        "n_params": model.num_params(),
        "steps": loop.step,
        "epochs_completed": round(loop.step / steps_per_epoch, 4),
        "tokens_trained": loop.tokens_trained,
        "early_stopped": int(loop.early_stopped),
        "compiled": int(compiled),  # torch.compile in the last session (0 on CPU)
    }
    peak = peak_flops(device, dtype)
    if peak is not None:
        m["mfu"] = tok_s * model.flops_per_token(params.data.seq_len) / (peak * world)
    if device.type == "cuda":
        m["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    # iit_*: the threshold, phi weights and memory as training left them; the other model stats
    # as the training means of the last history row
    now = {**model.memory_stats(), **model.iit_stats()}
    m.update({f"iit_{k}": last[k] for k in stat_keys(last) if k not in now})
    m.update({f"iit_{k}": v for k, v in now.items()})
    return m
