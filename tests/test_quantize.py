"""Inference variants: bf16 weights and int8 linear layers that keep batch rows independent."""

from __future__ import annotations

import pytest
import torch
from tiny_model import build, populate, tokens
from torch import nn

from infinito.config import ConfigError
from infinito.quantize import PerRowQuantizedLinear, check_variant, inference_variant, weight_bytes


def test_int8_replaces_every_linear_layer_and_leaves_the_original_alone() -> None:
    model = build().eval()
    q = inference_variant(model, "int8")
    assert not any(type(m) is nn.Linear for m in q.modules())
    wrapped = [m for m in q.modules() if isinstance(m, PerRowQuantizedLinear)]
    assert len(wrapped) == sum(type(m) is nn.Linear for m in model.modules())
    assert all(type(m) is nn.Linear for m in [model.lm_head, model.transformer.h[0].mlp.c_fc])
    assert weight_bytes(q) < weight_bytes(model)


def test_int8_logits_stay_close_to_fp32() -> None:
    model = build().eval()
    populate(model)
    x = tokens(2, 16)
    with torch.no_grad():
        ref = model(x).logits
        got = inference_variant(model, "int8")(x).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert not torch.equal(got, ref)  # it is quantized


def test_int8_rows_do_not_depend_on_the_rest_of_the_batch() -> None:
    q = inference_variant(build().eval(), "int8")
    x = tokens(4, 16)
    x[3] = x[3] * 0 + 60  # a row with very different activations
    with torch.no_grad():
        batch = q(x).logits
        alone = q(x[1:2]).logits
    assert torch.equal(batch[1:2], alone)


def test_bf16_casts_floating_weights_and_memory_but_not_integer_buffers() -> None:
    model = inference_variant(build(), "bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.memory is not None and model.memory.age.dtype == torch.long
    out = model.generate(tokens(1, 8), 4, temperature=0.0)
    assert out.shape == (1, 12)


def test_variant_names_and_devices_are_checked() -> None:
    with pytest.raises(ConfigError, match="--dtype='fp16' is not one of fp32, bf16, int8"):
        check_variant("fp16", torch.device("cpu"), key="--dtype")
    with pytest.raises(ConfigError, match="CPU only"):
        check_variant("int8", torch.device("cuda"))
    model = build()
    assert inference_variant(model, "fp32") is model and not model.training
