"""GPU speed check: the seed configuration's training step, before and after each speed lever.

Each *variant* trains the seed configuration (ModelConfig defaults, batch 16 x 256, lr 2e-4,
lambda_phi 0.1, bf16 autocast, fused AdamW, the warmup + cosine schedule, gradient clipping and
the memory write after each step: the train stage's step, from the same modules) for ``--steps``
steps from the same initialisation and the same batches, and records:

- tokens/s and ms per step in steady state (the steps after ``--warmup``, one host
  synchronisation at each end), MFU against the device's dense bf16 peak, peak GPU memory
  (``torch.cuda.max_memory_allocated``), compilation seconds (the warm-up steps' time beyond
  steady-state steps), and the training time 20 epochs of the data would take at that rate
  (validation passes as a separate figure: one eager pass over the validation split, as the
  trainer runs it, timed once per arm);
- every step's cross-entropy, compared with today's path (``{arm}-full-default``: full logits,
  ``torch.compile`` default mode, as training ran before the chunked loss): the first steps'
  losses should agree within bf16 noise;
- for the variants in ``--profile``, a ``torch.profiler`` table of the top kernels by device time.

Variant names are ``ARM-LOSS-COMPILE``: ARM ``iit`` or ``ablation``; LOSS ``full`` (the (B, T, V)
logits, then cross-entropy: today's path), ``chunked`` (``infinito/losses.py``, the training
default) or ``liger`` (Liger Kernel's fused Triton kernel; skipped when not installed);
COMPILE ``eager``, ``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune`` or
``max-autotune-no-cudagraphs``. The JSON is rewritten after every variant, so a run cut short
keeps what it measured; ``--budget-sec`` starts no variant that the remaining time cannot fit.

On the GPU machine (imports torch, numpy, ruamel.yaml, safetensors; no DVC or tokenizer)::

    PYTHONPATH=. python scripts/gpu_check.py --data .device/wikitext-2/tokenized \\
        --out "$OUT/gpu-speed.json" --budget-sec 150

``scripts/gpu_session.py`` runs it as the first part of a device session (docs/speed.md).
``--smoke`` runs the same code on a tiny model on CPU, compiled variants through the aot_eager
backend (a check of the script, not a measurement). ``--make-data DIR`` tokenizes a text file
into a stand-in data directory (WikiText-2's validation text, repeated for the train split).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinito.atomic import write_json
from infinito.batches import TrainData, epoch_order, load_windows
from infinito.config import Params
from infinito.data.splits import read_meta
from infinito.model import Infinito
from infinito.optim import build_optimizer, build_schedulers
from infinito.runtime import autocast, resolve_device, resolve_dtype, seed_everything
from infinito.scoring import score
from infinito.trainlog import peak_flops

SEED_RUN = {"epochs": 20, "batch_size": 16, "lr": 2e-4, "lambda_phi": 0.1, "seed": 42}
GOAL_TRAINING_SEC = 60.0  # 20 epochs of the IIT model, validation excluded
DEFAULT_VARIANTS = (
    "iit-full-default",  # today's path: the before
    "iit-chunked-default",  # the training default now
    "ablation-full-default",
    "ablation-chunked-default",
    "iit-chunked-reduce-overhead",
    "ablation-chunked-reduce-overhead",
    "iit-liger-default",
    "iit-chunked-eager",
)
DEFAULT_PROFILE = ("iit-full-default", "iit-chunked-default", "iit-chunked-reduce-overhead")
LOSSES = ("full", "chunked", "liger")
COMPILES = ("eager", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SMOKE_MODEL = {
    "d_model": 32,
    "n_layer": 1,
    "n_head": 2,
    "block_size": 32,
    "memory_slots": 8,
    "phi_chunk": 8,
}
WIKITEXT_VALID = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"


@dataclass(frozen=True)
class Variant:
    arm: str  # iit | ablation
    loss: str  # full | chunked | liger
    compile: str  # eager | a torch.compile mode

    @classmethod
    def parse(cls, name: str) -> Variant:
        arm, _, rest = name.partition("-")
        loss, _, mode = rest.partition("-")
        if arm not in ("iit", "ablation") or loss not in LOSSES or mode not in COMPILES:
            raise ValueError(
                f"variant {name!r} is not ARM-LOSS-COMPILE with ARM iit|ablation, LOSS "
                f"{'|'.join(LOSSES)}, COMPILE {'|'.join(COMPILES)}"
            )
        return cls(arm, loss, mode)

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.loss}-{self.compile}"

    @property
    def baseline(self) -> str:
        return f"{self.arm}-full-default"


def make_data(out: Path, text: Path, repeat: int) -> dict[str, Any]:
    """Tokenize ``text`` with the tokenize stage: train ``repeat`` copies, validation/test one."""
    from infinito.data.tokenize import nonempty_lines, tokenize

    lines = list(nonempty_lines(text))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        (raw / "train.txt").write_text("\n".join(lines * repeat) + "\n", encoding="utf-8")
        for split in ("validation", "test"):
            (raw / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return tokenize(raw, out)


def seed_params(iit: bool, smoke: bool, vocab: int) -> Params:
    """The seed configuration (a tiny model with ``smoke``) for ``model.iit`` = ``iit``."""
    model: dict[str, Any] = {"iit": iit}
    run = dict(SEED_RUN)
    data: dict[str, Any] = {}
    if smoke:
        model.update(SMOKE_MODEL, vocab_size=vocab)
        run["batch_size"] = 4
        data = {"seq_len": 32}
    return Params.from_dict({**run, "data": data, "model": model, "train": {}})


def _compiled(model: Infinito, mode: str, smoke: bool) -> Any:
    if mode == "eager":
        return model
    if smoke:  # CPU: dynamo and AOT autograd without inductor's C++ compilation
        return torch.compile(model, backend="aot_eager")
    return torch.compile(model, mode=mode)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(
    v: Variant,
    data: TrainData,
    params: Params,
    device: torch.device,
    steps: int,
    warmup: int,
    smoke: bool,
    profile: bool,
) -> dict[str, Any]:
    """Train ``steps`` steps of the variant; timings, memory, losses and maybe a profile."""
    if v.loss == "liger":
        from infinito.losses import liger_available

        if not liger_available():
            return {"skipped": "liger-kernel is not installed (pip install liger-kernel)"}
    dtype = resolve_dtype("auto", device)
    seed_everything(params.seed)
    model = Infinito(params.model).to(device)
    model.cross_entropy = "liger" if v.loss == "liger" else "chunked"
    optimizer = build_optimizer(model, params, device)
    scheduler, _ = build_schedulers(optimizer, params, data.steps_per_epoch * params.epochs)
    forward = _compiled(model, v.compile, smoke)
    order = epoch_order(params.seed, 0, data.n_windows)
    B, T, lam = params.batch_size, params.data.seq_len, params.lambda_phi
    full = v.loss == "full"
    model.train()

    def step(i: int) -> torch.Tensor:
        start = (i % data.steps_per_epoch) * B  # the first epoch's batches, in order
        idx = order[start : start + B]
        x, y = load_windows(data.train, idx, T, device)
        with autocast(device, dtype):
            out = forward(x, y, return_logits=full)
        (out.loss + lam * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.write_memory(out.candidates)
        return out.loss.detach().float().clone()  # a CUDA graph's next replay reuses outputs

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for i in range(warmup):
        losses.append(step(i))
    _sync(device)
    t_warm = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(warmup, steps):
        losses.append(step(i))
    _sync(device)
    step_sec = (time.perf_counter() - t1) / max(1, steps - warmup)
    result: dict[str, Any] = {
        "arm": v.arm,
        "loss_path": v.loss,
        "compile": v.compile,
        "steps": steps,
        "tokens_per_sec": B * T / step_sec,
        "step_ms": 1000 * step_sec,
        "compile_sec": max(0.0, t_warm - warmup * step_sec),
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
        "losses": torch.stack(losses).tolist(),
    }
    peak = peak_flops(device, dtype)
    result["mfu"] = result["tokens_per_sec"] * model.flops_per_token(T) / peak if peak else None
    result["projected_20_epochs_training_sec"] = 20 * data.steps_per_epoch * step_sec
    if profile:
        result["profile_top_kernels"] = profile_steps(step, steps, device)
    return result


def profile_steps(step: Any, start: int, device: torch.device, n: int = 10) -> list[dict[str, Any]]:
    """The top kernels (device time; CPU time without CUDA) over ``n`` more steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for i in range(start, start + n):
            step(i)
        _sync(device)
    events = prof.key_averages()

    def self_time(e: Any) -> float:  # microseconds; the attribute's name changed in torch 2.4
        if device.type != "cuda":
            return float(e.self_cpu_time_total)
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)))

    total = sum(self_time(e) for e in events) or 1.0
    top = sorted(events, key=self_time, reverse=True)[:15]
    return [
        {
            "name": e.key[:120],
            "calls": int(e.count),
            "self_ms_per_step": self_time(e) / 1000 / n,
            "share": self_time(e) / total,
        }
        for e in top
        if self_time(e) > 0
    ]


def validation_pass_sec(data: TrainData, params: Params, device: torch.device) -> float:
    """One eager validation pass, as the trainer runs it (``score`` over the validation split)."""
    dtype = resolve_dtype("auto", device)
    seed_everything(params.seed)
    model = Infinito(params.model).to(device)
    return score(model, data.val, data.val_windows, params.batch_size, device, dtype).seconds


def compare_losses(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Per-step cross-entropy of a variant against today's path, same seed and batches."""
    a, b = result["losses"], baseline["losses"]
    n = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)]
    tail = max(1, n // 10)
    return {
        "steps_compared": n,
        "max_abs_diff": max(diffs),
        "mean_abs_diff": statistics.fmean(diffs),
        "last_steps_mean": statistics.fmean(a[n - tail : n]),
        "baseline_last_steps_mean": statistics.fmean(b[n - tail : n]),
    }


def summarise(report: dict[str, Any]) -> None:
    """Speed-ups against today's path and the 20-epoch goal, added to ``report``."""
    variants = report["variants"]
    for r in variants.values():
        base = variants.get(r.get("baseline", ""), {})
        if "tokens_per_sec" in r and "tokens_per_sec" in base:
            r["speedup_vs_baseline"] = r["tokens_per_sec"] / base["tokens_per_sec"]
            r["loss_vs_baseline"] = compare_losses(r, base)
    measured = {n: r for n, r in variants.items() if "tokens_per_sec" in r}
    for arm in ("iit", "ablation"):
        mine = {n: r for n, r in measured.items() if r["arm"] == arm}
        if mine:
            best = max(mine, key=lambda n: mine[n]["tokens_per_sec"])
            report[f"fastest_{arm}"] = best
    iit, abl = report.get("fastest_iit"), report.get("fastest_ablation")
    if iit and abl:
        report["iit_over_ablation_step_time"] = measured[iit]["step_ms"] / measured[abl]["step_ms"]
        sec = measured[iit]["projected_20_epochs_training_sec"]
        report["goal"] = {
            "iit_20_epochs_training_sec": sec,
            "goal_sec": GOAL_TRAINING_SEC,
            "met": sec <= GOAL_TRAINING_SEC,
        }


def _table(report: dict[str, Any]) -> str:
    rows = [
        "variant                               tok/s     ms/step   MFU    GiB  compile  speedup"
    ]
    for name, r in report["variants"].items():
        if "tokens_per_sec" not in r:
            rows.append(f"{name:<34} {r.get('skipped') or r.get('error', '')[:60]}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else "    -"
        gib = f"{r['peak_memory_gib']:5.1f}" if r.get("peak_memory_gib") else "    -"
        base = r.get("speedup_vs_baseline")  # absent when its baseline was not measured
        speedup = f"{base:>7.2f}x" if base is not None else "      -"
        rows.append(
            f"{name:<34} {r['tokens_per_sec']:>9,.0f} {r['step_ms']:>9.2f} {mfu} {gib} "
            f"{r['compile_sec']:>7.1f}s {speedup}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="tokenized data directory")
    parser.add_argument("--out", type=Path, default=Path("gpu-speed.json"))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--profile", nargs="*", default=list(DEFAULT_PROFILE))
    parser.add_argument("--steps", type=int, default=200, help="steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the timed ones")
    parser.add_argument("--budget-sec", type=float, default=240.0, help="start nothing after")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")
    parser.add_argument("--make-data", type=Path, metavar="DIR", help="tokenize, then exit")
    parser.add_argument("--text", type=Path, default=WIKITEXT_VALID)
    parser.add_argument("--repeat", type=int, default=10, help="--make-data: train copies")
    args = parser.parse_args(argv)
    if args.make_data:
        meta = make_data(args.make_data, args.text, args.repeat)
        print(json.dumps(meta["splits"]))
        return 0
    if args.data is None:
        parser.error("--data is required (a tokenized directory, e.g. from --make-data)")
    try:
        variants = [Variant.parse(n) for n in args.variants]
    except ValueError as e:
        parser.error(str(e))
    if not 0 < args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be between 0 and --steps {args.steps}")
    t_start = time.perf_counter()
    device = resolve_device("cpu" if args.smoke else "auto")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device visible; use --smoke for a CPU check of the script")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    meta = read_meta(args.data)
    report: dict[str, Any] = {
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": str(resolve_dtype("auto", device)).removeprefix("torch."),
        "smoke": args.smoke,
        "batch_size": seed_params(True, args.smoke, meta["vocab_size"]).batch_size,
        "seq_len": seed_params(True, args.smoke, meta["vocab_size"]).data.seq_len,
        "train_tokens": meta["splits"]["train"]["tokens"],
        "variants": {},
    }
    data: TrainData | None = None
    costs: list[float] = []  # wall seconds of the variants measured so far
    for v in variants:
        elapsed = time.perf_counter() - t_start
        cost = max(costs, default=60.0)  # a compiled variant's guess until one is measured
        if elapsed + cost > args.budget_sec:
            report["variants"][v.name] = {
                "skipped": f"time budget: {elapsed:.0f} s spent of {args.budget_sec:.0f} s and "
                f"a variant takes about {cost:.0f} s"
            }
            continue
        params = seed_params(v.arm == "iit", args.smoke, meta["vocab_size"])
        if data is None:
            data = TrainData.open(args.data, params)
            report["steps_per_epoch"] = data.steps_per_epoch
        if f"validation_pass_sec_{v.arm}" not in report:
            report[f"validation_pass_sec_{v.arm}"] = validation_pass_sec(data, params, device)
        print(f"gpu_check: {v.name} ({args.steps} steps)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            profile = v.name in args.profile
            r = run_variant(v, data, params, device, args.steps, args.warmup, args.smoke, profile)
        except Exception as e:  # a lever that fails here (compile, kernels) is recorded
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"[:2000]}
        spent = time.perf_counter() - t0
        r |= {"baseline": v.baseline, "wall_sec": spent}
        if "tokens_per_sec" in r:
            costs.append(spent)
        report["variants"][v.name] = r
        summarise(report)
        report["total_sec"] = time.perf_counter() - t_start
        write_json(args.out, report)
    summarise(report)
    report["total_sec"] = time.perf_counter() - t_start
    write_json(args.out, report)
    print(_table(report))
    ok = all(
        all(math.isfinite(x) for x in r["losses"])
        for r in report["variants"].values()
        if "losses" in r
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
