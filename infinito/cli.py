"""``infinito <command> ...``: one entry point over the stage modules and the interop commands.

Each stage command is the same ``main(argv)`` that DVC runs as ``python -m <module>``, so the
CLI, ``dvc.yaml`` and the Prefect flows share one code path. ``export`` and ``lm-eval`` are
commands only (docs/export.md says why), defined below over ``infinito.interop``.
``infinito <command> --help`` lists a command's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

COMMANDS = {
    "check-params": ("infinito.check_params", "validate params.yaml (the pipeline's first stage)"),
    "download": ("infinito.data.download", "fetch the corpus into data/raw"),
    "tokenize": ("infinito.data.tokenize", "GPT-2 BPE-encode data/raw into data/tokenized"),
    "train": ("infinito.train", "train INFINITO (options override params.yaml)"),
    "evaluate": ("infinito.evaluate", "perplexity, bits per byte and IIT statistics"),
    "generate": ("infinito.generate", "sample text from a checkpoint"),
    "benchmark": ("infinito.benchmark", "inference latency and throughput"),
    "report": ("infinito.report", "table of DVC experiments with significance tests"),
    "export": ("", "a transformers GPT-2 or Hub folder with tokenizer and model card"),
    "lm-eval": ("", "score a checkpoint or Hub model with lm-evaluation-harness"),
    "serve": ("infinito.serve.server", "serve a checkpoint: OpenAI-compatible API and playground"),
}


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="infinito export",
        description="Write a checkpoint as a folder that transformers / the Hub load: the "
        "ablation as a plain GPT2LMHeadModel, the IIT model as Infinito.save_pretrained's "
        "folder; both with GPT-2's tokenizer and a model card (docs/export.md).",
    )
    parser.add_argument("--model", type=Path, default=Path("models/best"), help="checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="folder (default exports/<format>)")
    parser.add_argument("--format", choices=("auto", "gpt2", "infinito"), default="auto")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--train-metrics", type=Path, default=Path("metrics/train.json"))
    parser.add_argument("--eval-metrics", type=Path, default=Path("metrics/eval.json"))
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload to this Hub repo")
    parser.add_argument("--private", action="store_true", help="a new Hub repo is private")
    args = parser.parse_args(argv)

    from infinito.config import ConfigError
    from infinito.interop import InteropError
    from infinito.interop.hf import export_model, push_folder
    from infinito.model import CheckpointError

    try:
        folder, fmt = export_model(
            args.model,
            args.out,
            args.format,
            args.params if args.params.is_file() else None,
            args.train_metrics,
            args.eval_metrics,
            args.push_to_hub,
        )
    except (ConfigError, CheckpointError, InteropError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"export: {args.model} -> {folder} ({fmt})")
    if args.push_to_hub:
        url = push_folder(folder, args.push_to_hub, private=args.private or None)
        print(f"export: uploaded to {url}")
    return 0


def lm_eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="infinito lm-eval",
        description="Score a model with lm-evaluation-harness: an INFINITO checkpoint or "
        "export through INFINITO's model class, a transformers folder or Hub id (gpt2) "
        "through lm-eval's hf backend (docs/export.md).",
    )
    parser.add_argument("--model", default="models/best", help="checkpoint, folder or Hub id")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--backend", choices=("auto", "infinito", "hf"), default="auto")
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "auto"), default="fp32")
    parser.add_argument("--max-length", type=int, default=None, help="default: the context")
    parser.add_argument("--limit", type=float, default=None, help="documents per task")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--include-path", type=Path, default=None, help="extra task YAMLs")
    parser.add_argument("--output", type=Path, default=None, help="flat metrics JSON")
    args = parser.parse_args(argv)

    from lm_eval.utils import make_table

    from infinito.atomic import write_json
    from infinito.config import ConfigError
    from infinito.interop import InteropError
    from infinito.interop.lm_eval import flat_results, run_harness

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        results = run_harness(
            args.model,
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            backend=args.backend,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            max_length=args.max_length,
            limit=limit,
            num_fewshot=args.num_fewshot,
            include_path=args.include_path,
            revision=args.revision,
        )
    except (ConfigError, InteropError) as e:
        print(f"lm-eval: error: {e}", file=sys.stderr)
        return 2
    print(f"lm-eval: {args.model} through the {results['backend']} backend")
    print(make_table(results))
    if args.output is not None:
        write_json(args.output, {"model": str(args.model), **flat_results(results)})
    return 0


FUNCTIONS: dict[str, Callable[[list[str]], int]] = {"export": export_main, "lm-eval": lm_eval_main}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: infinito <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'infinito <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"infinito: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command in FUNCTIONS:
        return FUNCTIONS[command](rest)
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
