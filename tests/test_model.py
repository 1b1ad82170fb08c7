"""The backbone and the public model API on tiny configurations (CPU, seconds)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_model import TINY, build, populate, tokens

from infinito.config import ConfigError, ModelConfig
from infinito.model import CheckpointError, Infinito, LayerCache, ModelOutput

IIT_KEYS = {
    "phi_mean",
    "phi_temporal_coherence",
    "phi_integration",
    "phi_complexity",
    "phi_attention_diversity",
    "delta_phi",
    "aux_loss",
    "threshold",
    "phi_weight_temporal_coherence",
    "phi_weight_integration",
    "phi_weight_complexity",
    "phi_weight_attention_diversity",
    "memory_utilisation",
}


# ---------------------------------------------------------------- shapes and losses


@pytest.mark.parametrize(("iit", "scope"), [(True, "shared"), (True, "stream"), (False, "shared")])
def test_output_shapes_and_stats(iit: bool, scope: str) -> None:
    model = build(replace(TINY, iit=iit, memory_scope=scope))
    model.reset_memory(rows=2)
    idx = tokens()
    out = model(idx, idx, return_logits=True)
    assert isinstance(out, ModelOutput)
    assert out[0] is out.logits and out.logits.shape == (2, 32, 61)
    assert out.loss is not None and out.loss.dim() == 0
    assert out.aux_loss.dim() == 0
    assert set(out.stats) == (IIT_KEYS if iit else set())
    for value in out.stats.values():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)
    if iit:  # shared: one group of every row's chunks; stream: a group per row
        groups = 1 if scope == "shared" else 2
        assert out.candidates is not None
        assert out.candidates.phi.shape == (groups, 2 * 32 // 8 // groups)
        assert out.candidates.keys.shape == (groups, 2 * 32 // 8 // groups, 32)
        assert (out.candidates.rows is None) == (scope == "shared")
    else:
        assert out.candidates is None
        assert out.aux_loss.item() == 0.0
    assert model(idx).loss is None
    # Training with targets: the loss without the (B, T, V) logits, unless they are asked for.
    assert model.training and model(idx, idx).logits is None
    assert model.eval()(idx, idx).logits is not None  # evaluation scores positions from them


def test_loss_at_initialisation_is_near_log_vocab() -> None:
    cfg = replace(TINY, vocab_size=500)
    model = build(cfg).eval()
    idx = tokens(4, vocab=500)
    loss = model(idx, idx).loss
    assert loss is not None
    assert abs(loss.item() - math.log(500)) < 0.1


def test_ignored_targets_are_left_out_of_the_loss() -> None:
    model = build().eval()
    idx = tokens()
    targets = idx.clone()
    targets[:, 16:] = -100
    full = torch.nn.functional.cross_entropy(
        model(idx).logits[:, :16].reshape(-1, 61), idx[:, :16].reshape(-1)
    )
    torch.testing.assert_close(model(idx, targets).loss, full)
    torch.testing.assert_close(model(idx.int(), targets.int()).loss, full)  # int32 ids too


@pytest.mark.parametrize("iit", [True, False])
def test_overfits_one_batch(iit: bool) -> None:
    model = build(replace(TINY, iit=iit, dropout=0.0))
    idx = tokens(2, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        out = model(idx[:, :-1], idx[:, 1:])
        assert out.loss is not None
        opt.zero_grad()
        (out.loss + 0.1 * out.aux_loss).backward()
        opt.step()
        model.write_memory(out.candidates)
    assert out.loss.item() < 0.1  # from ln(61) = 4.1


def test_bad_inputs_are_rejected_with_a_clear_error() -> None:
    model = build()
    with pytest.raises(ValueError, match="block_size=32"):
        model(tokens(1, 33))
    with pytest.raises(ValueError, match="2-D integer tensor"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D integer tensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="targets shape"):
        model(tokens(1, 8), tokens(1, 7))


# ---------------------------------------------------------------- causality


def _perturb_after(idx: torch.Tensor, j: int) -> torch.Tensor:
    other = idx.clone()
    other[:, j + 1 :] = (idx[:, j + 1 :] + 1 + tokens(*idx.shape, seed=7)[:, j + 1 :] % 50) % 61
    assert not torch.equal(other[:, j + 1 :], idx[:, j + 1 :])
    return other


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("iit", "scope"), [(True, "shared"), (True, "stream"), (False, "shared")])
def test_logits_up_to_j_ignore_later_tokens(mode: str, iit: bool, scope: str) -> None:
    model = build(replace(TINY, iit=iit, memory_scope=scope))
    if iit:
        populate(model)
    model.train(mode == "train")
    idx, j = tokens(), 12
    other = _perturb_after(idx, j)
    torch.manual_seed(5)  # same dropout masks and exploration noise for both calls
    a = model(idx).logits
    torch.manual_seed(5)
    b = model(other).logits
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, j + 1 :], b[:, j + 1 :])  # the test can see a change


@pytest.mark.parametrize("scope", ["shared", "stream"])
def test_one_rows_tokens_never_change_another_rows_logits(scope: str) -> None:
    """Within a call no scope mixes rows. After a write, the shared memory holds every row's
    chunks (by design), while a stream memory holds only its own: row 1's next logits are
    bit-identical whatever row 0 read before."""
    # every chunk is written (no budget), so a shared write surely holds row 0's chunks
    model = build(replace(TINY, memory_scope=scope, dropout=0.0, memory_write_fraction=1.0))
    model.eval()
    populate(model)
    idx = tokens(2, 32)
    other = idx.clone()
    other[0] = (idx[0] + 5) % 61  # only row 0 differs
    runs = []
    for first in (idx, other):
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        out = model(first)
        model.write_memory(out.candidates)
        runs.append((out.logits, model(tokens(2, 32, seed=9)).logits))
        model.load_state_dict(saved)
    (now_a, next_a), (now_b, next_b) = runs
    assert torch.equal(now_a[1], now_b[1]) and not torch.equal(now_a[0], now_b[0])
    if scope == "stream":
        assert torch.equal(next_a[1], next_b[1])
    else:
        assert not torch.equal(next_a[1], next_b[1])  # the test can see a shared write


def test_stream_rows_keep_their_own_slots_in_training_mode() -> None:
    """Training mode: a row's slots come from that row alone. (With the standardised threshold,
    training-mode writes also update the running PHI statistics, one calibration of the model
    learned from every row like its weights and a BatchNorm's statistics; the absolute
    threshold has none, so there the rows are independent bit for bit.)"""
    model = build(replace(TINY, memory_scope="stream", threshold_mode="absolute")).train()
    populate(model)
    idx = tokens(4, 32)
    other = idx.clone()
    other[2] = (idx[2] + 3) % 61
    memories = []
    for first in (idx, other):
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(5)  # the same dropout and noise draws in both runs
        model.write_memory(model(first).candidates)
        memories.append({k: v.clone() for k, v in model.memory.state_dict().items()})
        model.load_state_dict(saved)
    a, b = memories
    for name in ("keys", "values", "phi", "usage", "age", "valid"):
        assert torch.equal(a[name][[0, 1, 3]], b[name][[0, 1, 3]]), name
    assert not torch.equal(a["keys"][2], b["keys"][2])


# ---------------------------------------------------------------- ablation


def test_ablation_shares_the_initial_backbone() -> None:
    full = build(TINY, seed=3).state_dict()
    ablation = build(replace(TINY, iit=False), seed=3).state_dict()
    assert set(ablation) < set(full)
    assert all(k.startswith(("memory.", "phi_weights.")) for k in set(full) - set(ablation))
    for name, tensor in ablation.items():
        assert torch.equal(tensor, full[name]), name


def test_the_ablation_ignores_every_memory_option() -> None:
    plain = build(replace(TINY, iit=False), seed=3)
    other = replace(
        TINY,
        iit=False,
        memory_scope="stream",
        threshold_mode="absolute",
        memory_write_fraction=1.0,
    )
    ablation = build(other, seed=3)
    assert plain.memory is None and ablation.memory is None
    state = plain.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in ablation.state_dict().items())
    assert set(ablation.state_dict()) == set(state)
    ablation.reset_memory(rows=3)  # nothing to reset
    assert torch.equal(plain.eval()(tokens()).logits, ablation.eval()(tokens()).logits)
    assert not other.stream_memory


def test_finer_switches_drop_their_parts() -> None:
    no_memory = build(replace(TINY, memory=False))
    assert no_memory.memory is None and no_memory.phi_weights is not None
    out = no_memory(tokens())
    assert out.candidates is None and "threshold" not in out.stats and "phi_mean" in out.stats
    no_phi_loss = build(replace(TINY, phi_loss=False))
    out = no_phi_loss(tokens())
    assert out.aux_loss.item() == 0.0 and not out.aux_loss.requires_grad
    assert out.candidates is not None  # PHI still decides memory writes
    assert build(replace(TINY, noise=False)).noise is None


# ---------------------------------------------------------------- generation


def _greedy_by_forward(model: Infinito, idx: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size :]).logits
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("scope", ["shared", "stream"])
def test_cached_greedy_generation_equals_uncached_and_forward(scope: str) -> None:
    model = build(replace(TINY, memory_scope=scope))
    populate(model)
    model.eval()
    prompt = tokens(2, 5)
    n = 40  # runs past block_size=32, through the cropped-window fallback
    cached = model.generate(prompt, n, temperature=0)
    uncached = model.generate(prompt, n, temperature=0, use_cache=False)
    assert cached.shape == (2, 5 + n)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        assert torch.equal(cached, _greedy_by_forward(model, prompt, n))


def test_cache_filled_in_pieces_matches_the_full_forward() -> None:
    """A prefix, then several tokens at once (causal mask over the cache), then one token
    (no mask): each time the last logits equal an uncached forward pass's."""
    model = build()
    populate(model)
    model.eval()
    idx = tokens(2, 14)
    caches = [LayerCache(model.config.block_size) for _ in range(model.config.n_layer)]
    with torch.no_grad():
        for lo, hi in ((0, 10), (10, 13), (13, 14)):
            got = model._decode(idx[:, lo:hi], lo, caches)
            torch.testing.assert_close(got, model(idx[:, :hi]).logits[:, -1])
    assert caches[0].length == 14 and caches[0].k is not None
    assert caches[0].k.shape[2] == model.config.block_size  # allocated once


def test_stream_generation_reads_each_rows_own_memory() -> None:
    """Row r of a stream-scope generation reads memory row r only: emptying another row's
    memory leaves it unchanged, emptying its own changes it."""
    model = build(replace(TINY, memory_scope="stream"))
    populate(model)
    model.eval()
    prompt = tokens(4, 6)
    before = model.generate(prompt, 12, temperature=0)
    model.clear_memory_rows(torch.tensor([True, False, False, False]))
    after = model.generate(prompt, 12, temperature=0)
    assert torch.equal(before[1:], after[1:])
    with torch.no_grad():
        logits = model(prompt).logits[:, -1]
    model.reset_memory(rows=4)
    with torch.no_grad():
        assert not torch.equal(model(prompt).logits[1:, -1], logits[1:])
    with pytest.raises(ValueError, match=r"reset_memory\(rows=5\)"):
        model.generate(tokens(5, 6), 2, temperature=0)


def test_frozen_memory_reads_equal_live_reads_and_end_with_the_block() -> None:
    model = build()
    populate(model)
    memory = model.memory
    assert memory is not None
    x = torch.randn(2, 5, model.config.d_model)
    with torch.no_grad():
        live, mass = memory(x)
        with memory.frozen():
            frozen, no_mass = memory(x)
    assert torch.equal(live, frozen) and mass is not None and no_mass is None
    assert memory._frozen is None
    model.generate(tokens(1, 3), 2, temperature=0)
    assert memory._frozen is None


def test_generation_reads_but_does_not_write_memory_and_restores_mode() -> None:
    model = build()
    populate(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.generate(tokens(2, 4), 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sampling_options() -> None:
    model = build().eval()
    prompt = tokens(3, 4)
    greedy = model.generate(prompt, 12, temperature=0)
    assert torch.equal(model.generate(prompt, 12, temperature=0.7, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 12, temperature=0.7, top_p=1e-6), greedy)
    a = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(4))
    b = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    # top-k: every sampled token is among the k most likely under the same context
    out = model.generate(prompt, 1, temperature=2.0, top_k=3)
    with torch.no_grad():
        top3 = model(prompt).logits[:, -1].topk(3).indices
    assert (top3 == out[:, -1:]).any(-1).all()


def test_repetition_penalty_is_ctrl_style() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[0, 1, 1]])
    out = Infinito._penalise(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))
    assert Infinito._penalise(logits, seen, 1.0) is logits


def test_eos_stops_rows_and_pads_them() -> None:
    model = build().eval()
    prompt = tokens(2, 4)
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 6])  # row 0 emits it at its third new token
    out = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0].item()
    assert (out[0, 4 + first :] == eos).all()
    for row in range(2):
        hits = (out[row, 4:] == eos).nonzero()
        if len(hits):  # everything after a row's first EOS is EOS padding
            assert (out[row, 4 + hits[0].item() :] == eos).all()
    stop = model.generate(prompt[:1], 10, temperature=0, eos_token_id=int(greedy[0, 4]))
    assert stop.shape == (1, 5)  # the only row finished at once: generation stopped


def test_generate_rejects_bad_arguments() -> None:
    model = build()
    prompt = tokens(1, 4)
    for kwargs, name in [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"eos_token_id": 61}, "eos_token_id"),
    ]:
        with pytest.raises(ValueError, match=name):
            model.generate(prompt, 2, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("scope", ["shared", "stream"])
def test_save_and_load_round_trip_is_exact(tmp_path: Path, scope: str) -> None:
    model = build(replace(TINY, memory_scope=scope))
    populate(model)  # a stream memory of 4 rows: the loaded one has 4 too
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = Infinito.from_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]) and tensor.dtype == original[name].dtype, name
    model.eval(), loaded.eval()
    idx = tokens()
    assert torch.equal(model(idx).logits, loaded(idx).logits)


def test_loading_is_strict(tmp_path: Path) -> None:
    build().save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(weights))

    missing = dict(state)
    del missing["memory.threshold_raw"]
    save_file(missing, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensors \['memory.threshold_raw'\]"):
        Infinito.from_checkpoint(tmp_path / "ckpt")

    save_file({**state, "extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['extra.weight'\]"):
        Infinito.from_checkpoint(tmp_path / "ckpt")

    save_file(state, str(weights))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "d_modle": 3}))
    with pytest.raises(ConfigError, match="unknown key model.d_modle"):
        Infinito.from_checkpoint(tmp_path / "ckpt")

    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        Infinito.from_checkpoint(tmp_path / "ckpt")


def test_an_ablation_checkpoint_does_not_load_as_the_iit_model(tmp_path: Path) -> None:
    build(replace(TINY, iit=False)).save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "iit": True}))
    with pytest.raises(CheckpointError, match="missing tensors.*memory.keys"):
        Infinito.from_checkpoint(tmp_path / "ckpt")


# ---------------------------------------------------------------- accounting


def test_seed_dimensions_parameter_count() -> None:
    with torch.device("meta"):  # no memory, no initialisation work
        model = Infinito(ModelConfig())
        ablation = Infinito(ModelConfig(iit=False))
    breakdown = model.param_breakdown()
    assert breakdown["total"] == model.num_params()
    assert abs(model.num_params() / 71_629_207 - 1) < 0.01
    assert breakdown["lm_head"] == breakdown["token_embedding"] == 50257 * 512  # untied
    assert breakdown["position_embedding"] == 256 * 512
    assert ablation.num_params() == model.num_params() - breakdown["memory"] - 4
    assert ablation.param_breakdown()["memory"] == 0
    assert model.flops_per_token(256) > 6 * (model.num_params() - 50257 * 512 - 256 * 512)
