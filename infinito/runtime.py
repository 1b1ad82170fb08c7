"""Where and how INFINITO runs: device and precision choice, seeding, RNG state.

One home for what every stage needs from torch's runtime, so train, evaluate, generate and
benchmark pick devices and dtypes the same way.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from infinito.config import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU. An unavailable explicit CUDA device is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={spec!r} but no CUDA device is visible; use auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 autocast on CUDA (where supported), fp32 on CPU."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtype = _DTYPES[spec]
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("train.precision='fp16' is not supported on CPU; use fp32 or bf16")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context for forward passes; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_mode(setting: bool | str, device: torch.device) -> str | None:
    """``train.compile`` as a ``torch.compile`` mode, or None for eager.

    ``auto`` compiles in the default mode on CUDA only; ``true`` is the default mode anywhere; a
    mode name is that mode anywhere (reduce-overhead and max-autotune capture CUDA graphs, which
    apply on CUDA only; on CPU they compile as the default mode does).
    """
    if setting is False:
        return None
    if setting == "auto":
        return "default" if device.type == "cuda" else None
    return "default" if setting is True else str(setting)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training run draws from, for resumable checkpoints."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None leaves it)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


MIN_BAR_COLUMNS = 40  # narrower, a progress bar shows too little to be worth drawing


def is_tty() -> bool:
    """Whether stderr is a terminal a progress bar can draw on: not CI, and a size of at least
    ``MIN_BAR_COLUMNS`` columns and 2 rows (``script`` without a size, and some CI consoles,
    report 0 x 0, where tqdm draws nothing at all)."""
    if not os.isatty(2) or os.environ.get("CI", "").lower() in ("1", "true"):
        return False
    try:
        size = os.get_terminal_size(2)
    except OSError:
        return False
    return size.columns >= MIN_BAR_COLUMNS and size.lines >= 2
