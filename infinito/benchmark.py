"""benchmark-inference stage: latency and throughput of INFINITO's decoding.

``python -m infinito.benchmark --model models/best --metrics metrics/benchmark.json`` reads the
``benchmark`` section of ``params.yaml`` and, for each batch size x prompt length, times greedy
decoding of ``new_tokens`` tokens (end-of-text disabled, so every run has the same length):

- the IIT model and the ablation (``model.iit=false``) at the same dimensions; the checkpoint
  supplies one of them, the other is built with a seeded random init (speed does not depend on
  the weights);
- each with and without the KV cache;
- Hugging Face's ``GPT2LMHeadModel.generate`` at the same dimensions (random init, greedy, KV
  cache, no end-of-text token) as an outside reference, when ``benchmark.hf_reference`` is true.

Per configuration the file holds time to first token (median over repeats), per-token latency
p50/p95 over every later decode step of every repeat, and tokens/s (batch x new tokens over the
median wall time of a run). ``warmup`` runs per configuration are discarded; then the
configurations of one batch size x prompt length take turns, one run each per round, so a busy
machine slows them alike and the ratios stay fair. Device work is synchronised before every
timestamp; inputs are seeded random token ids.

Keys are flat: ``{variant}_{kv|nokv}_b{B}_p{P}_{metric}`` and ``hf_b{B}_p{P}_{metric}``, plus
the ratios ``speedup_vs_hf_b{B}_p{P}`` (IIT with cache over HF, tokens/s),
``kv_speedup_{variant}_b{B}_p{P}`` and ``iit_over_ablation_b{B}_p{P}``; ``peak_memory_mb`` is the
process's peak RSS on CPU, the peak allocated tensor memory on CUDA (per configuration too).

CPU decoding variants (``benchmark.quantized_variants``, e.g. ``[bf16, int8]``; empty by
default): each variant of the checkpoint (``infinito/quantize.py``) and the fp32 checkpoint are
timed on the CPU, whatever the stage's device, at batch 1 for each prompt length, in turns with
Hugging Face's fp32 ``generate`` on the CPU in the same run; and each scores the first
``benchmark.quantized_ppl_tokens`` tokens of the test split (``--data``, non-overlapping windows
of block_size, memory reset first, as the evaluate stage streams). Keys:
``cpu_{fp32|bf16|int8|hf_fp32}_b1_p{P}_{metric}``, ``cpu_{variant}_speedup_vs_hf_fp32_b1_p{P}``,
``cpu_{variant}_speedup_vs_fp32_b1_p{P}``, ``cpu_{variant}_test_ppl``,
``cpu_{variant}_test_ppl_rel_change`` (variant over fp32, minus 1), ``cpu_{variant}_weight_mb``,
``cpu_ppl_tokens``.

Step timing needs no instrumentation inside the model: ``Infinito.generate`` applies the output
head once per new token, and a forward hook on it records when each step's forward pass ends, so
what is timed is the same ``generate`` that the generate-samples stage calls (HF's is stamped by
a streamer). The memory read costs the same whatever the memory holds (every slot is scored,
empty ones masked), so the checkpoint's memory is used as saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infinito.atomic import DiskFull, write_json
from infinito.config import PARAMS_FILE, BenchmarkConfig, ConfigError, ModelConfig, stage_params
from infinito.runtime import autocast, resolve_device, resolve_dtype, synchronize

# The params.yaml keys this stage reads: dvc.yaml's benchmark-inference params (tests keep them
# equal).
PARAMS_KEYS = ("seed", "benchmark", "train.device", "train.precision")

METRICS = ("ttft_ms", "p50_ms", "p95_ms", "tokens_per_sec")


@dataclasses.dataclass
class RunTimes:
    """Timestamps of one decoding run: when it started and when each new token was ready."""

    start: float
    token_ready: list[float]

    @property
    def ttft(self) -> float:
        return self.token_ready[0] - self.start

    @property
    def steps(self) -> list[float]:
        t = self.token_ready
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def total(self) -> float:
        return self.token_ready[-1] - self.start


def summarise(runs: list[RunTimes], batch: int, new_tokens: int) -> dict[str, float]:
    """TTFT median, per-token p50/p95 over all later steps, tokens/s over the median run."""
    steps = [s for r in runs for s in r.steps]
    total = statistics.median(r.total for r in runs)
    return {
        "ttft_ms": statistics.median(r.ttft for r in runs) * 1e3,
        # With new_tokens=1 there is no later step; the first token is then the only latency.
        "p50_ms": float(np.percentile(steps, 50)) * 1e3 if steps else runs[0].ttft * 1e3,
        "p95_ms": float(np.percentile(steps, 95)) * 1e3 if steps else runs[0].ttft * 1e3,
        "tokens_per_sec": batch * new_tokens / total,
    }


def check_grid(cfg: BenchmarkConfig, block_size: int) -> None:
    """Every prompt plus its new tokens must fit the model's context, so no run is cropped."""
    longest = max(cfg.prompt_lengths)
    if longest + cfg.new_tokens > block_size:
        raise ConfigError(
            f"benchmark.prompt_lengths max {longest} + benchmark.new_tokens {cfg.new_tokens} = "
            f"{longest + cfg.new_tokens} exceeds model.block_size={block_size}; lower "
            f"benchmark.prompt_lengths or benchmark.new_tokens"
        )


def interleaved(
    contestants: dict[str, Callable[[], RunTimes]],
    warmup: int,
    repeats: int,
    device: torch.device,
) -> tuple[dict[str, list[RunTimes]], dict[str, float]]:
    """Warm every contestant up, then time them in turns, one run each per round.

    Taking turns spreads any slowdown of a shared machine over all contestants alike, so the
    ratios between them stay fair. Returns the timed runs and, on CUDA, each one's peak memory.
    """
    for run in contestants.values():
        for _ in range(warmup):
            run()
    runs: dict[str, list[RunTimes]] = {name: [] for name in contestants}
    peaks = dict.fromkeys(contestants, 0.0)
    for _ in range(repeats):
        for name, run in contestants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs[name].append(run())
            if device.type == "cuda":
                peaks[name] = max(peaks[name], peak_memory_mb(device))
    return runs, peaks


def infinito_run(
    model: Any,
    idx: torch.Tensor,
    new_tokens: int,
    use_cache: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> RunTimes:
    """One greedy ``Infinito.generate`` call, stamped once per decoding step.

    ``generate`` applies ``lm_head`` once per new token (to the last position only), so a
    forward hook on it marks the end of each step's forward pass.
    """
    stamps: list[float] = []

    def stamp(*_: Any) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    handle = model.lm_head.register_forward_hook(stamp)
    try:
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, dtype):
            out = model.generate(
                idx, new_tokens, temperature=0.0, eos_token_id=None, use_cache=use_cache
            )
        synchronize(device)
        end = time.perf_counter()
    finally:
        handle.remove()
    if out.shape[1] != idx.shape[1] + new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(
            f"Infinito.generate made {out.shape[1] - idx.shape[1]} tokens in {len(stamps)} "
            f"output-head calls, expected {new_tokens} of each; step timing relies on one "
            f"lm_head call per new token"
        )
    # The last token is chosen after the last head call: it is ready when generate returns.
    return RunTimes(start, stamps[:-1] + [end])


def hf_run(
    model: torch.nn.Module,
    idx: torch.Tensor,
    new_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
) -> RunTimes:
    """One greedy ``GPT2LMHeadModel.generate`` call; its streamer stamps every new token."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            synchronize(device)
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    streamer = Stamps()
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast(device, dtype):
        out = model.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            streamer=streamer,
        )
    synchronize(device)
    if out.shape[1] != idx.shape[1] + new_tokens:
        raise RuntimeError(f"HF generate returned {out.shape[1] - idx.shape[1]} new tokens")
    # The streamer's first put is the prompt; the others are the new tokens.
    return RunTimes(start, streamer.times[1:])


def hf_reference_model(mcfg: ModelConfig, seed: int, device: torch.device) -> torch.nn.Module:
    """GPT-2 at INFINITO's dimensions, random init, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=mcfg.vocab_size,
        n_positions=mcfg.block_size,
        n_embd=mcfg.d_model,
        n_layer=mcfg.n_layer,
        n_head=mcfg.n_head,
        tie_word_embeddings=False,  # INFINITO's output head is untied
        # No end-of-text token: every run decodes exactly new_tokens, like INFINITO's here.
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config).to(device).eval()


def peak_memory_mb(device: torch.device) -> float:
    """Process peak RSS on CPU (Linux reports kB); max allocated tensor memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


PPL_BATCH = 8  # test windows per forward pass when a variant scores perplexity


def cpu_variants(
    cfg: BenchmarkConfig, seed: int, model_dir: Path, data_dir: Path, mcfg: ModelConfig
) -> dict[str, float]:
    """CPU decoding variants at batch 1 against HF's fp32 generate, and their test perplexity."""
    from infinito.data.splits import check_vocab, nonoverlapping_windows, open_split, read_meta
    from infinito.model import Infinito
    from infinito.quantize import inference_variant, weight_bytes
    from infinito.scoring import score

    cpu = torch.device("cpu")
    meta = read_meta(data_dir)
    check_vocab(
        mcfg.vocab_size,
        meta["vocab_size"],
        f"the checkpoint in {model_dir}",
        f"the tokenizer in {Path(data_dir) / 'meta.json'}",
    )
    test = open_split(data_dir, "test", meta)
    n = len(test) if cfg.quantized_ppl_tokens == 0 else min(len(test), cfg.quantized_ppl_tokens)
    windows = nonoverlapping_windows(n, mcfg.block_size)
    variants = ("fp32", *cfg.quantized_variants)
    models = {
        v: inference_variant(Infinito.from_checkpoint(model_dir, map_location="cpu"), v)
        for v in variants
    }
    hf = hf_reference_model(mcfg, seed, cpu)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {"cpu_ppl_tokens": float(sum(w.scored for w in windows))}
    for p in cfg.prompt_lengths:
        idx = torch.randint(0, mcfg.vocab_size, (1, p), generator=gen)
        contestants: dict[str, Callable[[], RunTimes]] = {
            f"cpu_{v}_b1_p{p}": lambda m=m, x=idx: infinito_run(
                m, x, cfg.new_tokens, True, cpu, torch.float32
            )
            for v, m in models.items()
        }
        contestants[f"cpu_hf_fp32_b1_p{p}"] = lambda x=idx: hf_run(
            hf, x, cfg.new_tokens, cpu, torch.float32
        )
        runs, _ = interleaved(contestants, cfg.warmup, cfg.repeats, cpu)
        for prefix, timings in runs.items():
            for key, value in summarise(timings, 1, cfg.new_tokens).items():
                out[f"{prefix}_{key}"] = value
        for v in variants:
            speed = out[f"cpu_{v}_b1_p{p}_tokens_per_sec"]
            out[f"cpu_{v}_speedup_vs_hf_fp32_b1_p{p}"] = (
                speed / out[f"cpu_hf_fp32_b1_p{p}_tokens_per_sec"]
            )
            out[f"cpu_{v}_speedup_vs_fp32_b1_p{p}"] = (
                speed / out[f"cpu_fp32_b1_p{p}_tokens_per_sec"]
            )
    for v, m in models.items():
        out[f"cpu_{v}_weight_mb"] = weight_bytes(m) / 2**20
        out[f"cpu_{v}_test_ppl"] = score(m, test, windows, PPL_BATCH, cpu, torch.float32).ppl
    for v in cfg.quantized_variants:
        out[f"cpu_{v}_test_ppl_rel_change"] = (
            out[f"cpu_{v}_test_ppl"] / out["cpu_fp32_test_ppl"] - 1
        )
    return out


def run_benchmark(
    cfg: BenchmarkConfig,
    seed: int,
    model_dir: Path,
    metrics_path: Path | None,
    device: str = "auto",
    precision: str = "auto",
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Time the grid and write ``metrics_path`` (when given); returns the flat metrics.

    ``data_dir`` (the tokenized splits) is needed only for ``benchmark.quantized_variants``.
    """
    from infinito.model import Infinito, checkpoint_config

    mcfg = checkpoint_config(model_dir)
    check_grid(cfg, mcfg.block_size)
    if cfg.quantized_variants and data_dir is None:
        raise ConfigError(
            "benchmark.quantized_variants scores test perplexity: pass --data data/tokenized"
        )

    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)

    checkpoint = Infinito.from_checkpoint(model_dir, map_location=str(dev)).to(dev).eval()
    torch.manual_seed(seed)
    other = Infinito(dataclasses.replace(mcfg, iit=not mcfg.iit)).to(dev).eval()
    models = (
        {"iit": checkpoint, "ablation": other}
        if mcfg.iit
        else {"iit": other, "ablation": checkpoint}
    )
    widest = max(cfg.batch_sizes)
    for model in models.values():  # stream memories need a row per generated row
        if model.config.stream_memory and model.memory.rows < widest:  # type: ignore[union-attr]
            model.reset_memory(rows=widest)

    metrics: dict[str, Any] = {
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "checkpoint_variant": "iit" if mcfg.iit else "ablation",
        "new_tokens": cfg.new_tokens,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
    }
    gen = torch.Generator().manual_seed(seed)
    prompts = {
        (b, p): torch.randint(0, mcfg.vocab_size, (b, p), generator=gen).to(dev)
        for b in cfg.batch_sizes
        for p in cfg.prompt_lengths
    }

    hf = hf_reference_model(mcfg, seed, dev) if cfg.hf_reference else None
    for (b, p), idx in prompts.items():
        contestants: dict[str, Callable[[], RunTimes]] = {}
        for name, model in models.items():
            for use_cache in (True, False):
                contestants[f"{name}_{'kv' if use_cache else 'nokv'}_b{b}_p{p}"] = (
                    lambda m=model, x=idx, c=use_cache: infinito_run(
                        m, x, cfg.new_tokens, c, dev, dtype
                    )
                )
        if hf is not None:
            contestants[f"hf_b{b}_p{p}"] = lambda x=idx: hf_run(hf, x, cfg.new_tokens, dev, dtype)
        runs, peaks = interleaved(contestants, cfg.warmup, cfg.repeats, dev)
        for prefix, timings in runs.items():
            for key, value in summarise(timings, b, cfg.new_tokens).items():
                metrics[f"{prefix}_{key}"] = value
            if dev.type == "cuda":
                metrics[f"{prefix}_peak_memory_mb"] = peaks[prefix]

    for b, p in prompts:
        grid = f"b{b}_p{p}"
        for name in models:
            metrics[f"kv_speedup_{name}_{grid}"] = (
                metrics[f"{name}_kv_{grid}_tokens_per_sec"]
                / metrics[f"{name}_nokv_{grid}_tokens_per_sec"]
            )
        metrics[f"iit_over_ablation_{grid}"] = (
            metrics[f"iit_kv_{grid}_tokens_per_sec"] / metrics[f"ablation_kv_{grid}_tokens_per_sec"]
        )
        if cfg.hf_reference:
            metrics[f"speedup_vs_hf_{grid}"] = (
                metrics[f"iit_kv_{grid}_tokens_per_sec"] / metrics[f"hf_{grid}_tokens_per_sec"]
            )
    if cfg.quantized_variants:
        assert data_dir is not None
        metrics.update(cpu_variants(cfg, seed, model_dir, data_dir, mcfg))
    metrics["peak_memory_mb"] = peak_memory_mb(dev)
    metrics["peak_memory_kind"] = "max_allocated" if dev.type == "cuda" else "rss"
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics


def quick(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """A seconds-long smoke run: batch 1, one short prompt, few tokens, one repeat."""
    return dataclasses.replace(
        cfg, batch_sizes=(1,), prompt_lengths=(8,), new_tokens=8, repeats=1, warmup=1
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinito benchmark",
        description="Time INFINITO's decoding (and HF GPT-2's) over the benchmark grid.",
    )
    p.add_argument("--params", type=Path, default=Path(PARAMS_FILE), help="params file")
    p.add_argument(
        "--model",
        "--checkpoint",
        dest="model",
        type=Path,
        required=True,
        help="checkpoint directory (the pipeline's: models/best)",
    )
    p.add_argument("--metrics", type=Path, help="write the metrics JSON here")
    p.add_argument(
        "--data",
        type=Path,
        help="tokenized splits (data/tokenized), for benchmark.quantized_variants' perplexity",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: batch 1, prompt 8, 8 new tokens, 1 repeat"
    )
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: train.device)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stage_params(args.params, PARAMS_KEYS) as params:
            cfg = quick(params.benchmark) if args.quick else params.benchmark
            metrics = run_benchmark(
                cfg,
                params.seed,
                args.model,
                args.metrics,
                device=args.device or params.train.device,
                precision=params.train.precision,
                data_dir=args.data,
            )
    except (ConfigError, DiskFull) as e:
        print(f"infinito benchmark: {e}", file=sys.stderr)
        return 2
    for key, value in metrics.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
