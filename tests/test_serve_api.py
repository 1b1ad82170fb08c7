"""The HTTP API on a live loopback server: OpenAI's client, streaming, errors, limits, auth."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import command_env
from serve_helpers import TEXT_TINY, live_server, save_text_checkpoint

from infinito.serve.app import create_app
from infinito.serve.server import ServeConfig, exposure_warning, load_service, main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_text_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[str]:
    cfg = ServeConfig(checkpoint, max_batch=4, max_queue=4, max_tokens_cap=100)
    with live_server(create_app(load_service(cfg))) as url:
        yield url


@pytest.fixture(scope="module")
def int8_server(checkpoint: Path) -> Iterator[str]:
    """int8 rows are quantized and multiplied one by one: a row's logits are bit-for-bit the same
    in any batch, so a token can not flip with the batch around it (fp32 rows can move by BLAS
    rounding when the batch changes, docs/serve.md)."""
    cfg = ServeConfig(checkpoint, max_batch=4, max_queue=4, max_tokens_cap=100, dtype="int8")
    with live_server(create_app(load_service(cfg))) as url:
        yield url


def complete(url: str, timeout: float = 60, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def sse(response: httpx.Response) -> list[Any]:
    """The data fields of a Server-Sent Events body, JSON-decoded ([DONE] kept as a string)."""
    events = [block for block in response.text.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def test_health_and_models(server: str) -> None:
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == "infinito"
    assert health["context"] == TEXT_TINY.block_size and health["memory"] == "reset"
    models = httpx.get(f"{server}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["infinito"]


def test_openai_client_completion_and_stream(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(
        model="infinito", prompt="The history of", max_tokens=12, temperature=0.8, seed=5
    )
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 12
    assert done.usage.prompt_tokens == 3 and done.choices[0].text
    chunks = list(
        client.completions.create(
            model="infinito",
            prompt="The history of",
            max_tokens=12,
            temperature=0.8,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == done.choices[0].text  # same seed, same tokens, streamed or not
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    extra = client.completions.create(
        model="infinito",
        prompt="Hello",
        max_tokens=4,
        extra_body={"top_k": 5, "repetition_penalty": 1.2},
    )
    assert extra.usage is not None and extra.usage.completion_tokens == 4


def test_stream_is_openai_sse(server: str) -> None:
    r = complete(server, prompt="Once upon a time", max_tokens=5, seed=1, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_a_seeded_request_is_the_same_alone_and_in_a_concurrent_batch(int8_server: str) -> None:
    server = int8_server
    request = dict(
        prompt="The meaning of life", max_tokens=60, temperature=0.9, top_p=0.9, seed=1234
    )
    alone = complete(server, **request).json()["choices"][0]["text"]
    others = [
        dict(prompt="In 1990", max_tokens=60, temperature=1.2, seed=1),
        dict(prompt="Water boils at", max_tokens=60, temperature=0.0),
        dict(prompt="A B C", max_tokens=60, top_k=3, repetition_penalty=1.5, seed=2),
    ]
    before = httpx.get(f"{server}/health").json()
    results: dict[int, str] = {}
    barrier = threading.Barrier(4)

    def send(i: int, body: dict[str, Any]) -> None:
        barrier.wait()
        results[i] = complete(server, **body).json()["choices"][0]["text"]

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate([request, *others])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = httpx.get(f"{server}/health").json()
    rows = after["decode_rows"] - before["decode_rows"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert rows / steps > 1.5, "the four requests did not decode together"
    assert results[0] == alone
    assert len(set(results.values())) == 4


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "word " * 200}, "prompt", "context is 128 tokens"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "a", "max_tokens": 101}, "max_tokens", "cap of 100"),
        ({"prompt": "a", "temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "a", "top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"prompt": "a", "top_k": -1}, "top_k", "greater than or equal to 0"),
        ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "a", "n": 2}, "n", "less than or equal to 1"),
        ({"prompt": "a", "logprobs": 3}, "logprobs", "unknown field"),
        ({"max_tokens": 3}, "prompt", "Field required"),
        ({"prompt": "a", "seed": -1}, "seed", "greater than or equal to 0"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    server: str, body: dict[str, Any], param: str, fragment: str
) -> None:
    r = complete(server, timeout=10, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and fragment in error["message"]
    assert error["type"] == "invalid_request_error"


def test_non_finite_numbers_are_rejected(server: str) -> None:
    r = httpx.post(
        f"{server}/v1/completions",
        content=b'{"prompt": "a", "temperature": NaN}',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_malformed_json_unknown_model_and_huge_body(server: str) -> None:
    r = httpx.post(
        f"{server}/v1/completions",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = complete(server, timeout=10, prompt="a", model="gpt-4")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(f"{server}/v1/completions", content=b"x" * (2 << 20), timeout=10)
    assert r.status_code == 413


def test_a_stop_sequence_ends_the_text_before_it(server: str) -> None:
    full = complete(server, prompt="The", max_tokens=20, temperature=0.0).json()
    text = full["choices"][0]["text"]
    stop = text[6:9]
    cut = complete(server, prompt="The", max_tokens=20, temperature=0.0, stop=stop).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------- bounds and disconnects


def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def small_server(checkpoint: Path) -> Iterator[str]:
    """One decoding slot and one waiting place; each decode step takes at least 20 ms, so a
    128-token request holds its slot for seconds."""
    service = load_service(ServeConfig(checkpoint, max_batch=1, max_queue=1))
    engine = service.batcher.engine
    step = engine.step

    def slow_step(seqs: Any) -> None:
        time.sleep(0.02)
        step(seqs)

    engine.step = slow_step  # type: ignore[method-assign]
    with live_server(create_app(service)) as url:
        yield url


def test_full_queue_is_503_with_retry_after_and_a_disconnect_frees_the_slot(
    small_server: str,
) -> None:
    long = dict(prompt="Hi", max_tokens=128, temperature=0.0, stream=True)
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        with a.stream("POST", f"{small_server}/v1/completions", json=long) as first:
            lines = first.iter_lines()  # kept: dropping it would close the stream
            next(lines)  # decoding: holds the only slot
            with b.stream("POST", f"{small_server}/v1/completions", json=long):
                assert wait_for(lambda: httpx.get(f"{small_server}/health").json()["waiting"] == 1)
                refused = complete(small_server, timeout=10, prompt="Hi", max_tokens=2)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert "server busy" in refused.json()["error"]["message"]
            # the second client left while waiting; the first leaves mid-stream now
        health = lambda: httpx.get(f"{small_server}/health").json()  # noqa: E731
        assert wait_for(lambda: health()["running"] == 0 and health()["waiting"] == 0)
        steps = health()["decode_steps"]
        assert steps < 127, "the first stream ran to the end although its client left"
        time.sleep(0.3)
        assert health()["decode_steps"] == steps  # nothing decodes for clients that left
    ok = complete(small_server, prompt="Hi", max_tokens=2)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_an_api_key_is_required_when_set(checkpoint: Path) -> None:
    cfg = ServeConfig(checkpoint, api_key="s3cret")
    with live_server(create_app(load_service(cfg))) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        denied = httpx.get(f"{url}/v1/models")
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(
            f"{url}/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="infinito", prompt="a", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()


# ---------------------------------------------------------------- the command


def test_exposure_warning_only_off_loopback_without_a_key() -> None:
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None and exposure_warning("localhost", None) is None
    assert "no authentication" in (exposure_warning("0.0.0.0", None) or "")
    assert exposure_warning("0.0.0.0", "key") is None


def test_serve_on_all_interfaces_warns_before_starting(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    started: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(kw))  # binds nothing
    monkeypatch.delenv("INFINITO_API_KEY", raising=False)
    assert main(["--model", str(checkpoint), "--host", "0.0.0.0", "--port", "9"]) == 0
    assert "no authentication" in capsys.readouterr().err
    assert started["host"] == "0.0.0.0" and started["port"] == 9


def test_serve_rejects_a_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_infinito_serve_command_answers_on_loopback(checkpoint: Path) -> None:
    import socket

    with socket.socket() as s:  # a free port (released for the server to take)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infinito.cli",
            "serve",
            "--model",
            str(checkpoint),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        assert wait_for(up, timeout=60) and proc.poll() is None, proc.stdout and proc.stdout.read()
        r = complete(url, prompt="Hello", max_tokens=3)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(20)
