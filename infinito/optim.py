"""The trainer's optimisation: AdamW parameter groups and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from infinito.config import Params


def build_optimizer(
    model: torch.nn.Module, params: Params, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; fused kernels on CUDA."""
    tc = params.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=params.lr, betas=(tc.beta1, tc.beta2), fused=device.type == "cuda" or None
    )


class LRFactor:
    """Linear warmup, then cosine down to ``min_ratio`` (or constant): LambdaLR's multiplier.

    A plain object rather than a closure so LambdaLR's state_dict records its settings.
    """

    def __init__(self, schedule: str, warmup: int, total: int, min_ratio: float) -> None:
        self.schedule = schedule
        self.warmup = warmup
        self.total = total
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule != "cosine":
            return 1.0  # constant, or plateau (which ReduceLROnPlateau lowers)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedulers(
    optimizer: torch.optim.Optimizer, params: Params, total_steps: int
) -> tuple[torch.optim.lr_scheduler.LambdaLR, torch.optim.lr_scheduler.ReduceLROnPlateau | None]:
    """Per-step LambdaLR (warmup + cosine/constant) and, for ``plateau``, ReduceLROnPlateau.

    With ``plateau`` the LambdaLR only runs the warmup; after it, ReduceLROnPlateau owns the lr.
    """
    tc = params.train
    factor = LRFactor(tc.schedule, tc.warmup_steps, total_steps, tc.min_lr_ratio)
    per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    plateau = None
    if tc.schedule == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=tc.plateau_factor,
            patience=tc.plateau_patience,
            min_lr=tc.min_lr_ratio * params.lr,
        )
    return per_step, plateau
