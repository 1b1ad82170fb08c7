"""Sampling behaviour of ``Infinito.generate``, checked through its public API.

Two kinds of model: a tiny random INFINITO (for cache equivalence and EOS handling), and the same
model with fixed output logits, made by zeroing the final LayerNorm's gain and setting its bias
to the first unit vector: ``ln_f`` then outputs e_0 whatever the input, so the logits are
``lm_head.weight[:, 0]`` at every step. With known logits, the support of top-k/top-p and the
effect of the repetition penalty can be checked exactly.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from infinito.config import ModelConfig
from infinito.model import Infinito

V = 32
CFG = ModelConfig(
    vocab_size=V, d_model=32, n_layer=2, n_head=2, block_size=24, dropout=0.0,
    memory_slots=8, phi_chunk=4,
)  # fmt: skip


def tiny(iit: bool = True, seed: int = 0) -> Infinito:
    torch.manual_seed(seed)
    model = Infinito(CFG if iit else ModelConfig(**{**CFG.to_dict(), "iit": False})).eval()
    if iit:  # fill some memory slots, so generation really reads the memory
        with torch.no_grad():
            for _ in range(3):
                out = model(torch.randint(0, V, (2, 16)))
                model.write_memory(out.candidates)
        assert model.memory_stats()["memory_utilisation"] > 0
    return model


def fixed_logits(logits: list[float], seed: int = 0) -> Infinito:
    """A model whose next-token logits are ``logits`` (padded with -30) at every step."""
    model = tiny(iit=True, seed=seed)
    full = torch.full((V,), -30.0)
    full[: len(logits)] = torch.tensor(logits)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = full
    return model


def draws(model: Infinito, n: int = 4000, prompt_token: int = V - 1, **kw: object) -> Counter[int]:
    """One new token for each of n identical one-token prompts; counts per token."""
    idx = torch.full((n, 1), prompt_token, dtype=torch.long)
    gen = torch.Generator().manual_seed(1234)
    out = model.generate(idx, 1, generator=gen, **kw)  # type: ignore[arg-type]
    return Counter(out[:, -1].tolist())


# ---------------------------------------------------------------- greedy and the KV cache


@pytest.mark.parametrize("iit", [True, False], ids=["iit", "ablation"])
def test_greedy_is_deterministic_and_cache_matches_full_recompute(iit: bool) -> None:
    model = tiny(iit)
    idx = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(7))
    cached = model.generate(idx, 12, temperature=0.0, use_cache=True)
    again = model.generate(idx, 12, temperature=0.0, use_cache=True)
    uncached = model.generate(idx, 12, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 17)
    assert torch.equal(cached, again)
    assert torch.equal(cached, uncached)
    # ...and both equal argmax decoding through the training forward pass.
    ref = idx
    for _ in range(12):
        ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ref)


def test_cache_matches_past_the_context_window() -> None:
    """Beyond block_size both paths crop to the last block_size tokens and still agree."""
    model = tiny()
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    cached = model.generate(idx, 10, temperature=0.0, use_cache=True)  # 30 > block_size 24
    assert torch.equal(cached, model.generate(idx, 10, temperature=0.0, use_cache=False))


def test_sampling_is_reproducible_with_a_seeded_generator() -> None:
    model = tiny()
    idx = torch.randint(0, V, (4, 3), generator=torch.Generator().manual_seed(5))

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(idx, 8, temperature=1.0, top_k=10, generator=gen)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_generation_reads_but_does_not_write_the_memory() -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.generate(torch.randint(0, V, (2, 8)), 6, temperature=0.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- end of text


def test_eos_stops_generation_when_every_row_has_ended() -> None:
    model = fixed_logits([0.0, 0.0, 0.0, 5.0])  # greedy always picks token 3
    out = model.generate(torch.zeros(2, 4, dtype=torch.long), 10, temperature=0.0, eos_token_id=3)
    assert out.shape == (2, 5)  # one step, not ten
    assert out[:, -1].tolist() == [3, 3]
    full = model.generate(torch.zeros(2, 4, dtype=torch.long), 10, temperature=0.0)
    assert full.shape == (2, 14)  # without an EOS id, all ten tokens


def test_finished_row_is_padded_while_the_other_continues() -> None:
    model = tiny()
    idx = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(11))
    free = model.generate(idx, 10, temperature=0.0)
    row0, row1 = free[0, 4:].tolist(), free[1, 4:].tolist()
    # An EOS id that row 0 emits (not first) and row 1 never does.
    eos = next(t for t in row0[1:] if t not in row1)
    stop = row0.index(eos)
    out = model.generate(idx, 10, temperature=0.0, eos_token_id=eos)
    assert out.shape == free.shape  # row 1 keeps going to the full length
    assert out[0, 4 : 4 + stop + 1].tolist() == row0[: stop + 1]
    assert set(out[0, 4 + stop :].tolist()) == {eos}  # padded after its EOS
    assert out[1].tolist() == free[1].tolist()


# ---------------------------------------------------------------- top-k and top-p


def test_top_k_restricts_the_support_to_the_k_most_likely() -> None:
    logits = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5]  # nearly flat: without top-k all six appear
    model = fixed_logits(logits)
    assert set(draws(model)) == set(range(6))
    assert set(draws(model, top_k=3)) == {0, 1, 2}
    assert set(draws(model, top_k=1)) == {0}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    model = fixed_logits([math.log(p) for p in probs])
    # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}
    counts = draws(model, top_p=0.7)
    assert set(counts) == {0, 1}
    # renormalised inside the nucleus: P(0) = 0.5 / 0.8
    assert counts[0] / sum(counts.values()) == pytest.approx(0.625, abs=0.04)
    assert set(draws(model, top_p=0.9)) == {0, 1, 2}
    assert set(draws(model, top_p=0.4)) == {0}  # the top token is always kept
    assert set(draws(model, top_p=1.0)) == {0, 1, 2, 3}


def test_top_k_and_top_p_combine() -> None:
    model = fixed_logits([math.log(p) for p in (0.4, 0.3, 0.2, 0.1)])
    assert set(draws(model, top_k=3, top_p=0.95)) == {0, 1, 2}
    assert set(draws(model, top_k=3, top_p=0.6)) == {0, 1}


def test_temperature_sharpens_and_zero_is_greedy() -> None:
    model = fixed_logits([1.0, 0.0])
    hot, cold = draws(model, temperature=2.0), draws(model, temperature=0.5)
    assert cold[0] > hot[0]
    assert set(draws(model, temperature=0.0)) == {0}


# ---------------------------------------------------------------- repetition penalty


def test_repetition_penalty_lowers_the_probability_of_seen_tokens() -> None:
    model = fixed_logits([1.0, 1.0, 1.0])
    plain = draws(model, prompt_token=0)
    penalised = draws(model, prompt_token=0, repetition_penalty=2.0)
    n = sum(plain.values())
    assert plain[0] / n == pytest.approx(1 / 3, abs=0.04)
    # logit 1.0 -> 0.5 for the seen token: P = e^0.5 / (e^0.5 + 2e)
    expected = math.exp(0.5) / (math.exp(0.5) + 2 * math.e)
    assert penalised[0] / n == pytest.approx(expected, abs=0.04)
    assert penalised[1] > plain[1] and penalised[2] > plain[2]


def test_repetition_penalty_covers_generated_tokens_and_negative_logits() -> None:
    model = fixed_logits([2.0, 1.5, 1.2, -1.0, -1.2])
    idx = torch.full((1, 1), 4, dtype=torch.long)
    assert model.generate(idx, 3, temperature=0.0)[0, 1:].tolist() == [0, 0, 0]
    # 0 wins, then is penalised (2.0/1.5 = 1.33 < 1.5); then 1 is too (1.0), so 0 wins again.
    out = model.generate(idx, 3, temperature=0.0, repetition_penalty=1.5)
    assert out[0, 1:].tolist() == [0, 1, 0]
    # A negative logit is multiplied (divided, it would rise): -1.0 becomes -1.5 for seen token 4.
    neg = fixed_logits([-1.0, -1.0, -1.0, -1.0, -1.0])
    counts = draws(neg, prompt_token=4, repetition_penalty=1.5)
    expected = math.exp(-1.5) / (4 * math.exp(-1.0) + math.exp(-1.5))  # 0.13, unpenalised 0.2
    assert counts[4] / sum(counts.values()) == pytest.approx(expected, abs=0.03)
