"""Load test for ``infinito serve``: N concurrent streaming clients for M seconds, on loopback.

    python -m infinito.serve.loadtest --model models/best --clients 1 8 --seconds 20
    python -m infinito.serve.loadtest --url http://127.0.0.1:8000 --clients 8 --seconds 20

With ``--model`` it starts ``infinito serve`` on a free loopback port in a subprocess (so the
clients and the server do not share an interpreter) and stops it afterwards; with ``--url`` it
loads a server that is already running, which must be on a loopback address. Each client sends
streaming completions one after another until the time is up (or ``--max-requests`` each). Per
phase (one per client count) it reports requests/s, time to first token p50/p95, tokens/s per
client and in total, and errors (503s counted apart); with 1 and 8 clients, the batching gain:
total tokens/s with 8 clients over total tokens/s with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np


@dataclass
class ClientStats:
    requests: int = 0
    tokens: int = 0
    busy_s: float = 0.0  # time spent in requests
    ttft_s: list[float] = field(default_factory=list)
    errors: int = 0
    refused: int = 0  # 503: the queue was full


async def _one_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], s: ClientStats
) -> None:
    start = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code == 503:
                s.refused += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                return
            if r.status_code != 200:
                s.errors += 1
                return
            usage = None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    s.errors += 1
                    return
                if first is None and any(c.get("text") for c in chunk["choices"]):
                    first = time.perf_counter()
                usage = chunk.get("usage") or usage
            if usage is None:
                s.errors += 1
                return
            s.requests += 1
            s.tokens += usage["completion_tokens"]
            if first is not None:
                s.ttft_s.append(first - start)
    except httpx.HTTPError:
        s.errors += 1
    finally:
        s.busy_s += time.perf_counter() - start


async def _client(
    url: str, body: dict[str, Any], deadline: float, max_requests: int
) -> ClientStats:
    s = ClientStats()
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
        while time.perf_counter() < deadline and s.requests + s.errors + s.refused < max_requests:
            await _one_request(client, url, body, s)
    return s


def run_phase(
    url: str, clients: int, seconds: float, body: dict[str, Any], max_requests: int = 10_000
) -> dict[str, float]:
    """``clients`` concurrent streaming clients for ``seconds``; the phase's figures."""

    async def main() -> tuple[list[ClientStats], float]:
        start = time.perf_counter()
        stats = await asyncio.gather(
            *(_client(url, body, start + seconds, max_requests) for _ in range(clients))
        )
        return list(stats), time.perf_counter() - start

    stats, wall = asyncio.run(main())
    ttft = [t for s in stats for t in s.ttft_s]
    requests = sum(s.requests for s in stats)
    tokens = sum(s.tokens for s in stats)
    return {
        "clients": clients,
        "seconds": wall,
        "requests": requests,
        "requests_per_sec": requests / wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1e3 if ttft else float("nan"),
        "ttft_p95_ms": float(np.percentile(ttft, 95)) * 1e3 if ttft else float("nan"),
        "tokens_per_sec_total": tokens / wall,
        "tokens_per_sec_per_client": statistics.mean(
            s.tokens / s.busy_s if s.busy_s else 0.0 for s in stats
        ),
        "errors": sum(s.errors for s in stats),
        "refused_503": sum(s.refused for s in stats),
    }


def run_load(
    url: str, client_counts: list[int], seconds: float, body: dict[str, Any], max_requests: int
) -> dict[str, Any]:
    """One phase per client count (after a short warm-up), plus the batching gain 8 over 1."""
    check_loopback(url)
    run_phase(url, 1, min(2.0, seconds), body, max_requests=2)  # warm-up, not reported
    phases = {n: run_phase(url, n, seconds, body, max_requests) for n in client_counts}
    out: dict[str, Any] = {"request": body, "phases": list(phases.values())}
    if 1 in phases and 8 in phases:
        out["batching_gain_8_over_1"] = (
            phases[8]["tokens_per_sec_total"] / phases[1]["tokens_per_sec_total"]
        )
    return out


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"loadtest: {url} is not a loopback address; load only your own machine")


def start_server(
    model: Path, extra: list[str], timeout: float = 180
) -> tuple[subprocess.Popen[bytes], str]:
    """``infinito serve`` on a free loopback port in a subprocess; returns it and its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "infinito.serve.server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loadtest: the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("loadtest: the server did not come up")


def format_table(result: dict[str, Any]) -> str:
    cols = [
        "clients",
        "requests",
        "requests_per_sec",
        "ttft_p50_ms",
        "ttft_p95_ms",
        "tokens_per_sec_per_client",
        "tokens_per_sec_total",
        "errors",
        "refused_503",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for p in result["phases"]:
        cells = [f"{p[c]:.1f}" if isinstance(p[c], float) else str(p[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    if "batching_gain_8_over_1" in result:
        lines.append(
            f"\nbatching gain (total tokens/s, 8 clients over 1): "
            f"{result['batching_gain_8_over_1']:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m infinito.serve.loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="start infinito serve on this checkpoint")
    where.add_argument("--url", help="a running server on a loopback address")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="one phase per count")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--max-requests", type=int, default=1000, help="per client per phase")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default="The history of")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    p.add_argument("server_args", nargs="*", help="after --: options for infinito serve")
    args = p.parse_args(argv)
    body = {
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    proc = None
    if args.model is not None:
        proc, url = start_server(args.model, args.server_args)
    else:
        url = args.url.rstrip("/")
    try:
        result = run_load(url, args.clients, args.seconds, body, args.max_requests)
        result["server"] = httpx.get(f"{url}/health", timeout=5).json()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(format_table(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
