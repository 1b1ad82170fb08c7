"""generate-samples stage: options, metrics, the samples file, and a run on a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_params

from infinito.config import ConfigError, GenerateConfig, ModelConfig
from infinito.data.splits import check_vocab
from infinito.generate import (
    GenerationResult,
    Sample,
    build_parser,
    config_from_args,
    generate_samples,
    main,
    render_markdown,
    sample_metrics,
    sampling_kwargs,
)
from infinito.model import Infinito

METRIC_KEYS = {
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "repeated_4gram_rate",
    "self_bleu",
    "mean_length_tokens",
    "generation_tokens_per_sec",
    "n_samples",
    "eos_rate",
}


def _args(*argv: str) -> GenerateConfig:
    return config_from_args(GenerateConfig(), build_parser().parse_args(["--model", "m", *argv]))


def test_seed_cli_options_override_params() -> None:
    cfg = _args(
        "--checkpoint",
        "models/best",
        "--prompt",
        "Artificial intelligence is",
        "--length",
        "100",
        "--temperature",
        "0.8",
        "--top-k",
        "0",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.3",
    )
    assert cfg.prompts == ("Artificial intelligence is",)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_k) == (100, 0.8, 0)
    assert (cfg.top_p, cfg.repetition_penalty) == (0.9, 1.3)
    args = build_parser().parse_args(["--checkpoint", "x", "--model", "y"])
    assert args.model == Path("y")  # the two names are one option


def test_prompt_repeats_and_greedy() -> None:
    cfg = _args("--prompt", "a", "--prompt", "b", "--greedy")
    assert cfg.prompts == ("a", "b")
    assert cfg.temperature == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--greedy", "--temperature", "0.5"])


def test_bad_override_names_the_key() -> None:
    with pytest.raises(ConfigError, match="generate.top_p"):
        _args("--top-p", "1.5")
    with pytest.raises(ConfigError, match="generate.temperature"):
        _args("--temperature", "-1")


def test_sampling_kwargs_map_disabling_values_to_none() -> None:
    kw = sampling_kwargs(GenerateConfig(top_k=0, top_p=1.0, temperature=0.0))
    assert kw["top_k"] is None and kw["top_p"] is None and kw["temperature"] == 0.0
    kw = sampling_kwargs(GenerateConfig(top_k=5, top_p=0.5))
    assert kw["top_k"] == 5 and kw["top_p"] == 0.5


def test_vocab_check_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        check_vocab(100, 50257, f"the checkpoint in {tmp_path}", "GPT-2's tokenizer")
    check_vocab(50257, 50257, f"the checkpoint in {tmp_path}", "GPT-2's tokenizer")


def _result(texts: list[str], eos: list[bool]) -> GenerationResult:
    samples = [
        Sample("The prompt", i + 1, t, len(t.split()), e)
        for i, (t, e) in enumerate(zip(texts, eos, strict=True))
    ]
    return GenerationResult(
        samples, seconds=2.0, tokens_generated=sum(len(t.split()) for t in texts)
    )


def test_metrics_expose_a_degenerate_loop() -> None:
    loop = _result([" the" * 40, " the" * 40], [False, False])
    varied = _result(
        [" a quick brown fox jumps over the lazy dog", " rain fell on seven quiet valleys today"],
        [True, False],
    )
    m_loop, m_varied = sample_metrics(loop), sample_metrics(varied)
    assert set(m_loop) == METRIC_KEYS
    assert m_loop["distinct_1"] < 0.05 and m_varied["distinct_1"] > 0.9
    assert m_loop["distinct_2"] < 0.05 and m_varied["distinct_2"] == pytest.approx(1.0)
    assert m_loop["repeated_4gram_rate"] > 0.9 and m_varied["repeated_4gram_rate"] == 0.0
    assert m_loop["self_bleu"] > 90 and m_varied["self_bleu"] < 10
    assert m_loop["mean_length_tokens"] == pytest.approx(40.0)
    assert m_loop["generation_tokens_per_sec"] == pytest.approx(40.0)
    assert m_loop["eos_rate"] == 0.0 and m_varied["eos_rate"] == pytest.approx(0.5)
    assert m_varied["n_samples"] == 2


def test_markdown_lists_settings_then_each_prompt_and_continuation() -> None:
    cfg = GenerateConfig(prompts=("The prompt",), samples_per_prompt=2, top_k=0)
    text = render_markdown(
        _result([" first ``` tricky", " second"], [True, False]), cfg, 7, Path("models/best")
    )
    assert text.index("| temperature | 0.8 |") < text.index("## Sample 1")
    assert "| top_k | off |" in text and "| seed | 7 |" in text
    assert "stopped at end-of-text" in text and "reached max_new_tokens" in text
    # A continuation containing ``` is fenced with a longer fence, so it shows verbatim.
    assert "````text\n first ``` tricky\n````" in text
    assert text.index(" first ```") < text.index(" second")


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json not found: .* holds no checkpoint"):
        generate_samples(GenerateConfig(), 0, tmp_path / "nope", None, None, device="cpu")


def test_main_reports_bad_input_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    write_params(params, {"seed": 1})
    rc = main(["--params", str(params), "--model", str(tmp_path / "nope"), "--top-k", "-2"])
    assert rc == 2
    assert "generate.top_k" in capsys.readouterr().err


# ---------------------------------------------------------------- the stage on a tiny checkpoint

TINY = dict(vocab_size=50257, d_model=32, n_layer=1, n_head=2, block_size=64, dropout=0.0,
            memory_slots=8, phi_chunk=8)  # fmt: skip
EOS = 50256


def _save_tiny(path: Path, fill_memory: bool = False) -> Infinito:
    torch.manual_seed(0)
    model = Infinito(ModelConfig(**TINY)).eval()
    if fill_memory:
        with torch.no_grad():
            out = model(torch.randint(0, 1000, (2, 32)))
            model.write_memory(out.candidates)
        assert model.memory_stats()["memory_utilisation"] > 0
    model.save(path)
    return model


STAGE_CFG = GenerateConfig(
    prompts=("Artificial intelligence is", "The history of"),
    max_new_tokens=12,
    samples_per_prompt=2,
    temperature=0.8,
    top_k=20,
    top_p=0.95,
    repetition_penalty=1.1,
)


def test_stage_writes_samples_and_flat_metrics_reproducibly(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "best")
    samples, metrics = tmp_path / "out/samples.md", tmp_path / "out/generate.json"
    out = generate_samples(STAGE_CFG, 3, tmp_path / "best", samples, metrics, device="cpu")
    written = json.loads(metrics.read_text())
    assert set(written) == METRIC_KEYS
    assert all(isinstance(v, int | float) for v in written.values())
    assert written["n_samples"] == 4 and written["generation_tokens_per_sec"] > 0
    assert 0 < written["mean_length_tokens"] <= 12
    assert [s.prompt for s in out["samples"]] == ["Artificial intelligence is"] * 2 + [
        "The history of"
    ] * 2
    text = samples.read_text()
    assert text.count("## Sample") == 4 and "The history of" in text
    for s in out["samples"]:
        assert s.text in text
    # Same checkpoint, settings and seed: the same file; another seed: other samples.
    first = text
    generate_samples(STAGE_CFG, 3, tmp_path / "best", samples, None, device="cpu")
    assert samples.read_text() == first
    generate_samples(STAGE_CFG, 4, tmp_path / "best", samples, None, device="cpu")
    assert samples.read_text() != first


def test_stage_output_does_not_depend_on_the_saved_memory(tmp_path: Path) -> None:
    """Memory is reset before generating, so what training left in it cannot change samples."""
    _save_tiny(tmp_path / "empty")
    _save_tiny(tmp_path / "full", fill_memory=True)
    a = generate_samples(STAGE_CFG, 0, tmp_path / "empty", None, None, device="cpu")
    b = generate_samples(STAGE_CFG, 0, tmp_path / "full", None, None, device="cpu")
    assert [s.text for s in a["samples"]] == [s.text for s in b["samples"]]


def test_stage_counts_end_of_text(tmp_path: Path) -> None:
    """A model whose most likely token is end-of-text: every sample is empty and ends at EOS."""
    model = _save_tiny(tmp_path / "x")
    with torch.no_grad():  # fixed logits: ln_f outputs e_0, so the logits are lm_head column 0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS, 0] = 50.0
    model.save(tmp_path / "eos")
    out = generate_samples(STAGE_CFG, 0, tmp_path / "eos", None, None, device="cpu")
    assert out["eos_rate"] == 1.0 and out["mean_length_tokens"] == 0.0
    assert all(s.hit_eos and s.text == "" for s in out["samples"])


def test_cli_prints_to_the_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_tiny(tmp_path / "best")
    params = tmp_path / "params.yaml"
    write_params(params, {"seed": 1})
    argv = ["--params", str(params), "--checkpoint", str(tmp_path / "best"), "--prompt",
            "Artificial intelligence is", "--length", "5", "--greedy"]  # fmt: skip
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "Artificial intelligence is" in shown and "sample 1" in shown
    assert not list(tmp_path.glob("*.md"))  # no file without --samples
