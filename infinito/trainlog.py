"""What a training run reports: progress, the per-validation history and curves, train.json.

``Progress`` shows a tqdm bar per epoch on a terminal that can draw one and otherwise one
concise line every ``train.log_every`` steps, both with the whole run's ETA. ``write_history``
writes one CSV row per validation (DVC plots read it), ``render_curves`` the same as a PNG,
``final_metrics`` the flat numbers of ``metrics/train.json``; ``export`` writes all of them and
the best model once a run is finished.
In a run of several processes only rank 0 reports.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from infinito.atomic import atomic_dir, atomic_open, write_json
from infinito.config import Params
from infinito.iit import WRITE_STATS
from infinito.runstate import Loop
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
IIT_COLUMNS = (
    "phi_mean",
    "phi_temporal_coherence",
    "phi_integration",
    "phi_complexity",
    "phi_attention_diversity",
    "threshold",
    "delta_phi",
    "aux_loss",
    "memory_utilisation",
    *WRITE_STATS,
)
HISTORY_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_ppl",
    "val_loss",
    "val_ppl",
    *IIT_COLUMNS,
    "tokens_per_sec",
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense bf16/fp16 peak in FLOP/s, or None when unknown or not mixed precision."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def history_row(loop: Loop, lr: float, steps_per_epoch: int, val: Score) -> dict[str, Any]:
    """The history row of a validation: the training means since the previous row and ``val``."""
    acc = loop.acc
    train_loss = acc.loss_sum / acc.steps if acc.steps else None
    return {
        "epoch": round(loop.step / steps_per_epoch, 4),
        "step": loop.step,
        "lr": lr,
        "train_loss": train_loss,
        "train_ppl": perplexity(train_loss) if train_loss is not None else None,
        "val_loss": val.loss,
        "val_ppl": val.ppl,
        **{k: v for k, v in acc.means().items() if k in IIT_COLUMNS},
        "tokens_per_sec": acc.tokens / acc.seconds if acc.seconds > 0 else None,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"
    return str(value)


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """One CSV row per validation; IIT cells are empty for the ablation."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for row in history:
        writer.writerow([_fmt(row.get(c)) for c in HISTORY_COLUMNS])
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(buf.getvalue())


def render_curves(path: Path, history: list[dict[str, Any]]) -> None:
    """A PNG of the training curves (loss, perplexity, lr, PHI, memory, throughput)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(name: str) -> list[float]:
        return [math.nan if r.get(name) is None else float(r[name]) for r in history]

    x = col("epoch")
    panels: list[tuple[str, list[str], bool]] = [
        ("loss (nats/token)", ["train_loss", "val_loss"], False),
        ("perplexity", ["train_ppl", "val_ppl"], True),
        ("learning rate", ["lr"], False),
        ("tokens/s", ["tokens_per_sec"], False),
    ]
    if any(r.get("phi_mean") is not None for r in history):
        panels += [
            ("PHI", ["phi_mean", "threshold"], False),
            (
                "PHI components",
                [c for c in IIT_COLUMNS if c.startswith("phi_") and c != "phi_mean"],
                False,
            ),
            ("Delta-Phi and aux loss", ["delta_phi", "aux_loss"], False),
            ("memory utilisation", ["memory_utilisation"], False),
        ]
    if any(r.get("memory_accepted_fraction") is not None for r in history):
        panels += [
            (
                "memory writes (fraction of candidates)",
                ["memory_accepted_fraction", "memory_written_fraction"],
                False,
            ),
            ("evicted slot age (writes)", ["memory_evicted_age"], False),
            (
                "candidate PHI",
                ["memory_accepted_phi_p50", "memory_rejected_phi_p50", "threshold"],
                False,
            ),
        ]
    cols = 4 if len(panels) > 4 else 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (title, names, logy) in zip(axes.flat[: len(panels)], panels, strict=True):
        for name in names:
            ax.plot(x, col(name), marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if logy:
            ax.set_yscale("log")
        if len(names) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def export(
    loop: Loop,
    best_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    history_path: Path,
    curves_path: Path | None,
) -> dict[str, Any]:
    """Write the run's outputs from the finished state: best model, metrics, history, curves."""
    with atomic_dir(out_dir) as tmp:
        for f in best_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
    assert loop.final_metrics is not None
    write_json(metrics_path, loop.final_metrics)
    write_history(history_path, loop.history)
    if curves_path is not None:
        render_curves(curves_path, loop.history)
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
    # iit_*: the threshold, phi weights and memory as training left them; the other IIT columns
    # as the training means of the last history row
    now = {**model.memory_stats(), **model.iit_stats()}
    m.update({f"iit_{k}": last[k] for k in IIT_COLUMNS if last.get(k) is not None and k not in now})
    m.update({f"iit_{k}": v for k, v in now.items()})
    return m
