"""The server's decoding: parity with Infinito.generate, batch independence, stop rules."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from infinito.config import ModelConfig
from infinito.model import Infinito, LayerCache
from infinito.quantize import inference_variant
from infinito.serve.batcher import Batcher, Event, Job, QueueFull
from infinito.serve.engine import Engine, Sampling, sample
from infinito.serve.textstream import TextStream

CFG = ModelConfig(
    vocab_size=97,
    d_model=32,
    n_layer=2,
    n_head=4,
    block_size=32,
    dropout=0.0,
    memory_slots=8,
    phi_chunk=8,
)

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [90, 3, 3, 3, 3]]
SETTINGS = [
    Sampling(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7),
    Sampling(max_tokens=12, temperature=0.0, seed=1),
    Sampling(max_tokens=12, temperature=1.4, seed=3),
    Sampling(max_tokens=12, temperature=0.7, top_p=0.5, seed=11),
]


def model(cfg: ModelConfig = CFG, seed: int = 0) -> Infinito:
    torch.manual_seed(seed)
    m = Infinito(cfg).eval()
    m.reset_memory(rows=4)  # stream memories: one per row written below
    with torch.no_grad():  # a populated memory, so the read at the middle layer is not a no-op
        for i in range(3):
            x = torch.randint(
                0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(i)
            )
            m.write_memory(m(x).candidates)
    assert m.memory is not None and bool(m.memory.valid.any())
    return m


def reference(m: Infinito, prompt: list[int], s: Sampling, n: int) -> list[int]:
    """What Infinito.generate gives for one row with the same seed."""
    out = m.generate(
        torch.tensor([prompt]),
        n,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        repetition_penalty=s.repetition_penalty,
        generator=torch.Generator().manual_seed(s.seed),
    )
    return out[0, len(prompt) :].tolist()


def alone(m: Infinito, prompt: list[int], s: Sampling, n: int) -> list[int]:
    """The tokens a sequence gets when the engine decodes it by itself."""
    engine = Engine(m, memory="checkpoint")
    seq = engine.start(prompt, s)
    for _ in range(n - 1):
        engine.step([seq])
    engine.close()
    return seq.ids[0, len(prompt) :].tolist()


def decode_together(engine: Engine, n: int) -> list[list[int]]:
    seqs = [engine.start(p, s) for p, s in zip(PROMPTS, SETTINGS, strict=True)]
    for _ in range(n - 1):
        engine.step(seqs)
    return [s.ids[0, len(p) :].tolist() for s, p in zip(seqs, PROMPTS, strict=True)]


GREEDY = [
    Sampling(max_tokens=12, temperature=0.0, repetition_penalty=r) for r in (1.0, 1.3, 2.0, 0.8)
]


@pytest.mark.parametrize(
    ("memory", "scope"), [("checkpoint", "shared"), ("reset", "shared"), ("checkpoint", "stream")]
)
def test_each_sequence_of_a_batch_matches_generate(memory: str, scope: str) -> None:
    """Stream memories: every request reads memory row 0, as one-row generate does."""
    m = model(dataclasses.replace(CFG, memory_scope=scope))
    if memory == "reset":
        m.reset_memory()
    expected = [reference(m, p, s, 12) for p, s in zip(PROMPTS, GREEDY, strict=True)]
    engine = Engine(m, memory=memory)
    try:
        seqs = [engine.start(p, s) for p, s in zip(PROMPTS, GREEDY, strict=True)]
        for _ in range(11):
            engine.step(seqs)
        assert [s.ids[0, len(p) :].tolist() for s, p in zip(seqs, PROMPTS, strict=True)] == expected
        # and the logits of a ragged batch step are generate's, up to float rounding
        logits = engine._forward(seqs)
        for b, seq in enumerate(seqs):
            ids = seq.ids
            caches = [LayerCache(CFG.block_size) for _ in range(CFG.n_layer)]
            with torch.no_grad(), m.memory.frozen():  # type: ignore[union-attr]
                ref = m._decode(ids, 0, caches)
            torch.testing.assert_close(logits[b : b + 1], ref, rtol=1e-4, atol=1e-5)
    finally:
        engine.close()


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    g = torch.Generator().manual_seed(0)
    n = 6_000

    def freq(**kw: object) -> torch.Tensor:
        draws = torch.cat([sample(logits, generator=g, **kw) for _ in range(n)])  # type: ignore[arg-type]
        return torch.bincount(draws, minlength=6).double() / n

    torch.testing.assert_close(
        freq(temperature=1.0, top_k=None, top_p=None),
        logits.softmax(-1)[0].double(),
        atol=0.03,
        rtol=0,
    )
    hot = freq(temperature=2.0, top_k=3, top_p=None)
    assert hot[3:].sum() == 0
    torch.testing.assert_close(hot[:3], (logits[0, :3] / 2).softmax(-1).double(), atol=0.03, rtol=0)
    nucleus = freq(temperature=1.0, top_k=None, top_p=0.6)  # keeps 2.0 and 1.0 (0.48 + 0.18)
    assert nucleus[2:].sum() == 0 and nucleus[0] > nucleus[1] > 0
    assert sample(logits, 0.0, None, None, g).tolist() == [0]


def test_the_checkpoint_memory_changes_the_logits() -> None:
    """Guards the test above: the populated memory is read, so the two modes differ."""
    m = model()
    idx = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        with_memory = m(idx).logits
        m.reset_memory()
        assert (m(idx).logits - with_memory).abs().max() > 1e-4


def test_a_sequence_alone_equals_the_same_sequence_in_a_batch() -> None:
    engine = Engine(model())
    together = decode_together(engine, 12)
    alone = engine.start(PROMPTS[0], SETTINGS[0])
    for _ in range(11):
        engine.step([alone])
    assert alone.ids[0, 3:].tolist() == together[0]
    engine.close()


def test_int8_rows_are_bit_identical_alone_and_in_a_batch() -> None:
    engine = Engine(inference_variant(model(), "int8"))
    seqs = [engine.start(p, s) for p, s in zip(PROMPTS, SETTINGS, strict=True)]
    alone = engine.start(PROMPTS[2], SETTINGS[2])
    batch_logits = engine._forward(seqs)
    alone_logits = engine._forward([alone])
    assert torch.equal(batch_logits[2], alone_logits[0])
    engine.close()


def test_a_sequence_stops_extending_at_the_context_limit() -> None:
    engine = Engine(model())
    seq = engine.start(list(range(CFG.block_size)), Sampling(max_tokens=5, temperature=0.0))
    assert seq.length == CFG.block_size + 1 and not engine.can_extend(seq)
    with pytest.raises(ValueError, match="no position left"):
        engine.step([seq])
    with pytest.raises(ValueError, match="1..32 fit"):
        engine.start(list(range(CFG.block_size + 1)), Sampling(max_tokens=1))
    engine.close()


# ---------------------------------------------------------------- text and stop sequences


def chars(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def feed(stream: TextStream, text: str) -> tuple[list[str], bool]:
    deltas, stopped = [], False
    for ch in text:
        delta, stopped = stream.add(ord(ch))
        deltas.append(delta)
        if stopped:
            break
    return deltas, stopped


def test_stop_sequence_is_cut_and_never_sent_even_across_tokens() -> None:
    stream = TextStream(chars, stop=["END", "\n\n"])
    deltas, stopped = feed(stream, "abc ENxEND tail")
    assert stopped and "".join(deltas) == "abc ENx" and stream.text == "abc ENx"
    assert deltas[4:6] == ["", ""]  # "E", "N" held back until "x" shows they start no stop
    assert deltas[6] == "ENx"


def test_text_held_back_for_a_partial_stop_is_released_at_the_end() -> None:
    stream = TextStream(chars, stop=["END"])
    deltas, stopped = feed(stream, "the EN")
    assert not stopped and "".join(deltas) == "the " and stream.flush() == "EN"


def test_an_unfinished_utf8_character_is_held_back() -> None:
    def decode(ids: list[int]) -> str:  # bytes as ids: the last byte may be half a character
        return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(decode)
    out = [stream.add(b)[0] for b in "é!".encode()]
    assert out == ["", "é", "!"]


# ---------------------------------------------------------------- the batcher


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.kind != "text":
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "text")


def job(prompt: list[int], s: Sampling, sink: Sink, stop: tuple[str, ...] = ()) -> Job:
    return Job(prompt, s, stop, eos_token_id=None, emit=sink)


def test_jobs_submitted_together_decode_together_with_their_own_settings() -> None:
    m = model()
    expected = [chars(alone(m, p, s, 12)) for p, s in zip(PROMPTS, SETTINGS, strict=True)]
    batcher = Batcher(Engine(m, memory="checkpoint"), chars, max_batch=4, max_queue=4)
    sinks = [Sink() for _ in PROMPTS]
    for p, s, sink in zip(PROMPTS, SETTINGS, sinks, strict=True):
        batcher.submit(job(p, s, sink))
    batcher.start()  # all four are waiting: the first round admits them together
    try:
        assert all(sink.done.wait(30) for sink in sinks)
        assert [s.text for s in sinks] == expected
        assert all(
            s.events[-1] == Event("done", finish_reason="length", completion_tokens=12)
            for s in sinks
        )
        load = batcher.load()
        assert load["decode_steps"] == 11 and load["mean_batch"] == 4.0
    finally:
        batcher.shutdown()


def test_a_full_queue_refuses_and_a_cancelled_job_frees_its_slot() -> None:
    batcher = Batcher(Engine(model()), chars, max_batch=1, max_queue=1)
    long = dataclasses.replace(SETTINGS[1], max_tokens=10_000)  # ends only at the context
    first, second = Sink(), Sink()
    batcher.submit(job([1], long, first))
    batcher.submit(job([2], long, second))
    with pytest.raises(QueueFull, match="--max-queue 1"):
        batcher.submit(job([3], long, Sink()))
    jobs = list(batcher._waiting)
    jobs[0].cancel()  # the client of the first request left before it started
    batcher.start()
    try:
        assert second.done.wait(30) and not first.events
        assert second.events[-1].finish_reason == "length"  # stopped by the 32-token context
        assert second.events[-1].completion_tokens == CFG.block_size
    finally:
        batcher.shutdown()


def test_a_stop_sequence_ends_a_job_with_finish_reason_stop() -> None:
    m = model()
    full = chars(alone(m, PROMPTS[1], SETTINGS[1], 12))
    stop = full[5:7]
    batcher = Batcher(Engine(m, memory="checkpoint"), chars, max_batch=2, max_queue=0)
    sink = Sink()
    batcher.submit(job(PROMPTS[1], SETTINGS[1], sink, stop=(stop,)))
    batcher.start()
    try:
        assert sink.done.wait(30)
        assert sink.text == full[: full.index(stop)]
        assert sink.events[-1].finish_reason == "stop"
    finally:
        batcher.shutdown()


def test_a_broken_decode_thread_fails_its_jobs_and_refuses_new_ones() -> None:
    batcher = Batcher(Engine(model()), chars, max_batch=2, max_queue=2)
    sink = Sink()
    batcher.submit(job([1, 2], SETTINGS[0], sink))

    def broken(*_: object) -> bool:
        raise RuntimeError("bug")

    batcher._round = broken  # type: ignore[method-assign]
    batcher.start()
    assert sink.done.wait(10) and sink.events[-1].kind == "error"
    assert "decode thread stopped" in sink.events[-1].text and not batcher.healthy
    with pytest.raises(QueueFull, match="decode thread stopped"):
        batcher.submit(job([1], SETTINGS[0], Sink()))
    batcher.shutdown()
