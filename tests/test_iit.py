"""The IIT parts: PHI components, phi weights, noise, the Delta-Phi loss and the memory."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_model import TINY as TINY_MODEL
from tiny_model import build, populate, tokens

from infinito.iit import (
    IITGuidedMemory,
    ImprovedIITMetrics,
    LearnablePhiWeights,
    MemoryCandidates,
)

TINY = replace(TINY_MODEL, dropout=0.0)  # noise is then the only randomness
METRICS = ImprovedIITMetrics()


def as_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Write statistics are 0-dim tensors (no host sync in training); read them here."""
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values()), stats
    return {k: float(v) for k, v in stats.items()}


def write(mem: IITGuidedMemory, cand: MemoryCandidates) -> dict[str, float]:
    return as_floats(mem.write(cand, priority_weight=0.8))


def components(states: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """Components of one chunk of states (C, D); uniform attention unless q is given."""
    C, D = states.shape
    q = torch.zeros(1, 1, C, D) if q is None else q
    return METRICS(states[None], q, torch.eye(C, D)[None, None], C)[0, 0]


# ---------------------------------------------------------------- PHI components


def test_components_of_hand_made_chunks() -> None:
    C, D = 8, 16
    repeated = components(torch.ones(C, D))
    torch.testing.assert_close(repeated, torch.tensor([1.0, 1.0, 0.0, 1.0]), atol=1e-4, rtol=0)
    orthogonal = components(torch.eye(C, D))  # every state its own direction
    torch.testing.assert_close(orthogonal, torch.tensor([0.0, 0.0, 1.0, 1.0]), atol=1e-4, rtol=0)
    halves = torch.zeros(C, D)
    halves[: C // 2, 0], halves[C // 2 :, 1] = 1.0, 1.0  # two directions, one per half
    expected = torch.tensor([(C - 2) / (C - 1), 0.0, math.log(2) / math.log(C), 1.0])
    torch.testing.assert_close(components(halves), expected, atol=1e-4, rtol=0)


def test_attention_diversity_is_per_row_entropy() -> None:
    C, D = 8, 16
    states = torch.randn(C, D)
    # every query matches key 0 strongly (keys are the unit vectors e_i): one-hot rows
    sharp = torch.zeros(1, 1, C, D)
    sharp[..., 0] = 100.0
    assert components(states, sharp)[3] < 1e-3
    assert components(states)[3] > 0.999  # zero queries: uniform rows
    # rows that each attend to one key but to different keys still have zero entropy,
    # although their average map is spread out
    diagonal = 100.0 * torch.eye(C, D)[None, None]
    assert components(states, diagonal)[3] < 1e-3


def test_components_are_in_unit_interval_and_vary_with_the_input() -> None:
    model = build(TINY).eval()
    random_text = tokens(4, 32, seed=3)
    one_token = torch.full((4, 32), 7)
    with torch.no_grad():
        a = model(random_text).stats
        b = model(one_token).stats
    names = ["phi_temporal_coherence", "phi_integration", "phi_complexity"]
    for name in names:
        assert 0 <= a[name] <= 1 and 0 <= b[name] <= 1
        assert abs(a[name] - b[name]) > 0.05, name
    # per-chunk values also differ between chunks of ordinary input
    q, k = torch.randn(2, 4, 32, 8), torch.randn(2, 4, 32, 8)
    per_chunk = METRICS(torch.randn(2, 32, 32), 3 * q, 3 * k, 8)  # (2, 4, 4)
    assert per_chunk.shape == (2, 4, 4)
    assert ((per_chunk >= 0) & (per_chunk <= 1)).all()
    assert (per_chunk.reshape(-1, 4).std(0) > 1e-3).all()


def test_component_gradients_are_finite_on_degenerate_chunks() -> None:
    states = torch.ones(2, 16, 8)
    states[1, :8] = 0.0  # zero vectors and repeated directions: repeated zero eigenvalues
    states.requires_grad_(True)
    q = torch.zeros(2, 2, 16, 4, requires_grad=True)
    k = torch.zeros(2, 2, 16, 4, requires_grad=True)
    out = METRICS(states, q, k, 8)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for t in (states, q, k):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_phi_weights_start_at_the_seed_values() -> None:
    weights = LearnablePhiWeights()
    torch.testing.assert_close(weights.weights(), torch.tensor([0.3, 0.3, 0.2, 0.2]))
    c = torch.tensor([[1.0, 0.0, 0.5, 0.25]])
    torch.testing.assert_close(weights(c), torch.tensor([10 * (0.3 + 0.1 + 0.05)]))


def test_short_sequences_use_one_chunk_and_single_tokens_skip_phi() -> None:
    model = build(TINY).eval()
    out = model(tokens(2, 5))  # shorter than phi_chunk=8: the whole sequence is one chunk
    assert out.candidates is not None and out.candidates.phi.shape == (2,)
    out = model(tokens(2, 1))
    assert out.candidates is None and "phi_mean" not in out.stats
    assert out.aux_loss.item() == 0.0


# ---------------------------------------------------------------- Delta-Phi and gradients


def test_aux_loss_is_bounded_and_defined_by_delta_phi() -> None:
    model = build(TINY)
    out = model(tokens())
    assert -1 <= out.aux_loss.item() <= 1
    torch.testing.assert_close(out.aux_loss.detach(), -out.stats["delta_phi"] / 10)


def test_minimising_the_aux_loss_raises_phi() -> None:
    model = build(TINY)
    idx = tokens(4, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def mean_phi() -> float:
        model.eval()
        with torch.no_grad():
            value = model(idx).stats["phi_mean"].item()
        model.train()
        return value

    before = mean_phi()
    for _ in range(10):
        opt.zero_grad()
        model(idx).aux_loss.backward()
        opt.step()
    assert mean_phi() > before + 0.2


def test_threshold_learns_from_the_language_model_loss() -> None:
    model = build(TINY)
    populate(model)
    idx = tokens()
    out = model(idx, idx)
    assert out.loss is not None
    (grad,) = torch.autograd.grad(out.loss, [model.memory.threshold_raw])
    assert torch.isfinite(grad) and grad.abs() > 0


def test_phi_weights_learn_only_through_the_aux_loss() -> None:
    model = build(TINY)
    populate(model)
    idx = tokens()
    out = model(idx, idx)
    assert out.loss is not None
    logits = model.phi_weights.logits
    (from_ce,) = torch.autograd.grad(out.loss, [logits], retain_graph=True, allow_unused=True)
    assert from_ce is None
    (from_aux,) = torch.autograd.grad(out.loss + 0.1 * out.aux_loss, [logits], retain_graph=True)
    assert from_aux.abs().sum() > 0
    (out.loss + 0.0 * out.aux_loss).backward()  # the trainer with lambda_phi = 0
    assert logits.grad is None or torch.all(logits.grad == 0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- exploration noise


def test_noise_only_in_training() -> None:
    model = build(TINY)  # dropout 0: noise is the only randomness
    idx = tokens()
    model.train()
    assert not torch.equal(model(idx).logits, model(idx).logits)
    model.eval()
    assert torch.equal(model(idx).logits, model(idx).logits)
    quiet = build(replace(TINY, noise=False)).train()
    assert torch.equal(quiet(idx).logits, quiet(idx).logits)


# ---------------------------------------------------------------- memory


def memory(slots: int = 4, d: int = 8) -> IITGuidedMemory:
    torch.manual_seed(0)
    return IITGuidedMemory(replace(TINY, d_model=d, n_head=2, memory_slots=slots))


def candidates(phi: list[float], d: int = 8, mass: torch.Tensor | None = None) -> MemoryCandidates:
    n = len(phi)
    keys = torch.arange(n, dtype=torch.float32)[:, None].expand(n, d) + 1  # key i is all i+1
    return MemoryCandidates(keys, -keys, torch.tensor(phi), mass)


def test_empty_memory_reads_exactly_zero_without_nan() -> None:
    mem = memory()
    x = torch.randn(2, 5, 8, requires_grad=True)
    read, mass = mem(x)
    assert torch.equal(read, torch.zeros_like(read)) and torch.equal(mass, torch.zeros(4))
    read.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mem.parameters() if p.grad is not None)
    assert torch.isfinite(x.grad).all()


def test_writes_only_candidates_above_the_threshold() -> None:
    mem = memory()
    stats = write(mem, candidates([2.0, 4.0, 2.95, 3.05]))
    assert stats["writes"] == 2 and stats["evictions"] == 0 and stats["candidates"] == 4
    assert sorted(mem.phi[mem.valid].tolist()) == pytest.approx([3.05, 4.0])
    assert stats["memory_utilisation"] == 0.5
    assert stats["candidate_phi_mean"] == pytest.approx((2.0 + 4.0 + 2.95 + 3.05) / 4)
    assert stats["stored_phi_mean"] == pytest.approx((3.05 + 4.0) / 2)
    # keys and values travel with their PHI
    slot = int(torch.nonzero(mem.phi == 4.0)[0])
    assert torch.equal(mem.keys[slot], torch.full((8,), 2.0))
    assert torch.equal(mem.values[slot], torch.full((8,), -2.0))


def test_free_slots_fill_first_then_lowest_priority_is_evicted_oldest_first() -> None:
    mem = memory(slots=4)
    mem.write(candidates([5.0, 5.0, 5.0]), priority_weight=0.8)  # three slots, one free
    assert mem.valid.sum() == 3
    stats = write(mem, candidates([9.0]))
    assert stats["evictions"] == 0 and bool(mem.valid.all())
    assert mem.phi.tolist() == [5.0, 5.0, 5.0, 9.0]
    mem.age = torch.tensor([1, 4, 2, 0])  # slot 1 is the oldest PHI-5 slot
    stats = write(mem, candidates([6.0]))
    assert stats["evictions"] == 1
    assert mem.phi.tolist() == [5.0, 6.0, 5.0, 9.0]  # equal priorities: the oldest went
    assert mem.age.tolist() == [2, 0, 3, 1]
    # usage outweighs a small PHI difference: PHI 5 used fully beats an unused PHI 5.5
    mem.phi = torch.tensor([5.0, 5.5, 9.0, 9.0])
    mem.usage = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mem.age = torch.zeros(4, dtype=torch.long)
    mem.write(candidates([7.0]), priority_weight=0.8)
    assert mem.phi.tolist() == pytest.approx([5.0, 7.0, 9.0, 9.0])


def test_more_candidates_than_slots_keeps_the_highest_phi() -> None:
    mem = memory(slots=2)
    stats = write(mem, candidates([4.0, 8.0, 5.0, 7.0]))
    assert stats["writes"] == 2
    assert sorted(mem.phi.tolist()) == pytest.approx([7.0, 8.0])


def test_a_training_step_and_write_read_no_tensor_value_on_the_host() -> None:
    """Meta tensors have shapes but no values, so an int()/float()/.item() of a tensor or Python
    branching on one (each a CUDA host synchronisation) fails on them: forward, backward and
    the memory write must run there."""
    with torch.device("meta"):
        model = build(TINY).train()
        idx = torch.zeros(2, 32, dtype=torch.long)
    for _ in range(2):
        out = model(idx, idx)
        (out.loss + 0.1 * out.aux_loss).backward()
        stats = model.write_memory(out.candidates)
        assert {"writes", "evictions", "memory_utilisation"} <= set(stats)
        assert all(v.device.type == "meta" and v.dim() == 0 for v in stats.values())


def test_usage_and_age_statistics() -> None:
    mem = memory(slots=4)
    mem.write(candidates([5.0, 6.0]), priority_weight=0.8)
    assert mem.age[mem.valid].tolist() == [0, 0]
    mass = torch.tensor([0.2, 0.1, 0.0, 0.0])
    mem.write(candidates([1.0], mass=mass), priority_weight=0.8)  # below threshold: no write
    valid = mem.valid.nonzero().flatten().tolist()
    assert valid == [0, 1]
    assert mem.usage.tolist() == pytest.approx([0.1, 0.05, 0.0, 0.0])
    assert mem.age.tolist() == [1, 1, 0, 0]


def test_memory_write_is_visible_only_from_the_next_call() -> None:
    model = build(TINY).eval()
    idx = tokens()
    first = model(idx)
    stats = as_floats(model.write_memory(first.candidates))
    assert stats["writes"] > 0
    with model.memory_reads_disabled():
        unaffected = model(idx)
    assert unaffected.candidates.slot_mass is None
    torch.testing.assert_close(unaffected.logits, first.logits, rtol=0, atol=0)
    second = model(idx)
    assert not torch.allclose(second.logits, first.logits)
    model.reset_memory()
    assert not model.memory.valid.any() and model.memory_stats()["memory_utilisation"] == 0.0
    torch.testing.assert_close(model(idx).logits, first.logits, rtol=0, atol=0)


def test_a_write_between_forward_and_backward_keeps_the_graph_valid() -> None:
    model = build(TINY).train()
    populate(model)
    idx = tokens()
    out = model(idx, idx)
    model.write_memory(out.candidates)  # overwrites, in place, the buffers the graph read
    (out.loss + 0.1 * out.aux_loss).backward()
    assert model.memory.threshold_raw.grad is not None


def test_writes_and_reset_keep_the_buffers_storage() -> None:
    """Graph-safe for CUDA graphs: a captured forward pass reads the buffers at fixed addresses,
    so writes and resets must change their contents, never replace them."""
    model = build(TINY).train()
    memory = model.memory
    assert memory is not None
    names = ("keys", "values", "phi", "usage", "age", "valid")
    before = {n: getattr(memory, n).data_ptr() for n in names}
    populate(model)
    out = model(tokens(), tokens())
    model.write_memory(out.candidates)
    assert bool(memory.valid.any())
    assert {n: getattr(memory, n).data_ptr() for n in names} == before
    model.reset_memory()
    assert not bool(memory.valid.any()) and float(memory.keys.abs().sum()) == 0.0
    assert {n: getattr(memory, n).data_ptr() for n in names} == before


def test_memory_state_is_saved_with_the_weights() -> None:
    model = build(TINY)
    populate(model)
    state = model.state_dict()
    for name in ("keys", "values", "phi", "usage", "age", "valid"):
        assert f"memory.{name}" in state
    assert model.memory_stats()["memory_utilisation"] > 0
    assert set(model.iit_stats()) == {
        "phi_weight_temporal_coherence",
        "phi_weight_integration",
        "phi_weight_complexity",
        "phi_weight_attention_diversity",
        "threshold",
    }


def test_candidates_from_several_processes_join() -> None:
    a = candidates([4.0, 5.0], mass=torch.tensor([0.2, 0.0, 0.0, 0.0]))
    b = candidates([6.0], mass=torch.tensor([0.0, 0.4, 0.0, 0.0]))
    joined = MemoryCandidates.cat([a, b])
    assert joined.phi.tolist() == [4.0, 5.0, 6.0] and joined.keys.shape == (3, 8)
    torch.testing.assert_close(joined.slot_mass, torch.tensor([0.1, 0.2, 0.0, 0.0]))


# ---------------------------------------------------------------- real text


def test_memory_is_written_on_real_text_at_initialisation(wikitext_valid: Path) -> None:
    """Real text fills the memory at once, and a threshold inside the candidates' PHI range
    separates written from rejected chunks."""
    from infinito.data.tokenize import load_tokenizer

    lines = [line for line in wikitext_valid.read_text().splitlines() if line.strip()][:200]
    ids = load_tokenizer()("\n".join(lines))["input_ids"]
    cfg = replace(TINY, vocab_size=50257, block_size=64, phi_chunk=16, memory_slots=32)
    model = build(cfg).eval()
    windows = torch.tensor(ids[: 16 * 64]).view(16, 64)
    phis = []
    with torch.no_grad():
        for batch in windows.split(4):
            out = model(batch)
            stats = as_floats(model.write_memory(out.candidates))
            assert stats["writes"] > 0
            phis.append(out.candidates.phi)
    assert model.memory_stats()["memory_utilisation"] == 1.0
    phi = torch.cat(phis)
    assert phi.std() > 0.01  # chunks of real text differ in PHI
    # a learned threshold at the median: some chunks are written, some are not
    median = phi.median()
    with torch.no_grad():
        model.memory.threshold_raw.fill_(torch.log(torch.expm1(median)).item())
    out = model(windows[:4])
    stats = as_floats(model.write_memory(out.candidates))
    assert 0 < stats["writes"] < stats["candidates"]
