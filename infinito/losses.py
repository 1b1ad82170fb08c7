"""Cross-entropy of a linear output head, computed without the full logits tensor.

A language model's loss is ``cross_entropy(h @ W.T, targets)`` with h (N, D) the final hidden
states and W (V, D) the output head. Written that way, the logits (N, V) exist whole in the
forward pass and again as their gradient in the backward pass: at the seed's dimensions
(N = 16 x 256, V = 50,257) that is 823 MB per copy in float32, more than the rest of the step's
activations together. ``linear_cross_entropy`` computes the same loss a block of rows at a time
and, when gradients are wanted, the gradients too, in the same pass over each block (as Liger
Kernel's fused linear cross-entropy does): for a block of rows the logits, their log-sum-exp,
the loss terms and ``dL/dlogits = (softmax - onehot) / n`` are formed, multiplied into dL/dh
and accumulated into dL/dW, and freed before the next block. The backward pass then only scales
the stored gradients by the incoming one. No matrix product is repeated, so the arithmetic is
the plain path's; memory holds one block's logits instead of all of them.

Semantics are ``F.cross_entropy(..., ignore_index=IGNORE_INDEX)`` with mean reduction: targets
equal to -100 count neither in the sum nor in the divisor (all ignored gives NaN, as there).
Under autocast the matrix products run in the autocast dtype and the softmax in float32, as
autocast runs the plain path. ``impl="liger"`` runs Liger Kernel's Triton version instead (CUDA
only, ``pip install liger-kernel``); docs/speed.md compares them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (PyTorch's default)
BLOCK_ELEMENTS = 1 << 25  # logits per block (128 MiB in float32): rows = this // vocabulary
Impl = Literal["chunked", "liger"]
IMPLS: tuple[str, ...] = ("chunked", "liger")


def block_rows(n_rows: int, vocab: int, block_elements: int | None = None) -> int:
    """Rows per block: about ``block_elements`` (default ``BLOCK_ELEMENTS``) logits, a multiple
    of 64 rows, at most all."""
    block_elements = BLOCK_ELEMENTS if block_elements is None else block_elements
    rows = max(64, (block_elements // max(vocab, 1)) // 64 * 64)
    return min(rows, n_rows)


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    impl: Impl = "chunked",
    rows: int | None = None,
) -> Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, without the (N, V) logits.

    h (N, D) hidden states, weight (V, D) the head (no bias), targets (N,) ids or IGNORE_INDEX;
    returns a 0-dim float32 tensor (float64 for float64 inputs). ``rows`` overrides the block
    size (``block_rows``).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)} must be "
            "(N, D) and (V, D)"
        )
    if targets.shape != h.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: targets {tuple(targets.shape)} must be ({h.shape[0]},)"
        )
    targets = targets.long()
    if impl == "liger":
        return _liger(h, weight, targets)
    if impl != "chunked":
        raise ValueError(f"linear_cross_entropy: impl={impl!r} must be one of {', '.join(IMPLS)}")
    rows = block_rows(h.shape[0], weight.shape[0]) if rows is None else rows
    if rows < 1:
        raise ValueError(f"linear_cross_entropy: rows={rows} must be at least 1")
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and h.requires_grad, grad and weight.requires_grad
    if not (need_h or need_w):
        return _blocks(h, weight, targets, rows, False, False)[0]
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets, rows, need_h, need_w)


def _blocks(
    h: Tensor, weight: Tensor, targets: Tensor, rows: int, need_h: bool, need_w: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The mean loss and, as asked, dL/dh (like h) and dL/dW, one block at a time; sums in
    float32 (float64 for float64 inputs)."""
    valid = targets != IGNORE_INDEX  # (N,)
    safe = torch.where(valid, targets, torch.zeros_like(targets))  # gather needs an index
    acc = torch.promote_types(torch.promote_types(h.dtype, weight.dtype), torch.float32)
    count = valid.sum().to(acc)  # a tensor: no host synchronisation
    loss = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    for start in range(0, h.shape[0], rows):
        end = start + rows
        hb, tb, vb = h[start:end], safe[start:end], valid[start:end]
        raw = F.linear(hb, weight)  # (R, V) in the autocast dtype, if any
        logits = raw.to(acc)  # the same tensor when already in acc: worked on in place below
        top = logits.amax(-1, keepdim=True)  # (R, 1)
        picked = logits.gather(1, tb[:, None])  # (R, 1)
        e = logits.sub_(top).exp_()  # exp(logits - max), in place: no second (R, V) tensor
        total = e.sum(-1, keepdim=True)  # (R, 1)
        nll = (total.log() + top - picked).squeeze(1)  # log-sum-exp minus the target's logit
        loss = loss + torch.where(vb, nll, torch.zeros_like(nll)).sum()
        if grad_h is None and grad_w is None:
            del raw, logits, e
            continue
        # dL/dlogits = (softmax - onehot) * scale, scale = 1/count on counted rows, else 0
        scale = (vb.to(acc) / count)[:, None]  # (R, 1)
        g = e.mul_(scale / total)
        g.scatter_add_(1, tb[:, None], -scale)
        g = g.to(raw.dtype)
        if grad_h is not None:
            grad_h[start:end] = (g @ weight.to(raw.dtype)).to(h.dtype)  # (R, D)
        if grad_w is not None and g.dtype == acc:
            grad_w.addmm_(g.t(), hb.to(acc))  # (V, D), accumulated in place
        elif grad_w is not None:  # autocast: the product in its dtype, summed in acc
            grad_w += (g.t() @ hb.to(raw.dtype)).to(acc)
        del raw, logits, e, g  # before the next block's logits exist: one block at a time
    return loss / count, grad_h, grad_w


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The chunked loss with its gradients formed in the forward pass (see the module doc)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        h: Tensor,
        weight: Tensor,
        targets: Tensor,
        rows: int,
        need_h: bool,
        need_w: bool,
    ) -> Tensor:
        loss, grad_h, grad_w = _blocks(h, weight, targets, rows, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype  # type: ignore[attr-defined]
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors  # type: ignore[attr-defined]
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)  # type: ignore[attr-defined]
        return grad_h, grad_w, None, None, None, None


def liger_available() -> bool:
    """Whether Liger Kernel's fused linear cross-entropy can be imported (CUDA use only)."""
    try:
        from liger_kernel.transformers.functional import (  # noqa: F401
            liger_fused_linear_cross_entropy,
        )
    except ImportError:
        return False
    return True


def _liger(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    if h.device.type != "cuda":
        raise ValueError(
            f"linear_cross_entropy: impl='liger' runs Triton kernels on CUDA only (h is on "
            f"{h.device}); use impl='chunked'"
        )
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise ValueError(
            "linear_cross_entropy: impl='liger' needs the liger-kernel package "
            f"(pip install liger-kernel); use impl='chunked' without it [{e}]"
        ) from e
    if torch.is_autocast_enabled("cuda"):  # its kernels take one dtype: autocast's, as F.linear
        dtype = torch.get_autocast_dtype("cuda")
        h, weight = h.to(dtype), weight.to(dtype)
    loss = liger_fused_linear_cross_entropy(h, weight, targets, ignore_index=IGNORE_INDEX)
    return loss.float()
