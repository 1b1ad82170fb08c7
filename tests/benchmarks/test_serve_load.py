"""Load test of the server, bounded: 1 then 8 streaming clients for two seconds each, loopback.

The figures for docs/serve.md come from ``python -m infinito.serve.loadtest`` (longer phases, the
server in its own process). Here the clients share the server's interpreter, so throughput says
little; the test checks that the load generator works, that every request below the queue bound
is answered without errors, and that concurrent clients were decoded in batches.
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
from serve_helpers import live_server, save_text_checkpoint

from infinito.serve.app import create_app
from infinito.serve.loadtest import check_loopback, format_table, run_load, run_phase
from infinito.serve.server import ServeConfig, load_service

BODY = {
    "prompt": "The history of",
    "max_tokens": 32,
    "temperature": 0.8,
    "stream": True,
    "stream_options": {"include_usage": True},
}


@pytest.mark.timeout(120)
def test_eight_clients_below_the_queue_bound_get_no_errors(tmp_path: Path) -> None:
    cfg = ServeConfig(save_text_checkpoint(tmp_path / "ckpt"), max_batch=8, max_queue=8)
    with live_server(create_app(load_service(cfg))) as url:
        result = run_load(url, [1, 8], seconds=2.0, body=BODY, max_requests=200)
        before = httpx.get(f"{url}/health").json()
        run_phase(url, 8, seconds=1.0, body=BODY)
        after = httpx.get(f"{url}/health").json()
    one, eight = result["phases"]
    assert (one["clients"], eight["clients"]) == (1, 8)
    for phase in (one, eight):
        assert phase["requests"] > 0 and phase["errors"] == 0 and phase["refused_503"] == 0
        assert phase["ttft_p50_ms"] <= phase["ttft_p95_ms"] and math.isfinite(phase["ttft_p95_ms"])
        assert phase["tokens_per_sec_total"] > 0
    assert result["batching_gain_8_over_1"] > 0
    rows = after["decode_rows"] - before["decode_rows"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert rows / steps > 2, "eight concurrent clients were not decoded together"
    assert "batching gain" in format_table(result)


def test_the_load_generator_refuses_addresses_off_this_machine() -> None:
    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:8000")
    with pytest.raises(SystemExit, match="not a loopback address"):
        check_loopback("http://10.0.0.5:8000")
