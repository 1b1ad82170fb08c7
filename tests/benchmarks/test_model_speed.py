"""Training-speed benchmarks of the model at the seed's dimensions, on whatever device runs them.

- a training step (forward, backward, AdamW step, memory write) of the IIT model against the
  ablation (target: at most 1.10x the ablation's time);
- forward + backward tokens/s of INFINITO (IIT and ablation) against Hugging Face's
  ``GPT2LMHeadModel`` built with the same dimensions (untied head, SDPA attention; target: at
  least Hugging Face's throughput).

The models under comparison run interleaved, round by round, so load on a shared machine hits
them alike; the medians and their ratios land in the benchmark's ``extra_info`` (see
``--benchmark-json``) and are printed. Run with ``make bench``; the default test run skips them.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from infinito.config import ModelConfig
from infinito.model import Infinito

SEED_CFG = ModelConfig()  # vocab 50257, d_model 512, 6 layers, 8 heads, block 256, dropout 0.1
BATCH, SEQ = 2, 256
ROUNDS = 5


def _build(iit: bool) -> Infinito:
    torch.manual_seed(0)
    model = Infinito(dataclasses.replace(SEED_CFG, iit=iit)).train()
    if model.memory is not None:  # a full memory, as in training after the first steps
        with torch.no_grad():
            for seed in range(2):
                idx = torch.randint(0, SEED_CFG.vocab_size, (16, SEQ))
                torch.manual_seed(seed)
                model.write_memory(model(idx).candidates)
        assert model.memory_stats()["memory_utilisation"] == 1.0
    return model


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=SEED_CFG.vocab_size,
        n_positions=SEED_CFG.block_size,
        n_embd=SEED_CFG.d_model,
        n_layer=SEED_CFG.n_layer,
        n_head=SEED_CFG.n_head,
        tie_word_embeddings=False,  # INFINITO's head is untied
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).train()


def _interleaved(
    benchmark: Any, steps: dict[str, Callable[[], None]], rounds: int = ROUNDS
) -> dict[str, float]:
    """Time each step once per round, in turn; return the median and the fastest seconds per
    step (``NAME`` and ``NAME_min``): on a busy machine the fastest round is the least disturbed."""
    times: dict[str, list[float]] = {name: [] for name in steps}

    def one_round() -> None:
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    one_round()  # warm-up: allocator, kernels, optimizer state
    for name in times:
        times[name].clear()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return {name: statistics.median(t) for name, t in times.items()} | {
        f"{name}_min": min(t) for name, t in times.items()
    }


def test_train_step_iit_vs_ablation(benchmark: Any) -> None:
    idx = torch.randint(0, SEED_CFG.vocab_size, (BATCH, SEQ))
    losses: dict[str, float] = {}

    def train_step(model: Infinito, name: str) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

        def step() -> None:
            out = model(idx, idx)
            assert out.loss is not None
            loss = out.loss + 0.1 * out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.write_memory(out.candidates)
            losses[name] = loss.item()

        return step

    medians = _interleaved(
        benchmark,
        {"iit": train_step(_build(True), "iit"), "ablation": train_step(_build(False), "ablation")},
    )
    ratio = medians["iit"] / medians["ablation"]
    ratio_min = medians["iit_min"] / medians["ablation_min"]
    benchmark.extra_info.update(
        {f"{k}_s": v for k, v in medians.items()}
        | {"iit_over_ablation": ratio, "iit_over_ablation_min": ratio_min}
    )
    print(
        f"\ntrain step {BATCH}x{SEQ} seconds {medians}; IIT / ablation: median {ratio:.3f}, "
        f"fastest {ratio_min:.3f} (target <= 1.10)"
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_forward_backward_throughput_vs_hf_gpt2(benchmark: Any) -> None:
    idx = torch.randint(0, SEED_CFG.vocab_size, (BATCH, SEQ))
    ours_iit, ours_ablation, hf = _build(True), _build(False), _hf_gpt2()
    assert sum(p.numel() for p in hf.parameters()) == ours_ablation.num_params()

    def ours(model: Infinito) -> Callable[[], None]:
        def step() -> None:
            out = model(idx, idx)
            assert out.loss is not None
            (out.loss + 0.1 * out.aux_loss).backward()
            model.zero_grad(set_to_none=True)

        return step

    def reference() -> None:
        hf(input_ids=idx, labels=idx).loss.backward()
        hf.zero_grad(set_to_none=True)

    medians = _interleaved(
        benchmark, {"hf_gpt2": reference, "ablation": ours(ours_ablation), "iit": ours(ours_iit)}
    )
    tokens_per_s = {name: BATCH * SEQ / t for name, t in medians.items()}
    ratios = {
        f"{name}_over_hf{suffix}": tokens_per_s[name + suffix] / tokens_per_s["hf_gpt2" + suffix]
        for name in ("ablation", "iit")
        for suffix in ("", "_min")
    }
    benchmark.extra_info.update({f"{k}_tokens_per_s": v for k, v in tokens_per_s.items()} | ratios)
    print(f"\nforward+backward tokens/s {BATCH}x{SEQ}: {tokens_per_s}; {ratios} (target >= 1)")
