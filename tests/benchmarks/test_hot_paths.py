"""Micro-benchmarks of INFINITO's hot paths at the seed's dimensions (d_model 512, 6 layers).

- one decoding step with the KV cache (what ``Infinito.generate`` runs per token: the memory's
  slots projected once per call, ``IITGuidedMemory.frozen``), IIT model and ablation, after a
  64-token prefix;
- the memory read (``IITGuidedMemory.forward``) over a full 256-slot memory, for one decoding
  position and for a training batch;
- the PHI computation (``ImprovedIITMetrics`` + ``LearnablePhiWeights``) on a training batch.

Run with ``make bench`` (or ``pytest tests/benchmarks/test_hot_paths.py --benchmark-only``);
the default test run skips them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
import torch

from infinito.config import ModelConfig
from infinito.iit import IITGuidedMemory, ImprovedIITMetrics, LearnablePhiWeights
from infinito.model import Infinito, LayerCache

SEED_CFG = ModelConfig(dropout=0.0)
PREFIX = 64


@pytest.mark.parametrize("iit", [True, False], ids=["iit", "ablation"])
def test_decode_step_with_kv_cache(benchmark: Any, iit: bool) -> None:
    torch.manual_seed(0)
    model = Infinito(dataclasses.replace(SEED_CFG, iit=iit)).eval()
    prefix = torch.randint(0, SEED_CFG.vocab_size, (1, PREFIX))
    token = torch.randint(0, SEED_CFG.vocab_size, (1, 1))

    def prefill() -> tuple[tuple[Any, ...], dict[str, Any]]:
        # A fresh cache holding the prefix for every round: a step appends to the cache.
        caches = [LayerCache(SEED_CFG.block_size) for _ in range(SEED_CFG.n_layer)]
        with torch.no_grad():
            model._decode(prefix, 0, caches)
        return (token, PREFIX, caches), {}

    def step(tokens: torch.Tensor, start: int, caches: list[LayerCache]) -> torch.Tensor:
        with torch.no_grad():
            return model._decode(tokens, start, caches)

    frozen = model.memory.frozen() if model.memory is not None else contextlib.nullcontext()
    with frozen:
        logits = benchmark.pedantic(step, setup=prefill, rounds=30, warmup_rounds=3)
    assert logits.shape == (1, SEED_CFG.vocab_size)


def _full_memory() -> IITGuidedMemory:
    torch.manual_seed(0)
    memory = IITGuidedMemory(SEED_CFG).eval()
    S, D = SEED_CFG.memory_slots, SEED_CFG.d_model
    memory.keys, memory.values = torch.randn(S, D), torch.randn(S, D)
    memory.phi = torch.full((S,), 5.0)
    memory.valid = torch.ones(S, dtype=torch.bool)
    return memory


@pytest.mark.parametrize("shape", [(1, 1), (4, 256)], ids=["decode_b1", "train_b4_t256"])
def test_memory_read(benchmark: Any, shape: tuple[int, int]) -> None:
    memory = _full_memory()
    x = torch.randn(*shape, SEED_CFG.d_model)
    with torch.no_grad():
        read, mass = benchmark(memory, x)
    assert read.shape == x.shape and mass.shape == (SEED_CFG.memory_slots,)


def test_phi_computation(benchmark: Any) -> None:
    B, T, D, H = 4, SEED_CFG.block_size, SEED_CFG.d_model, SEED_CFG.n_head
    torch.manual_seed(0)
    states = torch.randn(B, T, D)
    q, k = torch.randn(B, H, T, D // H), torch.randn(B, H, T, D // H)
    metrics, weights = ImprovedIITMetrics(), LearnablePhiWeights()

    def phi() -> torch.Tensor:
        with torch.no_grad():
            return weights(metrics(states, q, k, SEED_CFG.phi_chunk))

    out = benchmark(phi)
    assert out.shape == (B, T // SEED_CFG.phi_chunk)
    assert bool(((out >= 0) & (out <= 10)).all())
