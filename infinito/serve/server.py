"""``infinito serve``: load a checkpoint and serve it over HTTP with uvicorn.

    infinito serve --model models/best                      # http://127.0.0.1:8000
    infinito serve --model models/best --dtype int8          # fast CPU decoding
    INFINITO_API_KEY=... infinito serve --host 0.0.0.0       # reachable by others, with a key

See docs/serve.md for the API, batching, memory semantics and measurements.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinito.config import ConfigError
from infinito.quantize import VARIANTS, check_variant, inference_variant
from infinito.serve.app import ServeLimits, Service, create_app
from infinito.serve.batcher import Batcher
from infinito.serve.engine import MEMORY_MODES, Engine
from infinito.serve.textstream import Decode

API_KEY_ENV = "INFINITO_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """How to serve: the checkpoint, numerics and the admission bounds."""

    model_dir: Path
    model_id: str = "infinito"
    dtype: str = "fp32"  # fp32 | bf16 | int8 (see infinito/quantize.py)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 32  # requests waiting for a slot; more get 503
    max_tokens_cap: int | None = None  # largest max_tokens accepted; None: the model's context
    memory: str = "reset"  # reset | checkpoint (see infinito/serve/engine.py)
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch={self.max_batch} must be >= 1")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue={self.max_queue} must be >= 0")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ConfigError(f"--max-tokens-cap={self.max_tokens_cap} must be >= 1")
        if self.memory not in MEMORY_MODES:
            raise ConfigError(f"--memory={self.memory!r} is not one of {', '.join(MEMORY_MODES)}")


def load_service(cfg: ServeConfig) -> Service:
    """Load the checkpoint in ``cfg.dtype`` and build the engine, batcher and tokenizer."""
    from infinito.data.tokenize import load_tokenizer
    from infinito.model import Infinito
    from infinito.runtime import resolve_device

    if not (cfg.model_dir / "config.json").is_file():
        raise ConfigError(
            f"{cfg.model_dir} is not a checkpoint (no config.json); train first (dvc repro "
            f"train) or pass --model pointing at a directory written by Infinito.save"
        )
    device = resolve_device(cfg.device)
    check_variant(cfg.dtype, device, key="--dtype")
    tokenizer = load_tokenizer()
    model = Infinito.from_checkpoint(cfg.model_dir, map_location=str(device)).to(device)
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"the checkpoint in {cfg.model_dir} has model.vocab_size={model.config.vocab_size} "
            f"but the GPT-2 tokenizer has {len(tokenizer)} tokens; it cannot serve text"
        )
    model = inference_variant(model, cfg.dtype)
    block = model.config.block_size
    engine = Engine(model, memory=cfg.memory)
    batcher = Batcher(engine, _decoder(tokenizer), cfg.max_batch, cfg.max_queue)
    limits = ServeLimits(max_tokens_cap=cfg.max_tokens_cap or block, block_size=block)
    info = {"dtype": cfg.dtype, "device": str(device), "memory": cfg.memory, "context": block}
    return Service(batcher, tokenizer, cfg.model_id, limits, cfg.api_key, info)


def _decoder(tokenizer: Any) -> Decode:
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    return decode


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server is reachable from other machines without a key."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        loopback = False
    if loopback:
        return None
    return (
        f"WARNING: serving on {host} with no authentication: anyone who can reach this port "
        f"can use the model. Pass --api-key or set {API_KEY_ENV} to require a bearer token."
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinito serve",
        description="Serve a checkpoint: OpenAI-compatible /v1/completions, a playground at /.",
    )
    p.add_argument("--model", type=Path, default=Path("models/best"), help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=VARIANTS, default="fp32", help="inference numerics")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=32, help="waiting requests before 503")
    p.add_argument("--max-tokens-cap", type=int, help="largest max_tokens (default: context)")
    p.add_argument("--memory", choices=MEMORY_MODES, default="reset", help="IIT memory per request")
    p.add_argument("--model-name", default="infinito", help="the model id in the API")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = ServeConfig(
            model_dir=args.model,
            model_id=args.model_name,
            dtype=args.dtype,
            device=args.device,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_tokens_cap=args.max_tokens_cap,
            memory=args.memory,
            api_key=api_key,
        )
        service = load_service(cfg)
    except ConfigError as e:
        print(f"infinito serve: {e}", file=sys.stderr)
        return 2
    warning = exposure_warning(args.host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    uvicorn.run(
        create_app(service),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,  # open streams get this long to finish on Ctrl-C
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
