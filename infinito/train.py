"""train stage: train INFINITO on the tokenized corpus, keep the best model and a resumable state.

``python -m infinito.train --data data/tokenized --out models/best --state checkpoints
--metrics metrics/train.json --history metrics/train_history.csv --curves metrics/train_curves.png``
reads ``epochs``, ``batch_size``, ``lr``, ``lambda_phi``, ``seed`` and the ``model``,
``data.seq_len`` and ``train`` sections of ``params.yaml``. Options such as ``--lr 1e-4`` override
them, for use outside DVC:
``infinito train --epochs 20 --batch-size 16 --lr 2e-4 --lambda-phi 0.1``.

Data: the train split is cut into non-overlapping windows, window ``i`` being tokens
``[i*seq_len, i*seq_len + seq_len + 1)`` (inputs ``w[:-1]``, targets ``w[1:]``; consecutive
windows share one boundary token, so every token is a target once per epoch). The windows are
reshuffled every epoch by a generator seeded with ``(seed, epoch)``; the last incomplete batch is
dropped. Loss = cross-entropy + ``lambda_phi`` * the model's Delta-Phi term (``lambda_phi = 0``:
cross-entropy exactly). After every optimizer step the model writes its memory candidates.

Validation runs at each epoch end (and every ``train.eval_every_steps`` steps when > 0) on the
whole validation split with ``infinito.evaluate``'s non-overlapping protocol (memory reset, windows
streamed in order, ``batch_size`` windows per memory step); the training memory is restored
afterwards. The lowest validation loss is kept in ``<state>/best`` and exported to ``--out`` at the
end. Early stopping counts epochs without a validation-loss drop of at least ``train.min_delta``.

Resume: ``<state>/state.pt`` holds everything needed to continue bit-for-bit on CPU (weights and
memory buffers, optimizer, schedulers, RNG states, epoch, step, the epoch's order and position,
best-so-far, early-stopping counters, history). It is saved at each epoch end, every
``--save-every-sec`` seconds (default 300: a ``kill -9`` loses at most five minutes, while saving
~3x the weights each epoch would cost noticeable time on a fast GPU), on SIGINT/SIGTERM (then the
process exits 130/143) and at the end. Rerunning the same command resumes. The state records a
fingerprint of the params that shape the run and of the data; a state from other params is
refused with the keys that differ (``--stale-state discard`` starts fresh instead: DVC's command
passes it, because DVC only re-runs training when params or data changed). A finished state with
the same fingerprint is not retrained: its outputs are written again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import logging
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infinito.atomic import atomic_dir, atomic_open, write_json
from infinito.checkpoint import (
    AsyncSaver,
    diff_keys,
    file_digest,
    fingerprint,
    load_state,
    portable_rng_state,
    restore_rng_state,
    to_cpu,
)
from infinito.config import ConfigError, Params, load_params
from infinito.evaluate import (
    Score,
    check_vocab,
    nonoverlapping_windows,
    open_split,
    preserved_state,
    read_meta,
    score,
    window_batch,
)
from infinito.runtime import autocast, is_tty, resolve_device, resolve_dtype, seed_everything

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
STATE_FORMAT = 1
SAVE_EVERY_SEC = 300.0
# train keys that do not change what is computed, so a state may resume across them.
FINGERPRINT_EXCLUDED = ("device", "compile", "log_every", "nproc_per_node")
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


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense bf16/fp16 peak in FLOP/s, or None when unknown or not mixed precision."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(
    model: torch.nn.Module, params: Params, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; fused kernels on CUDA."""
    tc = params.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=params.lr, betas=(tc.beta1, tc.beta2), fused=device.type == "cuda" or None
    )


class LRFactor:
    """Linear warmup, then cosine down to ``min_ratio`` (or constant): LambdaLR's multiplier.

    A plain object rather than a closure so LambdaLR's state_dict records its settings.
    """

    def __init__(self, schedule: str, warmup: int, total: int, min_ratio: float) -> None:
        self.schedule = schedule
        self.warmup = warmup
        self.total = total
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule != "cosine":
            return 1.0  # constant, or plateau (which ReduceLROnPlateau lowers)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedulers(
    optimizer: torch.optim.Optimizer, params: Params, total_steps: int
) -> tuple[torch.optim.lr_scheduler.LambdaLR, torch.optim.lr_scheduler.ReduceLROnPlateau | None]:
    """Per-step LambdaLR (warmup + cosine/constant) and, for ``plateau``, ReduceLROnPlateau.

    With ``plateau`` the LambdaLR only runs the warmup; after it, ReduceLROnPlateau owns the lr.
    """
    tc = params.train
    factor = LRFactor(tc.schedule, tc.warmup_steps, total_steps, tc.min_lr_ratio)
    per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    plateau = None
    if tc.schedule == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=tc.plateau_factor,
            patience=tc.plateau_patience,
            min_lr=tc.min_lr_ratio * params.lr,
        )
    return per_step, plateau


def epoch_order(seed: int, epoch: int, n_windows: int) -> torch.Tensor:
    """The epoch's window order: a permutation from a generator seeded with (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return torch.from_numpy(rng.permutation(n_windows).astype(np.int64))


# ----------------------------------------------------------------------------- run state


@dataclass
class Accumulator:
    """Sums since the last history row (training-mode loss, model stats, timed tokens)."""

    loss_sum: float = 0.0
    steps: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class Loop:
    """Everything about where the run is, other than tensors of the model and optimizer."""

    epoch: int = 0  # index of the current epoch
    pos: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps done
    order: torch.Tensor | None = None  # the current epoch's window order
    best_val_loss: float = math.inf
    best_epoch: float = 0.0
    best_step: int = 0
    patience_ref: float = math.inf
    bad_epochs: int = 0
    early_stopped: bool = False
    complete: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    acc: Accumulator = field(default_factory=Accumulator)
    acc_stats_steps: int = 0
    tokens_trained: int = 0
    timed_tokens: int = 0  # excludes the first step of each session (compilation, warm-up)
    timed_seconds: float = 0.0
    first_step_sec: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0  # across sessions
    final_metrics: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if k != "acc"}
        out["acc"] = copy.deepcopy(vars(self.acc))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Loop:
        data = dict(data)
        acc = Accumulator(**data.pop("acc"))
        return cls(acc=acc, **data)


def _fingerprint_inputs(params: Params, data_dir: Path) -> dict[str, Any]:
    """What shapes the run: the train stage's params (minus hardware/display keys) and the data."""
    train = {k: v for k, v in params.train.to_dict().items() if k not in FINGERPRINT_EXCLUDED}
    return {
        "epochs": params.epochs,
        "batch_size": params.batch_size,
        "lr": params.lr,
        "lambda_phi": params.lambda_phi,
        "seed": params.seed,
        "model": params.model.to_dict(),
        "data": {
            "seq_len": params.data.seq_len,
            **{s: file_digest(Path(data_dir) / f"{s}.bin") for s in ("train", "validation")},
        },
        "train": train,
    }


def _previous_state(
    state_dir: Path, fp: str, fp_inputs: dict[str, Any], stale_state: str
) -> dict[str, Any] | None:
    """The resumable state to continue from, or None to start fresh (see the module docstring)."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    state = load_state(path)
    if state.get("format") == STATE_FORMAT and state.get("fingerprint") == fp:
        return state
    changed = diff_keys(state.get("fingerprint_inputs", {}), fp_inputs) or ["state format"]
    what = "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
    if stale_state == "discard":
        log.info(
            "discarding %s: it belongs to a run with other params or data (%s); starting fresh",
            path,
            what,
        )
        path.unlink()
        shutil.rmtree(state_dir / "best", ignore_errors=True)
        return None
    raise ConfigError(
        f"{path} was saved by a run with other params or data ({what}); to resume it, restore "
        f"those params; to start fresh, delete {state_dir} (or pass --stale-state discard)"
    )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag checked at step boundaries; a second one stops at once.

    Yields a list that receives the signal number. Only the main thread can install handlers;
    elsewhere (e.g. a Prefect worker thread) the process's own handling applies.
    """
    flag: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)
        log.warning(
            "%s received: saving the state at the end of this step (again to abort)",
            signal.Signals(signum).name,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- outputs


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
    cols = 4 if len(panels) > 4 else 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (title, names, logy) in zip(axes.flat, panels, strict=False):
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


def _export(
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


# ----------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar per epoch on a terminal; otherwise one line every ``log_every`` steps."""

    def __init__(
        self,
        epochs: int,
        steps_per_epoch: int,
        total_steps: int,
        log_every: int,
        tokens_per_step: int,
    ) -> None:
        self.tty = is_tty()
        self.epochs, self.spe, self.total = epochs, steps_per_epoch, total_steps
        self.every, self.tokens_per_step = log_every, tokens_per_step
        self.bar: Any = None

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

    def step(self, loop: Loop, loss: float, lr: float) -> None:
        tok_s = loop.timed_tokens / loop.timed_seconds if loop.timed_seconds > 0 else 0.0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            self.bar.update(1)
        elif loop.step % self.every == 0:
            eta = (self.total - loop.step) * self.tokens_per_step / tok_s if tok_s else 0.0
            log.info(
                "epoch %d/%d  step %d/%d  loss %.4f  lr %.2e  %s tok/s  eta %s",
                loop.epoch + 1,
                self.epochs,
                loop.step,
                self.total,
                loss,
                lr,
                f"{tok_s:,.0f}",
                _duration(eta),
            )

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
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


def _log_parameters(model: Any) -> None:
    total = model.num_params()
    lines = [f"parameters: {total:,}"]
    for name, n in model.param_breakdown().items():
        lines.append(f"  {name:<28} {n:>12,}  {100 * n / total:5.1f}%")
    log.info("%s", "\n".join(lines))


# ----------------------------------------------------------------------------- the stage


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

    Raises ``ConfigError`` on bad input before any work, ``TrainingInterrupted`` after saving the
    state on SIGINT/SIGTERM, ``NonFiniteLoss`` (state of the last save kept) on NaN/inf.
    """
    from infinito.model import Infinito

    t_session = time.perf_counter()
    data_dir, out_dir, state_dir = Path(data_dir), Path(out_dir), Path(state_dir)
    tc = params.train
    if stale_state not in ("error", "discard"):
        raise ConfigError(f"stale_state={stale_state!r} must be 'error' or 'discard'")
    if tc.nproc_per_node != 1:
        raise ConfigError(
            f"train.nproc_per_node={tc.nproc_per_node}: this train stage runs one process; "
            "set train.nproc_per_node: 1"
        )
    meta = read_meta(data_dir)
    check_vocab(params.model.vocab_size, meta, data_dir)
    seq_len, batch_size = params.data.seq_len, params.batch_size
    train_tokens = open_split(data_dir, "train", meta)
    val_tokens = open_split(data_dir, "validation", meta)
    n_windows = (len(train_tokens) - 1) // seq_len
    steps_per_epoch = n_windows // batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the train split ({len(train_tokens)} tokens) holds {n_windows} windows of "
            f"data.seq_len+1={seq_len + 1} tokens, fewer than batch_size={batch_size}; lower "
            "batch_size or data.seq_len, or use more data"
        )
    total_steps = params.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.precision, device)
    val_windows = nonoverlapping_windows(len(val_tokens), seq_len)
    # "final train loss": the same protocol on a train prefix as long as the validation split.
    sub_tokens = train_tokens[: min(len(train_tokens), len(val_tokens))]
    sub_windows = nonoverlapping_windows(len(sub_tokens), seq_len)

    fp_inputs = _fingerprint_inputs(params, data_dir)
    fp = fingerprint(fp_inputs)
    state_path, best_dir = state_dir / STATE_FILE, state_dir / "best"
    for tmp in state_dir.glob(f".{STATE_FILE}.*.tmp"):  # a save cut short by kill -9
        tmp.unlink()
    state = _previous_state(state_dir, fp, fp_inputs, stale_state)
    if state is not None and state["loop"]["complete"]:
        log.info(
            "training already complete (state in %s matches the params); writing its "
            "outputs again. Delete %s to retrain.",
            state_path,
            state_dir,
        )
        return _export(
            Loop.from_dict(state["loop"]),
            best_dir,
            out_dir,
            metrics_path,
            history_path,
            curves_path,
        )

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
            "starting a fresh run: %d steps/epoch x %d epochs%s on %s (%s)",
            steps_per_epoch,
            params.epochs,
            f", stopping at step {tc.max_steps}" if tc.max_steps else "",
            device,
            str(dtype).removeprefix("torch."),
        )
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the saving run may have used another device
            group["fused"] = device.type == "cuda" or None
        scheduler.load_state_dict(state["scheduler"])
        if plateau is not None:
            plateau.load_state_dict(state["plateau"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        loop = Loop.from_dict(state["loop"])
        log.info(
            "resuming from %s at epoch %d, step %d/%d",
            state_path,
            loop.epoch + 1,
            loop.step,
            total_steps,
        )
        del state
    _log_parameters(model)

    want_compile = tc.compile is True or (tc.compile == "auto" and device.type == "cuda")
    forward: Any = torch.compile(model) if want_compile else model
    compiled = want_compile
    lam = params.lambda_phi
    saver = AsyncSaver()
    progress = Progress(
        params.epochs, steps_per_epoch, total_steps, tc.log_every, batch_size * seq_len
    )
    last_save = time.perf_counter()
    wall_before = loop.wall_seconds  # earlier sessions of this run

    def snapshot() -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "fingerprint": fp,
            "fingerprint_inputs": fp_inputs,
            "model": to_cpu(model.state_dict()),
            "optimizer": to_cpu(optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler.state_dict()),
            "plateau": copy.deepcopy(plateau.state_dict()) if plateau is not None else None,
            "scaler": copy.deepcopy(scaler.state_dict()),
            "rng": portable_rng_state(),
            "loop": loop.to_dict(),
        }

    def save(sync: bool = False) -> None:
        nonlocal last_save
        loop.wall_seconds = wall_before + time.perf_counter() - t_session
        saver.save(snapshot(), state_path)
        if sync:
            saver.wait()
        last_save = time.perf_counter()

    def validate() -> Score:
        t0 = time.perf_counter()
        with preserved_state(model):
            result = score(model, val_tokens, val_windows, batch_size, device, dtype)
        loop.eval_seconds += time.perf_counter() - t0
        return result

    def record(val: Score, epoch_end: bool) -> None:
        """A history row, the best checkpoint, the plateau schedule and early stopping."""
        acc = loop.acc
        train_loss = acc.loss_sum / acc.steps if acc.steps else None
        row: dict[str, Any] = {
            "epoch": round(loop.step / steps_per_epoch, 4),
            "step": loop.step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_ppl": _ppl(train_loss) if train_loss is not None else None,
            "val_loss": val.loss,
            "val_ppl": val.ppl,
            **{k: v / acc.steps for k, v in acc.stats.items() if k in IIT_COLUMNS},
            "tokens_per_sec": acc.tokens / acc.seconds if acc.seconds > 0 else None,
        }
        loop.history.append(row)
        loop.acc = Accumulator()
        msg = (
            f"epoch {row['epoch']:g} step {loop.step}: train loss "
            f"{'-' if train_loss is None else f'{train_loss:.4f}'}  val loss {val.loss:.4f}  "
            f"val ppl {val.ppl:.2f}"
        )
        if val.loss < loop.best_val_loss:
            loop.best_val_loss, loop.best_epoch, loop.best_step = val.loss, row["epoch"], loop.step
            model.save(best_dir)  # atomic: the old best stays whole until the new one is
            msg += "  (best so far)"
        progress.message(msg)
        if plateau is not None and loop.step >= tc.warmup_steps:
            plateau.step(val.loss)
        if epoch_end:
            if val.loss < loop.patience_ref - tc.min_delta:
                loop.patience_ref, loop.bad_epochs = val.loss, 0
            else:
                loop.bad_epochs += 1
                if loop.bad_epochs >= tc.patience:
                    loop.early_stopped = True
                    progress.message(
                        f"early stopping: no val-loss drop of {tc.min_delta} in "
                        f"{tc.patience} epoch(s)"
                    )

    def forward_backward(x: torch.Tensor, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
        with autocast(device, dtype):
            out = forward(x, y)
        loss = out.loss if lam == 0 else out.loss + lam * out.aux_loss
        scaler.scale(loss).backward()
        return out, loss

    model.train()
    first_step = True
    try:
        with stop_on_signals() as stop:
            while not loop.early_stopped and loop.epoch < params.epochs and loop.step < total_steps:
                if loop.order is None:
                    loop.order = epoch_order(params.seed, loop.epoch, n_windows)
                progress.start_epoch(loop.epoch, loop.pos, total_steps - loop.step)
                while loop.pos < steps_per_epoch and loop.step < total_steps:
                    t0 = time.perf_counter()
                    idx = loop.order[loop.pos * batch_size : (loop.pos + 1) * batch_size]
                    xy = window_batch(train_tokens, (idx * seq_len).tolist(), seq_len)
                    if device.type == "cuda":
                        xy = xy.pin_memory().to(device, non_blocking=True)
                    x, y = xy[:, :-1], xy[:, 1:]
                    if first_step and compiled and tc.compile == "auto":
                        rng = portable_rng_state()
                        try:
                            out, loss = forward_backward(x, y)
                        except Exception as e:  # dynamo/inductor errors vary; any means "no"
                            log.warning(
                                "torch.compile failed at the first step (%s: %s); "
                                "training without it",
                                type(e).__name__,
                                e,
                            )
                            optimizer.zero_grad(set_to_none=True)
                            restore_rng_state(rng)
                            forward, compiled = model, False
                            out, loss = forward_backward(x, y)
                    else:
                        out, loss = forward_backward(x, y)
                    if scaler.is_enabled():
                        scaler.unscale_(optimizer)
                    gnorm = torch.nn.utils.clip_grad_norm_(
                        model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf
                    )
                    # One host sync per step: the loss check, logging and stats together.
                    stat_keys = list(out.stats)
                    total_v, ce_v, gnorm_v, *stat_v = torch.stack(
                        [
                            loss.detach().float(),
                            out.loss.detach().float(),
                            gnorm.float(),
                            *(out.stats[k].float() for k in stat_keys),
                        ]
                    ).tolist()
                    if not math.isfinite(total_v) or (
                        not math.isfinite(gnorm_v) and not scaler.is_enabled()
                    ):
                        raise NonFiniteLoss(
                            f"non-finite {'loss' if not math.isfinite(total_v) else 'gradient'} "
                            f"at step {loop.step + 1} (epoch {loop.epoch + 1}, batch "
                            f"{loop.pos + 1}): loss={total_v}, grad norm={gnorm_v}; stopped "
                            f"without saving it; the last good state is {state_path}"
                        )
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    model.write_memory(out.candidates)
                    if plateau is None or loop.step < tc.warmup_steps:
                        scheduler.step()
                    loop.step += 1
                    loop.pos += 1
                    n_tok = x.numel()
                    loop.tokens_trained += n_tok
                    acc = loop.acc
                    acc.loss_sum += ce_v
                    acc.steps += 1
                    for k, v in zip(stat_keys, stat_v, strict=True):
                        acc.stats[k] = acc.stats.get(k, 0.0) + v
                    dt = time.perf_counter() - t0
                    if first_step:
                        loop.first_step_sec, first_step = dt, False
                    else:
                        loop.timed_tokens += n_tok
                        loop.timed_seconds += dt
                        acc.tokens += n_tok
                        acc.seconds += dt
                    progress.step(loop, ce_v, optimizer.param_groups[0]["lr"])
                    end_of_epoch = loop.pos == steps_per_epoch
                    if (
                        tc.eval_every_steps
                        and loop.step % tc.eval_every_steps == 0
                        and not end_of_epoch
                        and loop.step < total_steps
                    ):
                        record(validate(), epoch_end=False)
                    if stop:
                        progress.end_epoch()
                        save(sync=True)
                        raise TrainingInterrupted(stop[0], loop.step, state_path)
                    if not end_of_epoch and time.perf_counter() - last_save >= save_every_sec:
                        save()
                progress.end_epoch()
                if loop.pos == steps_per_epoch:
                    record(validate(), epoch_end=True)
                    loop.epoch, loop.pos, loop.order = loop.epoch + 1, 0, None
                    save()
                if stop:
                    save(sync=True)
                    raise TrainingInterrupted(stop[0], loop.step, state_path)

        # Finished. max_steps inside an epoch (or a stop just before its validation) leaves the
        # last step unvalidated: validate there, so the final row describes the final weights.
        if not loop.history or loop.history[-1]["step"] != loop.step:
            record(validate(), epoch_end=False)
        # Measure the final weights on a train prefix, write everything.
        t0 = time.perf_counter()
        with preserved_state(model):
            train_sub = score(model, sub_tokens, sub_windows, batch_size, device, dtype)
        loop.eval_seconds += time.perf_counter() - t0
        loop.wall_seconds = wall_before + time.perf_counter() - t_session
        loop.final_metrics = _final_metrics(
            params, model, loop, train_sub, device, dtype, steps_per_epoch, compiled
        )
        loop.complete = True
        saver.save(snapshot(), state_path)
        saver.wait()
    finally:
        progress.end_epoch()
        with contextlib.suppress(Exception):  # a failing save must not mask the real error
            saver.wait()
    return _export(loop, best_dir, out_dir, metrics_path, history_path, curves_path)


def _final_metrics(
    params: Params,
    model: Any,
    loop: Loop,
    train_sub: Score,
    device: torch.device,
    dtype: torch.dtype,
    steps_per_epoch: int,
    compiled: bool,
) -> dict[str, Any]:
    last = loop.history[-1]
    tok_s = loop.timed_tokens / loop.timed_seconds if loop.timed_seconds > 0 else 0.0
    m: dict[str, Any] = {
        "best_epoch": loop.best_epoch,
        "best_step": loop.best_step,
        "best_val_loss": loop.best_val_loss,
        "best_val_ppl": _ppl(loop.best_val_loss),
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
        m["mfu"] = tok_s * model.flops_per_token(params.data.seq_len) / peak
    if device.type == "cuda":
        m["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    m.update({f"iit_{k}": last[k] for k in IIT_COLUMNS if last.get(k) is not None})
    m.update({f"iit_{k}": v for k, v in model.iit_stats().items()})
    memory = model.memory_stats()  # the memory as training left it
    if memory:
        m["iit_memory_utilisation"] = memory["utilisation"]
        m["iit_stored_phi_mean"] = memory["stored_phi_mean"]
    return m


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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
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
    except ConfigError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"train: {e}", file=sys.stderr)
        return 128 + e.signum
    print(
        f"best val loss {metrics['best_val_loss']:.4f} (ppl {metrics['best_val_ppl']:.2f}) at "
        f"epoch {metrics['best_epoch']:g}; {metrics['tokens_per_sec']:,.0f} tokens/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
