"""evaluate stage: window protocols, perplexity against brute force, metrics keys, errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_params

from infinito.config import ConfigError, ModelConfig, Params
from infinito.data.splits import Window, nonoverlapping_windows, sliding_windows
from infinito.evaluate import evaluate, main
from infinito.model import Infinito
from infinito.runtime import torch_threads
from infinito.scoring import preserved_state, score

VOCAB = 64
TINY_MODEL = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "n_layer": 2,
    "n_head": 2,
    "block_size": 32,
    "memory_slots": 8,
    "phi_chunk": 8,
    "threshold_init": 1.0,  # below the PHI of random states, so evaluation writes memory
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and far faster when other work shares the CPU."""
    with torch_threads(1):
        yield


def tiny_model(seed: int = 0, **over: Any) -> Infinito:
    torch.manual_seed(seed)
    return Infinito(ModelConfig(**{**TINY_MODEL, **over}))


def eval_params(seq_len: int = 16, **evaluate_cfg: Any) -> Params:
    return Params.from_dict(
        {
            "data": {"seq_len": seq_len},
            "model": TINY_MODEL,
            "train": {"device": "cpu"},
            "evaluate": {"batch_size": 2, **evaluate_cfg},
        }
    )


def tokens_of(data_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16)


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n_tokens", [2, 17, 33, 100, 161])
@pytest.mark.parametrize("seq_len,stride", [(16, 8), (16, 16), (16, 1), (16, 5), (7, 3)])
def test_every_target_is_scored_exactly_once(n_tokens: int, seq_len: int, stride: int) -> None:
    for windows in (
        nonoverlapping_windows(n_tokens, seq_len),
        sliding_windows(n_tokens, seq_len, stride),
    ):
        scored: list[int] = []
        for w in windows:
            assert 1 <= w.length <= seq_len and 1 <= w.scored <= w.length
            assert w.start + w.length <= n_tokens - 1  # the last input still has a target
            first_target = w.start + 1
            scored += range(first_target + w.length - w.scored, first_target + w.length)
        assert scored == list(range(1, n_tokens))


def test_sliding_windows_give_every_later_token_context() -> None:
    seq_len, stride = 16, 4
    windows = sliding_windows(200, seq_len, stride)
    assert windows[0].scored == seq_len
    for w in windows[1:]:
        # the first scored target sits at input position length - scored, so it has
        # (length - scored) tokens of context inside the window, plus itself
        assert w.length - w.scored >= seq_len - stride
    assert sliding_windows(200, seq_len, seq_len) == nonoverlapping_windows(200, seq_len)


def test_sliding_stride_out_of_range_is_an_error() -> None:
    with pytest.raises(ConfigError, match="sliding_stride=17"):
        sliding_windows(100, 16, 17)


# ----------------------------------------------------------------------------- brute force


def brute_force_nll(model: Infinito, tokens: np.ndarray, seq_len: int, stride: int) -> float:
    """Window by window (batch of one), token by token, streaming the memory in order."""
    model.eval()
    model.reset_memory()
    ids = torch.from_numpy(tokens.astype(np.int64))
    total, scored_until, n = 0.0, 0, len(tokens)
    with torch.no_grad():
        start = 0
        while scored_until < n - 1:
            end = min(start + seq_len, n - 1)
            out = model(ids[start:end][None])
            logp = torch.log_softmax(out.logits[0].double(), dim=-1)
            for t in range(end - start):
                target = start + t + 1
                if target > scored_until:
                    total -= float(logp[t, ids[target]])
            scored_until = end
            model.write_memory(out.candidates)
            start += stride
    return total


@pytest.mark.parametrize("stride", [16, 8])  # 16 = the non-overlapping protocol
def test_score_matches_brute_force_with_memory(
    tokenized_data: Callable[..., Path], stride: int
) -> None:
    data = tokenized_data({"validation": 203})
    tokens = tokens_of(data, "validation")
    model = tiny_model()
    windows = sliding_windows(len(tokens), 16, stride)
    got = score(model, tokens, windows, 1, torch.device("cpu"), torch.float32)
    want = brute_force_nll(model, tokens, 16, stride)
    assert got.tokens == len(tokens) - 1
    assert got.nll_sum == pytest.approx(want, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(want / (len(tokens) - 1)), rel=1e-5)
    assert got.memory["memory_utilisation"] > 0  # the memory was really written while streaming


def test_score_is_token_weighted_and_batch_independent_without_memory(
    tokenized_data: Callable[..., Path],
) -> None:
    data = tokenized_data({"validation": 203})  # 202 targets: a short last window
    tokens = tokens_of(data, "validation")
    model = tiny_model(iit=False)
    want = brute_force_nll(model, tokens, 16, 16)
    for batch_size in (1, 3, 64):
        got = score(
            model,
            tokens,
            nonoverlapping_windows(len(tokens), 16),
            batch_size,
            torch.device("cpu"),
            torch.float32,
        )
        assert got.nll_sum == pytest.approx(want, rel=1e-5)


def test_memory_reads_disabled_changes_the_score(tokenized_data: Callable[..., Path]) -> None:
    tokens = tokens_of(tokenized_data({"validation": 400}), "validation")
    model = tiny_model()
    windows = nonoverlapping_windows(len(tokens), 16)
    cpu = torch.device("cpu")
    with_memory = score(model, tokens, windows, 2, cpu, torch.float32)
    without = score(model, tokens, windows, 2, cpu, torch.float32, memory_reads=False)
    assert with_memory.memory["memory_utilisation"] > 0
    assert with_memory.nll_sum != without.nll_sum


# ----------------------------------------------------------------------------- stream memories


def calibrated_stream_model() -> Infinito:
    """A stream-memory model whose PHI statistics are set (one training-mode write), so that
    evaluation's threshold is the same whatever the batch."""
    model = tiny_model(memory_scope="stream")
    model.train()
    with torch.no_grad():
        model.reset_memory(rows=2)
        model.write_memory(model(torch.randint(0, VOCAB, (2, 16))).candidates)
    model.eval()
    return model


def brute_force_streams(
    model: Infinito, tokens: np.ndarray, windows: list[Window], streams: int, documents: np.ndarray
) -> float:
    """Each stream on its own, window by window, with one memory of its own, emptied where the
    stream enters a new document."""
    total = 0.0
    per = -(-len(windows) // streams)
    with torch.no_grad():
        for b in range(streams):
            model.reset_memory(rows=1)
            previous = None
            for w in windows[b * per : (b + 1) * per]:
                if previous is not None and ((documents > previous) & (documents <= w.start)).any():
                    model.reset_memory(rows=1)
                xy = torch.from_numpy(tokens[w.start : w.start + w.length + 1].astype(np.int64))
                out = model(xy[None, :-1])
                logp = torch.log_softmax(out.logits[0].double(), dim=-1)
                targets = xy[1:]
                total -= float(logp[torch.arange(w.length), targets][-w.scored :].sum())
                model.write_memory(out.candidates)
                previous = w.start
    return total


@pytest.mark.parametrize("stride", [16, 8])
def test_stream_scoring_equals_each_stream_on_its_own(
    tokenized_data: Callable[..., Path], stride: int
) -> None:
    """Stream layout: every target once, each stream reading only its own memory (cleared at
    document starts): the same NLL as scoring each stream alone."""
    data = tokenized_data({"validation": 603})
    tokens = tokens_of(data, "validation")
    documents = np.array([0, 150, 170, 400], dtype=np.int64)
    model = calibrated_stream_model()
    windows = sliding_windows(len(tokens), 16, stride)
    cpu = torch.device("cpu")
    got = score(model, tokens, windows, 3, cpu, torch.float32, documents=documents)
    assert got.tokens == len(tokens) - 1
    assert got.memory["memory_utilisation"] > 0 and model.memory.rows == 3  # a row per stream
    want = brute_force_streams(model, tokens, windows, 3, documents)
    assert got.nll_sum == pytest.approx(want, rel=1e-5)
    assert 0 < got.writes["memory_accepted_fraction"] < 1
    shared = score(tiny_model(), tokens, windows, 3, cpu, torch.float32)  # another layout
    assert shared.nll_sum != pytest.approx(got.nll_sum, rel=1e-6)


def test_a_stream_memory_cleared_before_every_window_reads_nothing(
    tokenized_data: Callable[..., Path],
) -> None:
    tokens = tokens_of(tokenized_data({"validation": 400}), "validation")
    model = calibrated_stream_model()
    windows = nonoverlapping_windows(len(tokens), 16)
    every = np.array([w.start for w in windows], dtype=np.int64)  # a document per window
    cpu = torch.device("cpu")
    cleared = score(model, tokens, windows, 2, cpu, torch.float32, documents=every)
    off = score(model, tokens, windows, 2, cpu, torch.float32, False, documents=every)
    kept = score(model, tokens, windows, 2, cpu, torch.float32, documents=None)
    assert cleared.nll_sum == pytest.approx(off.nll_sum, rel=1e-9)
    assert kept.nll_sum != pytest.approx(off.nll_sum, rel=1e-6)


def test_preserved_state_restores_memory_and_mode(tokenized_data: Callable[..., Path]) -> None:
    tokens = tokens_of(tokenized_data({"validation": 300}), "validation")
    model = tiny_model()
    model.train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    with preserved_state(model):
        score(
            model,
            tokens,
            nonoverlapping_windows(len(tokens), 16),
            2,
            torch.device("cpu"),
            torch.float32,
        )
        assert not model.training
        assert any(not torch.equal(before[k], v) for k, v in model.named_buffers())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())


# ----------------------------------------------------------------------------- the stage


def test_stage_writes_flat_documented_metrics(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    data = tokenized_data({"train": 100, "validation": 301, "test": 250})
    model = tiny_model()
    model.save(tmp_path / "best")
    params = eval_params(seq_len=16, batch_size=1)
    metrics = evaluate(params, tmp_path / "best", data, tmp_path / "metrics" / "eval.json")
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text()) == pytest.approx(metrics)
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in metrics.values())
    meta = json.loads((data / "meta.json").read_text())
    for split in ("validation", "test"):
        for proto in ("", "sliding_"):
            for suffix in ("", "_no_memory"):
                loss = metrics[f"{split}_{proto}loss{suffix}"]
                assert metrics[f"{split}_{proto}ppl{suffix}"] == pytest.approx(math.exp(loss))
                nll = loss * (meta["splits"][split]["tokens"] - 1)
                assert metrics[f"{split}_{proto}bits_per_byte{suffix}"] == pytest.approx(
                    nll / math.log(2) / meta["splits"][split]["bytes"]
                )
                assert metrics[f"{split}_{proto}word_ppl{suffix}"] == pytest.approx(
                    math.exp(nll / meta["splits"][split]["words"])
                )
            assert metrics[f"{split}_{proto}memory_contribution_loss"] == pytest.approx(
                metrics[f"{split}_{proto}loss_no_memory"] - metrics[f"{split}_{proto}loss"]
            )
        for key in (
            "phi_mean",
            "phi_temporal_coherence",
            "phi_integration",
            "phi_complexity",
            "phi_attention_diversity",
            "delta_phi",
            "memory_utilisation",
            "stored_phi_mean",
        ):
            assert f"{split}_{key}" in metrics
        assert f"{split}_candidate_phi_mean" not in metrics  # it repeated phi_mean
        assert metrics[f"{split}_tokens"] == meta["splits"][split]["tokens"] - 1
    for key in (
        "iit_threshold",
        "iit_phi_weight_temporal_coherence",
        "iit_phi_weight_integration",
        "iit_phi_weight_complexity",
        "iit_phi_weight_attention_diversity",
    ):
        assert key in metrics
    assert "train_ppl" not in metrics  # only the configured splits
    # the stage's number is the brute-force one (batch 1 streams the memory window by window)
    want = brute_force_nll(model, tokens_of(data, "test"), 16, 16) / 249
    assert metrics["test_loss"] == pytest.approx(want, rel=1e-5)
    want = brute_force_nll(model, tokens_of(data, "validation"), 16, 8) / 300
    assert metrics["validation_sliding_loss"] == pytest.approx(want, rel=1e-5)


def test_stage_scores_a_stream_model_in_its_layout_with_its_write_statistics(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    data = tokenized_data({"train": 100, "validation": 301, "test": 250})
    model = calibrated_stream_model()
    model.save(tmp_path / "best")
    params = eval_params(seq_len=16, batch_size=2, splits=["test"])
    metrics = evaluate(params, tmp_path / "best", data, tmp_path / "eval.json")
    documents = np.load(data / "test.docs.npy")
    windows = nonoverlapping_windows(250, 16)
    want = score(model, tokens_of(data, "test"), windows, 2, torch.device("cpu"), torch.float32,
                 documents=documents)  # fmt: skip
    assert metrics["test_loss"] == pytest.approx(want.loss, rel=1e-9)
    for key in ("memory_accepted_fraction", "memory_written_fraction", "memory_accepted_phi_p50"):
        assert 0 < metrics[f"test_{key}"] < (1 if "fraction" in key else 10)
    assert all(math.isfinite(v) for v in metrics.values())
    (data / "test.docs.npy").unlink()
    with pytest.raises(ConfigError, match="memory_scope=stream needs"):
        evaluate(params, tmp_path / "best", data, tmp_path / "eval.json")


def test_ablation_repeats_main_numbers_as_no_memory(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    data = tokenized_data({"validation": 200, "test": 200})
    tiny_model(iit=False).save(tmp_path / "best")
    params = eval_params(splits=["test"])
    metrics = evaluate(params, tmp_path / "best", data, tmp_path / "eval.json")
    assert metrics["test_ppl_no_memory"] == metrics["test_ppl"]
    assert metrics["test_sliding_memory_contribution_loss"] == 0.0
    assert not any(k.startswith(("iit_", "test_phi")) for k in metrics)
    assert "validation_ppl" not in metrics


def test_main_reports_errors_before_work(
    tokenized_data: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tokenized_data({"validation": 200, "test": 200})
    params = tmp_path / "params.yaml"
    write_params(params, {"data.seq_len": 64, "model.block_size": 64})
    tiny_model().save(tmp_path / "best")  # block_size 32
    args = ["--params", str(params), "--data", str(data), "--metrics", str(tmp_path / "e.json")]
    assert main([*args, "--model", str(tmp_path / "nothing")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main([*args, "--model", str(tmp_path / "best")]) == 2
    assert "data.seq_len=64 exceeds the checkpoint's model.block_size=32" in capsys.readouterr().err
    no_data = [*args[:2], "--data", str(tmp_path), *args[4:], "--model", str(tmp_path / "best")]
    assert main(no_data) == 2
    assert "meta.json not found" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_vocab_smaller_than_tokenizer_is_an_error(
    tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    data = tokenized_data({"validation": 200, "test": 200}, vocab_size=128)
    tiny_model().save(tmp_path / "best")
    with pytest.raises(ConfigError, match="vocab_size=64 is smaller than .* vocab_size=128"):
        evaluate(eval_params(), tmp_path / "best", data, tmp_path / "eval.json")
