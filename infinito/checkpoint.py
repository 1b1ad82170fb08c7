"""Resumable training state: save atomically, load safely, fingerprint what must not change.

A state is a nested dict of tensors, lists, dicts and plain Python scalars only, so it loads with
``torch.load(weights_only=True)`` (no pickled objects). Writes go to a temporary name in the
same directory and ``os.replace`` onto the final one, so a crash (even ``kill -9``) leaves the
previous state whole. ``AsyncSaver`` writes in a background thread from a CPU copy taken at a
step boundary, so saving a state does not stall training.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infinito.atomic import atomic_open
from infinito.config import ConfigError
from infinito.runtime import rng_state, set_rng_state


def to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor cloned to CPU (detached from training)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def portable_rng_state() -> dict[str, Any]:
    """``runtime.rng_state()`` with the numpy and Python states as tensors and lists."""
    state = rng_state()
    name, keys, pos, has_gauss, gauss = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {
        "torch": state["torch"],
        **({"cuda": list(state["cuda"])} if "cuda" in state else {}),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``portable_rng_state``."""
    np_state = state["numpy"]
    py_state = state["python"]
    set_rng_state(
        {
            "torch": state["torch"],
            **({"cuda": state["cuda"]} if "cuda" in state else {}),
            "numpy": (
                np_state["name"],
                np_state["keys"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["gauss"],
            ),
            "python": (py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]),
        }
    )


def save_state(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_state(path: Path) -> dict[str, Any]:
    """Load a state saved by ``save_state`` (weights_only: tensors and plain types only).

    A damaged or foreign file is refused with what to do about it. torch's own message is not
    passed on: it suggests ``weights_only=False``, which would run whatever code the file holds.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: say what to do with it
        text = str(e)
        pickled = isinstance(e, pickle.UnpicklingError) and (
            "not an allowed global" in text or "Unsupported global" in text
        )
        what = (
            "it holds pickled objects other than tensors and plain values, which are not "
            "loaded because loading them could run code"
            if pickled
            else f"it is damaged or not a training state ({type(e).__name__})"
        )
        raise ConfigError(
            f"cannot read the training state {path}: {what}; delete {path.parent} to start "
            f"training from scratch"
        ) from None


class AsyncSaver:
    """Save states in a background thread, one at a time; errors surface on the next call."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], path: Path) -> None:
        """Start saving ``state`` (already on CPU and detached) once the previous save is done."""
        self.wait()

        def run() -> None:
            try:
                save_state(state, path)
            except BaseException as e:  # re-raised in the training thread by wait()
                self._error = e

        # A daemon: a run that is aborted (a second Ctrl-C) exits without waiting for it; every
        # other way out waits (``Trainer.close``), so no save is cut short otherwise.
        self._thread = threading.Thread(target=run, name="infinito-state-saver", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending save (if any) is on disk; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def fingerprint(obj: Any) -> str:
    """A stable short hash of a JSON-serialisable object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks (a WikiText-103 split is hundreds of MB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]
