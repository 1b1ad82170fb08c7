"""GPU check: train INFINITO's seed configuration for a few hundred steps and measure it.

Runs the train stage's own ``train()`` (bf16 autocast, ``torch.compile``, fused AdamW on CUDA)
on the seed configuration (ModelConfig defaults, batch 16, seq_len 256, lr 2e-4, lambda_phi 0.1)
and writes one JSON with: steady-state tokens/s, time per step, MFU against the device's dense
bf16 peak, peak memory (``torch.cuda.max_memory_allocated``), the first step's time (compilation)
separately, the validation pass time, the same for the ablation (``model.iit: false``), and the
projected time of 20 epochs over 2.39M training tokens against the 3-minute goal. The JSON is
rewritten after each phase, so a run cut short still leaves what it measured.

1. Prepare the data here (needs the project's tokenizer; WikiText-2's validation text, repeated
   10 times for the train split, 2.56M tokens; validation and test are the text once, 256k)::

       .venv/bin/python scripts/gpu_check.py --make-data gpu-data

2. On the GPU machine (imports the model and the train stage's modules, torch, numpy,
   ruamel.yaml, safetensors, matplotlib; no DVC, Prefect or tokenizer needed)::

       PYTHONPATH=. python scripts/gpu_check.py --data gpu-data --out gpu_check.json

   About 2-4 minutes on an H100, most of it compilation; ``--budget-sec`` skips the later
   phases if the earlier ones ran long.

``--smoke`` runs the same code on a tiny model on CPU (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from infinito.atomic import write_json
from infinito.config import Params
from infinito.data.splits import read_meta
from infinito.model import Infinito
from infinito.runtime import resolve_device, resolve_dtype
from infinito.train import peak_flops, train
from infinito.trainlog import read_series

SEED_RUN = {"epochs": 20, "batch_size": 16, "lr": 2e-4, "lambda_phi": 0.1, "seed": 42}
GOAL_TRAIN_TOKENS = 2_390_000  # WikiText-2's train split in GPT-2 tokens
GOAL_EPOCHS = 20
GOAL_SECONDS = 180.0
SMOKE_MODEL = {
    "d_model": 32,
    "n_layer": 1,
    "n_head": 2,
    "block_size": 32,
    "memory_slots": 8,
    "phi_chunk": 8,
}
WIKITEXT_VALID = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"


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


def seed_params(steps: int, iit: bool, compile_: bool | str, smoke: bool, vocab: int) -> Params:
    model: dict[str, Any] = {"iit": iit}
    run = dict(SEED_RUN)
    data = {}
    if smoke:
        model.update(SMOKE_MODEL, vocab_size=vocab)
        run["batch_size"] = 4
        data = {"seq_len": 32}
    return Params.from_dict(
        {
            **run,
            "data": data,
            "model": model,
            # two validations: half-way (its row times the second half alone) and at the end
            "train": {
                "max_steps": steps,
                "eval_every_steps": max(1, steps // 2),
                "log_every": 50,
                "compile": compile_,
                "warmup_steps": min(200, steps // 4),
            },
        }
    )


def measure(params: Params, data: Path, device: torch.device) -> dict[str, Any]:
    """One train() run into a temporary directory; steady-state numbers from its second half."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        m = train(
            params,
            data,
            root / "best",
            root / "state",
            root / "train.json",
            root / "live",
            save_every_sec=1e9,
        )
        wall = time.perf_counter() - t0
        series = read_series(root / "live")  # the run's DVCLive series
    dtype = resolve_dtype(params.train.precision, device)
    seq_len, batch = params.data.seq_len, params.batch_size
    steady = series["tokens_per_sec"][-1][1]  # steps after the half-way validation
    with torch.device("meta"):
        flops_per_token = Infinito(params.model).flops_per_token(seq_len)
    peak = peak_flops(device, dtype)
    # eval_time_sec: one pass per history row plus the final train-subset pass, each the size
    # of the validation split
    val_pass = m["eval_time_sec"] / (len(series["val_loss"]) + 1)
    return {
        "steps": m["steps"],
        "compiled": m["compiled"],
        "tokens_per_sec_steady": steady,
        "tokens_per_sec_all_but_first_step": m["tokens_per_sec"],
        "sec_per_step": batch * seq_len / steady,
        "first_step_sec": m["first_step_sec"],
        "validation_pass_sec": val_pass,
        "mfu": steady * flops_per_token / peak if peak else None,
        "flops_per_token": flops_per_token,
        "n_params": m["n_params"],
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
        "val_loss_start": series["val_loss"][0][1],
        "val_loss_end": series["val_loss"][-1][1],
        "wall_sec": wall,
    }


def projection(r: dict[str, Any], params: Params) -> dict[str, Any]:
    """Time for 20 epochs over 2.39M tokens at the measured rates (one validation per epoch)."""
    windows = (GOAL_TRAIN_TOKENS - 1) // params.data.seq_len
    steps = GOAL_EPOCHS * (windows // params.batch_size)
    train_sec = steps * r["sec_per_step"]
    total = r["first_step_sec"] + train_sec + (GOAL_EPOCHS + 1) * r["validation_pass_sec"]
    return {
        "steps": steps,
        "training_sec": train_sec,
        "with_validation_and_compile_sec": total,
        "goal_sec": GOAL_SECONDS,
        "training_meets_goal": train_sec <= GOAL_SECONDS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="tokenized data directory")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--steps", type=int, default=300, help="IIT model steps")
    parser.add_argument("--ablation-steps", type=int, default=200)
    parser.add_argument(
        "--eager-steps",
        type=int,
        default=100,
        help="IIT model steps without torch.compile (0 skips)",
    )
    parser.add_argument(
        "--budget-sec",
        type=float,
        default=240.0,
        help="skip the remaining phases once this much time has passed",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")
    parser.add_argument(
        "--make-data",
        type=Path,
        metavar="DIR",
        help="prepare a tokenized directory here, then exit",
    )
    parser.add_argument("--text", type=Path, default=WIKITEXT_VALID)
    parser.add_argument("--repeat", type=int, default=10, help="--make-data: train copies")
    args = parser.parse_args(argv)
    if args.make_data:
        meta = make_data(args.make_data, args.text, args.repeat)
        print(json.dumps(meta["splits"]))
        return 0
    if args.data is None:
        parser.error("--data is required (prepare one with --make-data)")
    t_start = time.perf_counter()
    device = resolve_device("cpu" if args.smoke else "auto")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device visible; use --smoke for a CPU check of the script")
    vocab = read_meta(args.data)["vocab_size"]
    report: dict[str, Any] = {
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(resolve_dtype("auto", device)).removeprefix("torch."),
        "smoke": args.smoke,
        "train_tokens": read_meta(args.data)["splits"]["train"]["tokens"],
    }
    phases = [
        ("iit", args.steps, True, "auto"),
        ("ablation", args.ablation_steps, False, "auto"),
        ("iit_eager", args.eager_steps, True, False),
    ]
    for name, steps, iit, compile_ in phases:
        if steps <= 0:
            continue
        if name != "iit" and time.perf_counter() - t_start > args.budget_sec:
            report[name] = {"skipped": f"time budget of {args.budget_sec:.0f} s spent"}
            continue
        print(f"gpu_check: {name} ({steps} steps)", file=sys.stderr)
        params = seed_params(steps, iit, compile_, args.smoke, vocab)
        report[name] = measure(params, args.data, device)
        report[name]["projection_20_epochs"] = projection(report[name], params)
        report["total_sec"] = time.perf_counter() - t_start
        write_json(args.out, report)
    iit, abl = report.get("iit", {}), report.get("ablation", {})
    if "tokens_per_sec_steady" in iit and "tokens_per_sec_steady" in abl:
        report["ablation_speedup"] = abl["tokens_per_sec_steady"] / iit["tokens_per_sec_steady"]
    report["total_sec"] = time.perf_counter() - t_start
    write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0 if all(math.isfinite(r.get("val_loss_end", 0.0)) for r in (iit, abl)) else 1


if __name__ == "__main__":
    sys.exit(main())
