"""Helpers for the server's tests: a tiny checkpoint that speaks GPT-2 BPE and a live server.

``live_server(app)`` runs uvicorn in a thread on a socket bound to 127.0.0.1 port 0 (a free
port the kernel picks, so parallel runs never collide) and stops it on exit.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn

from infinito.config import ModelConfig
from infinito.model import Infinito

# GPT-2's vocabulary (the server's tokenizer), everything else tiny: 3.3M parameters.
TEXT_TINY = ModelConfig(
    vocab_size=50257,
    d_model=32,
    n_layer=2,
    n_head=2,
    block_size=128,
    dropout=0.0,
    memory_slots=8,
    phi_chunk=8,
)


def save_text_checkpoint(path: Path, cfg: ModelConfig = TEXT_TINY, seed: int = 0) -> Path:
    """A seeded random-init checkpoint at ``path`` (as ``Infinito.save`` writes it)."""
    torch.manual_seed(seed)
    Infinito(cfg).save(path)
    return path


@contextlib.contextmanager
def live_server(app: object, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
