"""The chunked linear cross-entropy: the plain path's loss and gradients, without its logits."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_model import TINY, build, populate, tokens
from torch.utils._python_dispatch import TorchDispatchMode

from infinito import losses
from infinito.losses import IGNORE_INDEX, block_rows, linear_cross_entropy

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(n: int = 300, d: int = 24, v: int = 1000, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g)).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


@pytest.mark.parametrize("rows", [1, 64, 77, 300, 4096], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("ignored", [0, 3], ids=["all-targets", "every-3rd-ignored"])
def test_loss_and_gradients_equal_plain_cross_entropy(rows: int, ignored: int) -> None:
    h, w, t = _inputs()
    if ignored:
        t[::ignored] = IGNORE_INDEX
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX)
    ref_h, ref_w = torch.autograd.grad(2.5 * ref, [h, w])  # an upstream gradient other than 1
    got = linear_cross_entropy(h, w, t, rows=rows)
    got_h, got_w = torch.autograd.grad(2.5 * got, [h, w])
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(got_h, ref_h, **TOL)
    torch.testing.assert_close(got_w, ref_w, **TOL)
    if ignored:
        assert torch.count_nonzero(got_h[::ignored]) == 0  # ignored rows get no gradient


def test_float64_is_exact_and_all_ignored_is_nan_as_in_pytorch() -> None:
    h, w, t = (x.double() if x.is_floating_point() else x for x in _inputs(n=50))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    ref = F.cross_entropy(h @ w.t(), t)
    got = linear_cross_entropy(h, w, t, rows=16)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    none = torch.full_like(t, IGNORE_INDEX)
    assert torch.isnan(F.cross_entropy(h @ w.t(), none)) and torch.isnan(
        linear_cross_entropy(h, w, none)
    )


def test_without_gradients_only_the_loss_is_computed() -> None:
    h, w, t = _inputs()
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, rows=50)
    assert got.grad_fn is None
    torch.testing.assert_close(got, F.cross_entropy(h @ w.t(), t), **TOL)
    frozen_w = w.detach()  # a frozen head: the gradient reaches h alone
    (g_h,) = torch.autograd.grad(linear_cross_entropy(h, frozen_w, t, rows=50), [h])
    (ref_h,) = torch.autograd.grad(F.cross_entropy(h @ frozen_w.t(), t), [h])
    torch.testing.assert_close(g_h, ref_h, **TOL)


def test_bf16_autocast_matches_the_plain_path_within_bf16_rounding() -> None:
    h, w, t = _inputs(n=256, d=64, v=2000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w), t)
        got = linear_cross_entropy(h, w, t, rows=64)
    ref_h, ref_w = torch.autograd.grad(ref, [h, w])
    got_h, got_w = torch.autograd.grad(got, [h, w])
    assert got.dtype == ref.dtype == torch.float32
    assert got_h.dtype == h.dtype and got_w.dtype == w.dtype
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    for a, b in ((got_h, ref_h), (got_w, ref_w)):
        assert (a - b).norm() / b.norm() < 1e-2  # bf16 operands: 1e-3 to 1e-2


def test_block_rows() -> None:
    assert block_rows(4096, 50257) == 640  # 2**25 logits per block: 128 MiB in float32
    assert block_rows(100, 50257) == 100  # never more than all rows
    assert block_rows(10_000, 10**9) == 64  # at least 64 rows


def test_bad_arguments_are_named() -> None:
    h, w, t = _inputs(n=8)
    with pytest.raises(ValueError, match=r"must be \(N, D\) and \(V, D\)"):
        linear_cross_entropy(h, w.t(), t)
    with pytest.raises(ValueError, match=r"targets \(7,\) must be \(8,\)"):
        linear_cross_entropy(h, w, t[:7])
    with pytest.raises(ValueError, match=r"impl='fused' must be one of chunked, liger"):
        linear_cross_entropy(h, w, t, impl="fused")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rows=0 must be at least 1"):
        linear_cross_entropy(h, w, t, rows=0)
    with pytest.raises(ValueError, match=r"impl='liger' runs Triton kernels on CUDA only"):
        linear_cross_entropy(h, w, t, impl="liger")


# ---------------------------------------------------------------- through the model


@pytest.mark.parametrize("iit", [True, False], ids=["iit", "ablation"])
def test_model_training_step_equals_the_full_logits_path(iit: bool) -> None:
    """Training's default (no logits) against today's path (full logits), fp32, same seed."""
    cfg = replace(TINY, iit=iit, vocab_size=300)
    model = build(cfg).train()
    if iit:
        populate(model)  # the memory read takes part, as in training after the first steps
    idx = tokens(4, 33, vocab=300)
    idx[0, 5:9] = 7
    targets_ignored = idx.clone()
    targets_ignored[1, 10:20] = IGNORE_INDEX
    for batch in (idx, targets_ignored):
        inputs = batch.clamp_min(0)
        full, full_grads = _step_with_inputs(model, inputs, batch, return_logits=True)
        chunked, chunked_grads = _step_with_inputs(model, inputs, batch)
        assert chunked.logits is None and full.logits is not None
        torch.testing.assert_close(chunked.loss, full.loss, **TOL)
        torch.testing.assert_close(chunked.aux_loss, full.aux_loss, **TOL)
        assert chunked_grads.keys() == full_grads.keys()
        assert "lm_head.weight" in chunked_grads and "transformer.wte.weight" in chunked_grads
        for name, g in full_grads.items():
            torch.testing.assert_close(chunked_grads[name], g, **TOL, msg=name)


def _step_with_inputs(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, **kwargs: Any
) -> tuple[Any, dict[str, Any]]:
    """Forward (seeded: dropout and noise draw alike) and backward of the training loss."""
    torch.manual_seed(123)
    out = model(inputs[:, :-1], targets[:, 1:], **kwargs)
    (out.loss + 0.1 * out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("return_logits", [False, True], ids=["chunked", "full-logits"])
def test_training_never_forms_the_full_logits(
    return_logits: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tensor of B*T*V elements in the forward and backward pass unless logits are asked."""
    V = 4096  # large enough that the logits are the largest tensor by far
    model = build(replace(TINY, vocab_size=V)).train()
    idx = tokens(8, 32, vocab=V)
    n_logits = idx.numel() * V
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 64 * V)  # blocks of 64 of the 256 rows
    with _LargestTensor() as mode:
        out = model(idx, idx, return_logits=return_logits)
        (out.loss + 0.1 * out.aux_loss).backward()
    if return_logits:
        assert mode.largest >= n_logits  # the check sees the plain path's logits
    else:
        assert mode.largest <= n_logits // 4, (mode.largest, n_logits)
        assert mode.largest == 64 * V  # one block of logits
