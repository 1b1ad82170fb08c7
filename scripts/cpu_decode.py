"""CPU decoding variants (fp32, bf16, int8) against Hugging Face's fp32 generate, at batch 1.

The benchmark stage's ``cpu_variants`` alone, without the stage's full grid, on a checkpoint or,
without one, on a seeded random model of the seed's dimensions (decoding speed does not depend
on the weights; perplexity does, so a random model's perplexity change means little):

    python scripts/cpu_decode.py --data data/tokenized --threads 1
    python scripts/cpu_decode.py --model models/best --data data/tokenized --out cpu.json

Prints tokens/s per variant and prompt length, the speed-ups over HF fp32 and fp32, and the
test perplexity of each variant. docs/serve.md records a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from infinito.benchmark import cpu_variants
from infinito.model import checkpoint_config
from infinito.config import BenchmarkConfig, ModelConfig
from infinito.model import Infinito


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint (default: random, seed dimensions)")
    p.add_argument("--data", type=Path, required=True, help="tokenized splits (data/tokenized)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 128])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ppl-tokens", type=int, default=2048, help="test tokens each variant scores")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchmarkConfig(
        batch_sizes=(1,),
        prompt_lengths=tuple(args.prompt_lengths),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=1,
        quantized_variants=("bf16", "int8"),
        quantized_ppl_tokens=args.ppl_tokens,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            torch.manual_seed(args.seed)
            model_dir = Path(tmp) / "random"
            Infinito(ModelConfig()).save(model_dir)
        out = cpu_variants(cfg, args.seed, model_dir, args.data, checkpoint_config(model_dir))
    out["threads"] = torch.get_num_threads()
    variants = ("fp32", "bf16", "int8", "hf_fp32")
    print(f"threads {out['threads']}, tokens/s at batch 1 ({args.new_tokens} new tokens):")
    for n in args.prompt_lengths:
        speeds = ", ".join(f"{v} {out[f'cpu_{v}_b1_p{n}_tokens_per_sec']:.1f}" for v in variants)
        ratios = ", ".join(
            f"{v} {out[f'cpu_{v}_speedup_vs_hf_fp32_b1_p{n}']:.2f}x" for v in variants[:3]
        )
        print(f"  prompt {n}: {speeds}; over HF fp32: {ratios}")
    for v in variants[:3]:
        change = out.get(f"cpu_{v}_test_ppl_rel_change", 0.0)
        print(
            f"  {v}: test ppl {out[f'cpu_{v}_test_ppl']:.3f} ({change:+.4%}), "
            f"{out[f'cpu_{v}_weight_mb']:.0f} MB"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
