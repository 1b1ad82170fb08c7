"""``infinito <command> ...``: one entry point over the stage modules.

Each command is the same ``main(argv)`` that DVC runs as ``python -m <module>``, so the CLI,
``dvc.yaml`` and the Prefect flows share one code path. ``infinito <command> --help`` lists a
command's options.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "download": ("infinito.data.download", "fetch the corpus into data/raw"),
    "tokenize": ("infinito.data.tokenize", "GPT-2 BPE-encode data/raw into data/tokenized"),
    "train": ("infinito.train", "train INFINITO (options override params.yaml)"),
    "evaluate": ("infinito.evaluate", "perplexity, bits per byte and IIT statistics"),
    "generate": ("infinito.generate", "sample text from a checkpoint"),
    "benchmark": ("infinito.benchmark", "inference latency and throughput"),
    "report": ("infinito.report", "table of DVC experiments with significance tests"),
    "serve": ("infinito.serve.server", "serve a checkpoint: OpenAI-compatible API and playground"),
}


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
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
