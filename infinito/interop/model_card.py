"""The model card (``README.md``) of an export folder: what the model is, how it was trained and
scored, and what it is not.

Numbers come from the run's ``metrics/train.json`` and ``metrics/eval.json`` as they are; the
card says where a metric is missing instead of inventing one. The front matter is
``huggingface_hub.ModelCardData``, so the Hub shows the license, library, datasets and the test
perplexity in its model index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from infinito.config import WIKITEXT_SOURCES, Params
from infinito.model import Infinito

Format = Literal["gpt2", "infinito"]

# Headline numbers, in this order, when the metrics files have them.
HEADLINE = {
    "test_ppl": "test perplexity (non-overlapping windows)",
    "test_sliding_ppl": "test perplexity (sliding windows)",
    "test_word_ppl": "test word-level perplexity (non-overlapping)",
    "test_sliding_word_ppl": "test word-level perplexity (sliding)",
    "test_bits_per_byte": "test bits per byte",
    "validation_ppl": "validation perplexity",
    "test_memory_contribution_ppl": "test perplexity gained from memory reads",
    "best_val_loss": "best validation loss (train stage, nats/token)",
    "tokens_trained": "tokens trained",
    "wall_time_sec": "training wall time (s)",
}


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}"


def _numeric(metrics: Mapping[str, Any] | None) -> dict[str, int | float]:
    if not metrics:
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _dataset(source: str | None) -> tuple[list[str] | None, str]:
    """Hub dataset ids and a sentence for ``data.source``."""
    if source in WIKITEXT_SOURCES:
        return ["Salesforce/wikitext"], (
            f"WikiText (`Salesforce/wikitext`, config `{source}`): English Wikipedia Good and "
            "Featured articles, with its own train/validation/test split."
        )
    if source == "builtin":
        return None, (
            "The builtin corpus: Python's reference documentation (`pydoc_data.topics`, about "
            "0.46 MB), a smoke-test corpus far too small for a useful language model."
        )
    if source is None:
        return None, "Unknown: the export was given no params file."
    return None, f"A local corpus (`data.source: {source}`)."


def _usage(fmt: Format, repo: str) -> str:
    if fmt == "gpt2":
        return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained("{repo}")  # a plain GPT2LMHeadModel
ids = tok("The history of", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=True, top_k=50)[0]))
```

lm-evaluation-harness runs it unchanged: `lm_eval --model hf --model_args pretrained={repo}`."""
    return f"""```python
from transformers import AutoTokenizer
from infinito.model import Infinito  # pip install the INFINITO repository

model = Infinito.from_pretrained("{repo}")   # eval mode, memory as saved
model.reset_memory()                           # start from an empty memory
tok = AutoTokenizer.from_pretrained("{repo}")
ids = tok("The history of", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, top_k=50)[0]))
```

lm-evaluation-harness: `infinito lm-eval --model {repo} --tasks wikitext` (INFINITO's registered
`infinito` model class; memory reset per document, streamed in document order)."""


def _architecture(model: Infinito) -> str:
    cfg = model.config
    rows = [
        ("layers", str(cfg.n_layer)),
        ("model width (d_model)", str(cfg.d_model)),
        ("attention heads", str(cfg.n_head)),
        ("context (block_size, learned positions)", str(cfg.block_size)),
        ("vocabulary (GPT-2 BPE)", f"{cfg.vocab_size:,}"),
        ("dropout", _number(cfg.dropout)),
        ("output head", "untied from the token embedding, no bias"),
    ]
    if cfg.use_memory:
        rows += [
            ("memory slots", str(cfg.memory_slots)),
            ("PHI chunk (tokens per memory candidate)", str(cfg.phi_chunk)),
            ("initial read/write threshold (PHI scale 0-10)", _number(cfg.threshold_init)),
        ]
    rows += [(f"parameters: {k}", f"{v:,}") for k, v in model.param_breakdown().items() if v]
    return _table(rows, ("", "value"))


def _training(params: Params | None) -> str:
    if params is None:
        return "Not recorded: the export was given no params file."
    t = params.train
    rows = [
        ("epochs", str(params.epochs)),
        ("batch size (sequences)", str(params.batch_size)),
        ("sequence length (tokens)", str(params.data.seq_len)),
        ("peak learning rate", _number(params.lr)),
        ("schedule", f"{t.schedule}, {t.warmup_steps} warmup steps"),
        ("weight decay", _number(t.weight_decay)),
        ("AdamW betas", f"{_number(t.beta1)}, {_number(t.beta2)}"),
        ("gradient clip", _number(t.grad_clip)),
        ("lambda_phi (Delta-Phi loss weight)", _number(params.lambda_phi)),
        ("seed", str(params.seed)),
    ]
    return _table(rows, ("param", "value"))


def _metrics(train: Mapping[str, Any] | None, evaluation: Mapping[str, Any] | None) -> str:
    numbers = {**_numeric(train), **_numeric(evaluation)}
    if not numbers:
        return "No metrics were given to the export (metrics/train.json, metrics/eval.json)."
    head = [(label, _number(numbers[k])) for k, label in HEADLINE.items() if k in numbers]
    parts = [_table(head, ("metric", "value"))] if head else []
    for name, m in (("metrics/train.json", train), ("metrics/eval.json", evaluation)):
        rows = [(f"`{k}`", _number(v)) for k, v in _numeric(m).items()]
        if rows:
            parts.append(
                f"<details><summary>All of {name}</summary>\n\n"
                f"{_table(rows, ('key', 'value'))}\n\n</details>"
            )
        else:
            parts.append(f"{name}: not given.")
    return "\n\n".join(parts)


def _caveats(model: Infinito, source: str | None) -> str:
    items = [
        "**No instruction tuning.** A base language model trained only to continue text: no "
        "chat format, no RLHF, no safety tuning. It will continue any prompt, including with "
        "false or offensive text.",
        "**Small data, small model.** "
        + (
            "WikiText-2 has about two million words of Wikipedia to train on, so the model knows "
            "little about the world and writes encyclopedic English at best."
            if source in WIKITEXT_SOURCES[:2]
            else "Its knowledge is limited to the training corpus named above."
        ),
        "**Perplexity protocol.** The numbers above use INFINITO's evaluate stage (windows of "
        "`data.seq_len` tokens over each split joined into one stream). They are not directly "
        "comparable to published numbers under other protocols; score models side by side with "
        "lm-evaluation-harness instead (docs/export.md in the INFINITO repository).",
    ]
    if model.config.iit:
        items.append(
            "**PHI is a proxy.** PHI is an integrated-information-inspired statistic of hidden "
            "states (temporal coherence, integration, complexity, attention diversity), not "
            "Tononi's Phi, and says nothing about consciousness."
        )
    if model.config.use_memory:
        items.append(
            "**Memory state.** The external memory's slots are saved with the weights as "
            "training left them. Results depend on what the memory holds: call "
            "`model.reset_memory()` before scoring unrelated text (INFINITO's evaluation resets "
            "it per pass, its lm-eval wrapper per document)."
        )
    else:
        items.append(
            "**The ablation.** This model is INFINITO with `model.iit: false`: the same backbone, "
            "data, seed and schedule as the IIT model, without memory, PHI loss or noise. It is "
            "the control that measures what the IIT parts add, and a plain GPT-2."
        )
    return "\n".join(f"- {item}" for item in items)


def model_card(
    model: Infinito,
    fmt: Format,
    params: Params | None = None,
    train_metrics: Mapping[str, Any] | None = None,
    eval_metrics: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """The card's text (YAML front matter + Markdown) for an export of ``model`` as ``fmt``."""
    source = params.data.source if params is not None else None
    datasets, data_text = _dataset(source)
    kind = "IIT model" if model.config.iit else "ablation (model.iit: false)"
    name = f"INFINITO V5.2, {kind}"
    evals = None
    test_ppl = _numeric(eval_metrics).get("test_ppl")
    if test_ppl is not None and datasets:
        evals = [
            EvalResult(
                task_type="text-generation",
                dataset_type=datasets[0],
                dataset_name=f"WikiText ({source})",
                dataset_config=source,
                dataset_split="test",
                metric_type="perplexity",
                metric_value=float(test_ppl),
                metric_name="token perplexity (INFINITO evaluate stage, non-overlapping windows)",
            )
        ]
    data = ModelCardData(
        language="en",
        license="mit",
        library_name="transformers" if fmt == "gpt2" else "infinito",
        pipeline_tag="text-generation",
        tags=["infinito", "causal-lm", *(["gpt2"] if fmt == "gpt2" else ["iit-memory"])],
        datasets=datasets,
        model_name=name,
        eval_results=evals,
    )
    what = (
        "a standard transformers `GPT2LMHeadModel` folder: no custom code"
        if fmt == "gpt2"
        else "an `Infinito.save_pretrained` folder (weights, memory buffers, config)"
    )
    body = f"""# {name}

INFINITO V5.2 is a causal GPT-2-style transformer over GPT-2's BPE with an optional
IIT-inspired external memory. This folder is {what}, with GPT-2's tokenizer.

## Use

{_usage(fmt, repo_id or "path/to/this/folder")}

## Architecture

Pre-norm GPT-2 blocks (causal self-attention, 4x tanh-GELU MLP), learned positions, final
LayerNorm.{
        " At the middle layer every position reads an external memory of chunk summaries by "
        "cross-attention; chunks whose PHI exceeds a learned threshold are written to it."
        if model.config.use_memory
        else ""
    }

{_architecture(model)}

## Training data

{data_text} Tokenized with GPT-2's byte-level BPE: per split, the non-empty lines joined with
newlines, no end-of-text tokens between them.

## Training

{_training(params)}

## Metrics

{_metrics(train_metrics, eval_metrics)}

## Caveats

{_caveats(model, source)}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card)
