"""Inference variants of a model for fast CPU decoding: fp32, bf16 weights, int8 linear layers.

A CPU decode step reads every weight once per new token; at INFINITO's seed size most of that is
the 512 x 50,257 output head, so decoding is bound by memory traffic and shrinking the weights
speeds it up:

- ``fp32``: the model as trained.
- ``bf16``: every floating-point parameter and buffer cast to bfloat16 (half the bytes). The
  caller does not need autocast: activations follow the weights.
- ``int8``: PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``) of every
  ``nn.Linear``: int8 weights with one scale per output channel, activations quantized on the
  fly. Dynamic quantization picks one activation scale per input tensor, which would let the
  rows of a batch change each other's numbers; ``PerRowQuantizedLinear`` quantizes each row of
  the leading dimension (each sequence of a batch) on its own, so a sequence gives bit-for-bit
  the same result alone and inside any batch. Embeddings, LayerNorms and attention stay fp32.

torchao was tried as the int8 backend: version 0.18 installs against torch 2.13, but its CPU
int8 paths ran slower than fp32 here, so the built-in dynamic quantization is used.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from infinito.config import INFERENCE_DTYPES, ConfigError

VARIANTS = INFERENCE_DTYPES


class PerRowQuantizedLinear(nn.Module):
    """A dynamically quantized linear layer applied to each row of dim 0 separately.

    Rows are sequences (B, T, D) or tokens of different sequences (B, D), so each gets its own
    activation scale and never depends on what else is in the batch.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[0] == 1:
            return self.inner(x)
        return torch.cat([self.inner(row) for row in x.split(1)])


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (fp32, CPU) with every ``nn.Linear`` as int8 dynamic quantization."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch 2.13 announces that eager-mode quantization moves to torchao; it still works.
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(
            copy.deepcopy(model).float().eval(),
            {nn.Linear: per_channel_dynamic_qconfig},
            dtype=torch.qint8,
        )
    _wrap_rows(quantized, DynamicLinear)
    return quantized


def _wrap_rows(root: nn.Module, kind: type[nn.Module]) -> None:
    for name, child in list(root.named_children()):
        if isinstance(child, kind):
            setattr(root, name, PerRowQuantizedLinear(child))
        else:
            _wrap_rows(child, kind)


def check_variant(variant: str, device: torch.device, key: str = "dtype") -> None:
    """Reject an unknown variant, or int8 off the CPU (PyTorch's int8 kernels are CPU-only)."""
    if variant not in VARIANTS:
        raise ConfigError(f"{key}={variant!r} is not one of {', '.join(VARIANTS)}")
    if variant == "int8" and device.type != "cpu":
        raise ConfigError(f"{key}='int8' runs on the CPU only (got device {device}); use bf16")


def inference_variant(model: nn.Module, variant: str) -> nn.Module:
    """``model`` ready to decode in ``variant`` (eval mode); fp32 and bf16 convert in place."""
    check_variant(variant, next(model.parameters()).device)
    model.eval()
    if variant == "bf16":
        return model.to(torch.bfloat16)
    if variant == "int8":
        return quantize_int8(model)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, buffers and packed int8 weights (what a step reads)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    tensors = [t for t in model.state_dict().values() if isinstance(t, Tensor)]
    for m in model.modules():
        if isinstance(m, DynamicLinear):
            tensors += [t for t in (m.weight(), m.bias()) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)
