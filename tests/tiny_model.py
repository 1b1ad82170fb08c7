"""A tiny INFINITO for CPU tests of the model and its IIT parts (seconds, not minutes)."""

from __future__ import annotations

import torch

from infinito.config import ModelConfig
from infinito.model import Infinito

TINY = ModelConfig(
    vocab_size=61,
    d_model=32,
    n_layer=2,
    n_head=4,
    block_size=32,
    dropout=0.1,
    memory_slots=8,
    phi_chunk=8,
)


# At GPT-2's vocabulary, as exports carry GPT-2's tokenizer: the export and lm-eval tests' models.
EXPORT_ABLATION = ModelConfig(
    vocab_size=50257, d_model=32, n_layer=2, n_head=4, block_size=32, iit=False
)
EXPORT_IIT = ModelConfig(
    vocab_size=50257,
    d_model=32,
    n_layer=2,
    n_head=4,
    block_size=32,
    memory_slots=8,
    phi_chunk=8,
    threshold_init=0.5,  # low, so that the tiny model's chunks are written to its memory
)


def build(cfg: ModelConfig = TINY, seed: int = 0) -> Infinito:
    torch.manual_seed(seed)
    return Infinito(cfg)


def tokens(batch: int = 2, length: int = 32, seed: int = 1, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def populate(model: Infinito, calls: int = 3) -> None:
    """Fill the memory through the public path: forward passes of 4 rows, then writes (a stream
    memory gets 4 rows, one per stream)."""
    model.reset_memory(rows=4)
    with torch.no_grad():
        for i in range(calls):
            model.write_memory(model(tokens(4, seed=100 + i)).candidates)
    assert model.memory is not None and bool(model.memory.valid.any())


def randomise(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """Every backbone parameter random and of order one (biases and LayerNorms too), in place.

    For tests comparing two implementations (INFINITO and transformers' GPT-2): a swapped,
    untransposed or differently activated tensor then shows in the logits, while at GPT-2's
    initialisation (std 0.02, zero biases, unit norms) tanh and erf GELU agree within 1e-4.
    The IIT parts (memory, phi weights) keep their values. Works on either model's names.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("memory.", "phi_weights.")):
                continue
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return model
