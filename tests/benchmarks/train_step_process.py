"""One training step in a process of its own, reporting the process's peak resident memory.

``python tests/benchmarks/train_step_process.py MODEL --batch 16 --seq 256 [--steps 1]``, MODEL
one of ``iit``, ``ablation`` (INFINITO at the seed's dimensions) or ``hf_gpt2`` (Hugging Face's
``GPT2LMHeadModel`` of the same dimensions, untied head, SDPA attention). A step is forward,
backward and an AdamW step (and INFINITO's memory write). Every model's process imports the
same modules (torch, transformers, infinito), so the import cost is alike. Prints one JSON line:
``peak_rss_mib`` (``getrusage``'s ``ru_maxrss``), ``rss_before_step_mib`` (after building the
model and its optimizer), the loss of each step and the seconds of the last one.
``test_train_memory.py`` runs it; it is a script, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

from infinito.config import ModelConfig
from infinito.model import Infinito

MODELS = ("iit", "ablation", "hf_gpt2")


def _rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def build(name: str, cfg: ModelConfig) -> tuple[torch.nn.Module, Callable[[torch.Tensor], Any]]:
    """The model and its training step on a (B, T + 1) window batch; the step returns the loss."""
    torch.manual_seed(0)
    if name == "hf_gpt2":
        config = transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            tie_word_embeddings=False,  # INFINITO's head is untied
            attn_implementation="sdpa",
        )
        hf = transformers.GPT2LMHeadModel(config).train()
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)

        def hf_step(xy: torch.Tensor) -> Any:
            loss = hf(input_ids=xy[:, :-1], labels=xy[:, :-1]).loss  # shifts the labels itself
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return hf, hf_step
    model = Infinito(dataclasses.replace(cfg, iit=name == "iit")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(xy: torch.Tensor) -> Any:
        out = model(xy[:, :-1], xy[:, 1:])
        loss = out.loss + 0.1 * out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.write_memory(out.candidates)
        return out.loss.detach()

    return model, step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig()  # the seed's dimensions: vocab 50257, d_model 512, 6 layers, 8 heads
    model, step = build(args.model, cfg)
    xy = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=None)
    before = _current_rss_mib()
    losses, seconds = [], 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(float(step(xy)))
        seconds = time.perf_counter() - t0
    report = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "n_params": sum(p.numel() for p in model.parameters()),
        "rss_before_step_mib": before,
        "peak_rss_mib": _rss_mib(),
        "losses": losses,
        "last_step_sec": seconds,
        "torch": torch.__version__,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
