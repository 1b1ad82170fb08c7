"""generate-samples stage: sample continuations from a checkpoint and measure their quality.

``python -m infinito.generate --model models/best --samples samples/samples.md
--metrics metrics/generate.json`` reads the ``generate`` section of ``params.yaml``, draws
``samples_per_prompt`` continuations per prompt with a seeded generator and writes them as
Markdown (settings, then prompt and continuation per sample) plus flat metrics: distinct-1/2/3,
repeated-4-gram rate, self-BLEU, mean length, tokens/s and the end-of-text rate.

The same entry prints to the terminal when no output file is given, as the seed's CLI did::

    infinito generate --checkpoint models/best --prompt "Artificial intelligence is" \\
        --length 100 --temperature 0.8

Memory: the IIT memory is reset to empty before each prompt's samples, as evaluation resets it
before it streams. ``generate`` reads the memory but never writes it, so every sample sees the
same (empty) memory and the samples do not depend on what training left in it or on prompt order.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinito.atomic import DiskFull, write_json, write_text
from infinito.config import PARAMS_FILE, ConfigError, GenerateConfig, stage_params
from infinito.data.splits import check_vocab
from infinito.runtime import autocast, resolve_device, resolve_dtype, seed_everything, synchronize
from infinito.textmetrics import text_metrics

# The params.yaml keys this stage reads: dvc.yaml's generate-samples params (tests keep them
# equal).
PARAMS_KEYS = ("seed", "generate", "train.device", "train.precision")


@dataclass(frozen=True)
class Sample:
    """One continuation: the prompt, the decoded new text and how generation ended."""

    prompt: str
    index: int  # 1-based sample number within the prompt
    text: str  # decoded continuation, without the prompt and without end-of-text
    new_tokens: int  # tokens generated before end-of-text (or all of them)
    hit_eos: bool


@dataclass(frozen=True)
class GenerationResult:
    samples: list[Sample]
    seconds: float  # wall time of the generate calls only (device synchronised)
    tokens_generated: int  # tokens the model produced, end-of-text included, padding excluded


def sampling_kwargs(cfg: GenerateConfig) -> dict[str, Any]:
    """Map the ``generate`` section onto ``Infinito.generate``'s arguments (0/1.0 disable)."""
    return {
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k if cfg.top_k > 0 else None,
        "top_p": cfg.top_p if cfg.top_p < 1.0 else None,
        "repetition_penalty": cfg.repetition_penalty,
    }


def run_generation(
    model: Any,
    tokenizer: Any,
    cfg: GenerateConfig,
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> GenerationResult:
    """Draw ``cfg.samples_per_prompt`` continuations for every prompt, in prompt order.

    Each prompt's samples are one batch; one ``torch.Generator`` seeded with ``seed`` serves all
    prompts, so the whole set is reproducible from (checkpoint, settings, seed).
    """
    eos = tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(seed)
    kwargs = sampling_kwargs(cfg)
    samples: list[Sample] = []
    seconds = 0.0
    produced = 0
    model.eval()
    for prompt in cfg.prompts:
        ids = tokenizer.encode(prompt)
        idx = torch.tensor([ids] * cfg.samples_per_prompt, dtype=torch.long, device=device)
        # every prompt starts from the same, empty memory (see module doc); stream memories:
        # one per sample, each reading only its own row's past
        model.reset_memory(rows=len(idx))
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, dtype):
            out = model.generate(
                idx, eos_token_id=eos, use_cache=True, generator=generator, **kwargs
            )
        synchronize(device)
        seconds += time.perf_counter() - start
        for row, new in enumerate(out[:, idx.shape[1] :].tolist()):
            hit_eos = eos in new
            kept = new[: new.index(eos)] if hit_eos else new
            produced += len(kept) + int(hit_eos)
            samples.append(Sample(prompt, row + 1, tokenizer.decode(kept), len(kept), hit_eos))
    return GenerationResult(samples, seconds, produced)


def sample_metrics(result: GenerationResult) -> dict[str, Any]:
    """The stage's flat metrics for a set of samples."""
    texts = [s.text for s in result.samples]
    metrics: dict[str, Any] = dict(text_metrics(texts))
    metrics["mean_length_tokens"] = (
        sum(s.new_tokens for s in result.samples) / len(result.samples) if result.samples else 0.0
    )
    metrics["generation_tokens_per_sec"] = (
        result.tokens_generated / result.seconds if result.seconds > 0 else 0.0
    )
    metrics["n_samples"] = len(result.samples)
    metrics["eos_rate"] = sum(s.hit_eos for s in result.samples) / max(len(result.samples), 1)
    return metrics


def _block(text: str) -> list[str]:
    """``text`` in a fenced block longer than any backtick run inside it, so it shows verbatim."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}text", text, fence]


def render_markdown(
    result: GenerationResult, cfg: GenerateConfig, seed: int, model_dir: Path
) -> str:
    """Readable samples file: a settings table, then each prompt with its continuation."""
    rows = [
        ("checkpoint", str(model_dir)),
        ("max_new_tokens", cfg.max_new_tokens),
        ("decoding", "greedy" if cfg.temperature == 0 else "sampling"),
        ("temperature", cfg.temperature),
        ("top_k", cfg.top_k if cfg.top_k > 0 else "off"),
        ("top_p", cfg.top_p if cfg.top_p < 1.0 else "off"),
        ("repetition_penalty", cfg.repetition_penalty),
        ("samples_per_prompt", cfg.samples_per_prompt),
        ("seed", seed),
        ("memory", "reset to empty before each prompt; read, never written"),
        ("stop", "GPT-2 end-of-text token"),
    ]
    lines = ["# INFINITO samples", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    for n, s in enumerate(result.samples, start=1):
        ending = "stopped at end-of-text" if s.hit_eos else "reached max_new_tokens"
        lines += [
            "",
            f"## Sample {n}: prompt {s.prompt!r}, sample {s.index} of {cfg.samples_per_prompt}",
            "",
            "Prompt:",
            "",
            *_block(s.prompt),
            "",
            f"Continuation ({s.new_tokens} tokens, {ending}):",
            "",
            *_block(s.text),
        ]
    return "\n".join(lines) + "\n"


def load_generator_model(model_dir: Path, device: torch.device) -> Any:
    """Load a checkpoint directory for inference (eval mode, on ``device``)."""
    from infinito.model import Infinito

    model = Infinito.from_checkpoint(model_dir, map_location=str(device))
    return model.to(device).eval()


def generate_samples(
    cfg: GenerateConfig,
    seed: int,
    model_dir: Path,
    samples_path: Path | None,
    metrics_path: Path | None,
    device: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """Generate, compute metrics and write the samples file and metrics JSON (when given).

    Returns the metrics plus ``"samples"``: the list of :class:`Sample`.
    """
    from infinito.data.tokenize import load_tokenizer
    from infinito.model import checkpoint_config

    checkpoint_config(model_dir)  # no checkpoint: fail before loading the tokenizer

    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    tokenizer = load_tokenizer()
    model = load_generator_model(model_dir, dev)
    check_vocab(
        model.config.vocab_size,
        len(tokenizer),
        f"the checkpoint in {model_dir}",
        "GPT-2's tokenizer",
    )
    seed_everything(seed)
    result = run_generation(model, tokenizer, cfg, seed, dev, dtype)
    metrics = sample_metrics(result)
    if samples_path is not None:
        write_text(samples_path, render_markdown(result, cfg, seed, model_dir))
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return {**metrics, "samples": result.samples}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinito generate",
        description=(
            "Sample text from a checkpoint. Options override the generate section of "
            "params.yaml. Without --samples/--metrics the samples are printed; with them "
            "(the DVC stage) they are written to files."
        ),
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
    p.add_argument("--samples", type=Path, help="write the samples as Markdown here")
    p.add_argument("--metrics", type=Path, help="write the metrics JSON here")
    p.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        metavar="TEXT",
        help="prompt (repeat for several); replaces generate.prompts",
    )
    p.add_argument(
        "--length",
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        metavar="N",
        help="new tokens per sample (generate.max_new_tokens)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy")
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass; 1.0 disables")
    p.add_argument("--repetition-penalty", type=float, help="1.0 disables")
    p.add_argument(
        "--samples-per-prompt", type=int, metavar="N", help="generate.samples_per_prompt"
    )
    p.add_argument("--seed", type=int, help="sampling seed (default: params seed)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: train.device)")
    return p


def config_from_args(base: GenerateConfig, args: argparse.Namespace) -> GenerateConfig:
    """Apply command-line overrides; ``dataclasses.replace`` re-validates every value."""
    changes: dict[str, Any] = {}
    if args.prompts:
        changes["prompts"] = tuple(args.prompts)
    for key in (
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "samples_per_prompt",
    ):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    if args.greedy:
        changes["temperature"] = 0.0
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stage_params(args.params, PARAMS_KEYS) as params:
            cfg = config_from_args(params.generate, args)
            seed = params.seed if args.seed is None else args.seed
            if seed < 0:
                raise ConfigError(f"--seed={seed} must be a non-negative integer")
            out = generate_samples(
                cfg,
                seed,
                args.model,
                args.samples,
                args.metrics,
                device=args.device or params.train.device,
                precision=params.train.precision,
            )
    except (ConfigError, DiskFull) as e:
        print(f"infinito generate: {e}", file=sys.stderr)
        return 2
    if args.samples is None and args.metrics is None:
        for s in out["samples"]:
            print(f"--- {s.prompt!r} (sample {s.index}, {s.new_tokens} tokens)")
            print(s.prompt + s.text)
    else:
        print(
            f"{out['n_samples']} samples, distinct-2 {out['distinct_2']:.3f}, repeated 4-grams "
            f"{out['repeated_4gram_rate']:.3f}, {out['generation_tokens_per_sec']:.1f} tokens/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
