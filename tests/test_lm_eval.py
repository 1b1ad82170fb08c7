"""lm-evaluation-harness: INFINITO's model class against lm-eval's hf backend and the evaluate
stage's protocols, on the local tasks in tests/data/lm_eval (documents and multiple choice)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tiny_model import EXPORT_ABLATION, EXPORT_IIT, randomise

from infinito.config import ModelConfig
from infinito.data.splits import Window, nonoverlapping_windows, sliding_windows
from infinito.data.tokenize import EOS_TOKEN_ID, load_tokenizer
from infinito.interop.hf import export_gpt2
from infinito.interop.lm_eval import (
    InfinitoLM,
    continuation_windows,
    flat_results,
    rolling_windows,
    run_harness,
)
from infinito.model import Infinito
from infinito.scoring import score

pytestmark = pytest.mark.usefixtures("hub_offline")

TASKS_DIR = REPO_ROOT / "tests" / "data" / "lm_eval"
DOCS_TASK, CHOICE_TASK = "infinito_tiny_documents", "infinito_tiny_choices"
ABLATION, IIT = EXPORT_ABLATION, EXPORT_IIT
PPL_KEYS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task YAMLs name their data relative to the repository root."""
    monkeypatch.chdir(REPO_ROOT)


def documents() -> list[str]:
    with (TASKS_DIR / "documents.jsonl").open() as f:
        return [json.loads(line)["text"] for line in f]


def rolling_request(text: str) -> Instance:
    return Instance("loglikelihood_rolling", {}, (text,), 0)


def checkpoint(tmp_path: Path, cfg: ModelConfig, name: str) -> tuple[Infinito, Path]:
    torch.manual_seed(0)
    model = randomise(Infinito(cfg)).eval()
    model.save(tmp_path / name)
    return model, tmp_path / name


def stream(text: str) -> np.ndarray:
    """A document as lm-eval scores it: the end-of-text token, then the document's tokens."""
    return np.array([EOS_TOKEN_ID, *load_tokenizer().encode(text)], dtype=np.int64)


def rolling_nll(model: Infinito, text: str, max_length: int, batch_size: int = 4) -> float:
    """The evaluate stage's ``score`` loop over lm-eval's rolling windows of one document."""
    tokens = stream(text)
    windows = rolling_windows(len(tokens), max_length)
    return score(model, tokens, windows, batch_size, torch.device("cpu"), torch.float32).nll_sum


# ----------------------------------------------------------------------------- the windows


@pytest.mark.parametrize("max_length", [1, 3, 16, 32])
def test_rolling_windows_are_lm_evals_windows(max_length: int) -> None:
    for n in range(2, 100):
        tokens = list(range(1, n))  # the document; the stream is [0] + tokens
        theirs = [
            make_disjoint_window(pair)
            for pair in get_rolling_token_windows(tokens, 0, max_length, context_len=1)
        ]
        s = [0, *tokens]
        ours = rolling_windows(n, max_length)
        assert len(ours) == len(theirs)
        for w, (context, continuation) in zip(ours, theirs, strict=True):
            fed = (context + continuation)[-(max_length + 1) :][:-1]  # what the hf backend reads
            assert s[w.start : w.start + w.length] == fed
            end = w.start + w.length + 1
            assert s[end - w.scored : end] == continuation


def test_rolling_windows_are_the_evaluate_stages_where_the_protocols_coincide() -> None:
    L = 16
    for n in range(2, 120):
        ours = rolling_windows(n, L)
        targets = n - 1
        if targets <= L or targets % L == 0:
            assert ours == nonoverlapping_windows(n, L) == sliding_windows(n, L, L)
            if targets <= L:  # one window: every stride gives it
                assert ours == sliding_windows(n, L, L // 2)
        else:  # lm-eval moves the last window left to a full context
            theirs = sliding_windows(n, L, L)
            assert ours[:-1] == theirs[:-1]
            assert ours[-1] == Window(targets - L, L, targets % L)
            assert theirs[-1] == Window(targets - targets % L, targets % L, targets % L)


def test_continuation_windows_stream_the_context_beyond_the_window() -> None:
    assert continuation_windows(10, 3, 16, feed_memory=True) == [Window(0, 9, 3)]
    # 70 tokens, 2 scored, 32-token window: inputs 37..68 score targets 68 and 69
    assert continuation_windows(70, 2, 32, feed_memory=False) == [Window(37, 32, 2)]
    assert continuation_windows(70, 2, 32, feed_memory=True) == [
        Window(0, 32, 0),
        Window(32, 5, 0),
        Window(37, 32, 2),
    ]
    with pytest.raises(ValueError, match="continuation of 40 tokens does not fit .* 32"):
        continuation_windows(70, 40, 32, feed_memory=False)


# ----------------------------------------------------------------------------- the ablation


def test_ablation_scores_the_same_through_both_backends(tmp_path: Path, in_repo: None) -> None:
    model, ckpt = checkpoint(tmp_path, ABLATION, "ablation")
    folder = export_gpt2(model, tmp_path / "export", "# card\n")
    runs = {
        backend: flat_results(
            run_harness(path, [DOCS_TASK, CHOICE_TASK], device="cpu", include_path=TASKS_DIR)
        )
        for backend, path in (("infinito", ckpt), ("hf", folder))
    }
    ours, hf = runs["infinito"], runs["hf"]
    for key in PPL_KEYS:
        assert ours[f"{DOCS_TASK}_{key}"] == pytest.approx(hf[f"{DOCS_TASK}_{key}"], rel=1e-3)
    assert ours[f"{CHOICE_TASK}_acc"] == hf[f"{CHOICE_TASK}_acc"]
    # the numbers are the task's: word perplexity from the documents' NLL and word counts
    words = sum(len(re.split(r"\s+", d)) for d in documents())
    nll = sum(rolling_nll(model, d, 32) for d in documents())
    assert ours[f"{DOCS_TASK}_word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-6)


@pytest.mark.parametrize("max_length", [16, 32])
def test_rolling_loglikelihood_agrees_with_the_evaluate_stage_where_protocols_coincide(
    tmp_path: Path, max_length: int
) -> None:
    """Per document, lm-eval's hf backend against the evaluate stage's ``score`` loop.

    Where the protocols coincide (the document fits one window, or its length is a multiple of
    the window) the sliding protocol with stride = window gives lm-eval's number; elsewhere
    lm-eval's last window has more context and the numbers differ, and our ``rolling_windows``
    through the same ``score`` loop give lm-eval's number again."""
    model, _ = checkpoint(tmp_path, ABLATION, "ablation")
    folder = export_gpt2(model, tmp_path / "export", "# card\n")
    hflm = HFLM(pretrained=str(folder), device="cpu", batch_size=4, max_length=max_length)
    cpu, fp32 = torch.device("cpu"), torch.float32
    coincide = differ = 0
    for text in documents():
        (theirs,) = hflm.loglikelihood_rolling([rolling_request(text)], disable_tqdm=True)
        tokens = stream(text)
        targets = len(tokens) - 1
        ours = -rolling_nll(model, text, max_length)
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-4)
        sliding = sliding_windows(len(tokens), max_length, max_length)
        stage = -score(model, tokens, sliding, 4, cpu, fp32).nll_sum
        if targets <= max_length or targets % max_length == 0:
            assert stage == pytest.approx(theirs, rel=1e-5, abs=1e-4)
            coincide += 1
        else:
            assert stage != pytest.approx(theirs, rel=1e-5, abs=1e-4)
            differ += 1
    assert coincide >= 2 and differ >= 2  # the local task exercises both cases


def test_generation_is_the_same_through_both_backends(tmp_path: Path) -> None:
    model, ckpt = checkpoint(tmp_path, ABLATION, "ablation")
    folder = export_gpt2(model, tmp_path / "export", "# card\n")
    kwargs = {"until": ["."], "max_gen_toks": 12, "do_sample": False}
    requests = [Instance("generate_until", {}, (d[:60], dict(kwargs)), 0) for d in documents()]
    ours = InfinitoLM(str(ckpt), device="cpu").generate_until(requests)
    theirs = HFLM(pretrained=str(folder), device="cpu", batch_size=1).generate_until(
        requests, disable_tqdm=True
    )
    assert ours == theirs and any(ours)


def test_a_gpt2_folder_through_the_infinito_class_is_its_ablation(tmp_path: Path) -> None:
    model, ckpt = checkpoint(tmp_path, ABLATION, "ablation")
    folder = export_gpt2(model, tmp_path / "export", "# card\n")
    converted = InfinitoLM(str(folder), device="cpu", batch_size=4)
    assert not converted.model.config.iit
    requests = [rolling_request(d) for d in documents()]
    expected = InfinitoLM(str(ckpt), device="cpu", batch_size=4).loglikelihood_rolling(requests)
    assert converted.loglikelihood_rolling(requests) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size='auto'.*positive integer"):
        InfinitoLM(str(ckpt), batch_size="auto")
    with pytest.raises(ValueError, match="max_length=64 must be in \\[1, block_size=32\\]"):
        InfinitoLM(str(ckpt), max_length=64)


# ----------------------------------------------------------------------------- the IIT model


def test_iit_model_streams_memory_per_document(tmp_path: Path) -> None:
    """Each document from an empty memory, its windows in order (one per forward pass)."""
    model, ckpt = checkpoint(tmp_path, IIT, "iit")
    lm = InfinitoLM(str(ckpt), device="cpu", batch_size=4)
    docs = documents()
    forward = lm.loglikelihood_rolling([rolling_request(d) for d in docs])
    backward = lm.loglikelihood_rolling([rolling_request(d) for d in reversed(docs)])
    assert forward == pytest.approx(backward[::-1], rel=1e-6)  # nothing leaks between documents
    cpu, fp32 = torch.device("cpu"), torch.float32
    long_doc = max(docs, key=lambda d: len(stream(d)))
    tokens = stream(long_doc)
    windows = rolling_windows(len(tokens), lm.max_length)
    assert len(windows) >= 2
    # the evaluate stage's loop (reset, then write after each batch of one window) agrees
    expected = score(model, tokens, windows, 1, cpu, fp32)
    assert forward[docs.index(long_doc)] == pytest.approx(-expected.nll_sum, rel=1e-5)
    assert expected.memory["memory_utilisation"] > 0  # the memory was written ...
    no_reads = score(model, tokens, windows, 1, cpu, fp32, memory_reads=False)
    assert no_reads.nll_sum != pytest.approx(expected.nll_sum, rel=1e-6)  # ... and read


def test_iit_model_runs_through_the_harness(tmp_path: Path, in_repo: None) -> None:
    _, ckpt = checkpoint(tmp_path, IIT, "iit")
    results = run_harness(ckpt, [DOCS_TASK, CHOICE_TASK], device="cpu", include_path=TASKS_DIR)
    assert results["backend"] == "infinito"
    flat = flat_results(results)
    for key in PPL_KEYS:
        assert math.isfinite(flat[f"{DOCS_TASK}_{key}"]) and flat[f"{DOCS_TASK}_{key}"] > 0
    assert 0.0 <= flat[f"{CHOICE_TASK}_acc"] <= 1.0
    kwargs = {"until": ["\n"], "max_gen_toks": 40, "do_sample": False}
    lm = InfinitoLM(str(ckpt), device="cpu")
    (text,) = lm.generate_until([Instance("generate_until", {}, (documents()[4], kwargs), 0)])
    assert isinstance(text, str) and "\n" not in text


def test_lm_eval_command_writes_flat_metrics(tmp_path: Path, in_repo: None) -> None:
    from infinito.cli import main

    model, ckpt = checkpoint(tmp_path, ABLATION, "ablation")
    folder = export_gpt2(model, tmp_path / "export", "# card\n")
    out = tmp_path / "lm_eval.json"
    argv = ["lm-eval", "--model", str(folder), "--tasks", DOCS_TASK, "--device", "cpu"]
    assert main([*argv, "--include-path", str(TASKS_DIR), "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["model"] == str(folder)
    direct = InfinitoLM(str(ckpt), device="cpu").loglikelihood_rolling(
        [rolling_request(d) for d in documents()]
    )
    words = sum(len(re.split(r"\s+", d)) for d in documents())
    expected = math.exp(-sum(direct) / words)
    assert metrics[f"{DOCS_TASK}_word_perplexity"] == pytest.approx(expected, rel=1e-5)
    assert main(["lm-eval", "--model", str(tmp_path), "--tasks", DOCS_TASK]) == 2  # no config
    assert main(["lm-eval", "--model", "models/no-such-run", "--tasks", DOCS_TASK]) == 2


def test_a_hub_id_goes_to_the_backend_its_config_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Hub here: hf_hub_download serves config.json files from a local 'Hub'."""
    import huggingface_hub

    from infinito.interop.lm_eval import backend_for

    hub = tmp_path / "hub"
    checkpoint(hub, IIT, "user-infinito")
    export_gpt2(checkpoint(tmp_path, ABLATION, "ablation")[0], hub / "gpt2", "# card\n")
    asked: list[tuple[str, str]] = []

    def hf_hub_download(repo_id: str, filename: str, **kwargs: object) -> str:
        asked.append((repo_id, filename))
        return str(hub / repo_id / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert backend_for("gpt2") == "hf"
    assert backend_for("user-infinito") == "infinito"
    assert asked == [("gpt2", "config.json"), ("user-infinito", "config.json")]
