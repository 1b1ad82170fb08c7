"""INFINITO as an lm-evaluation-harness model, registered as ``infinito`` on import.

``InfinitoLM`` is lm-eval's ``model="infinito"``; ``infinito lm-eval`` (infinito/cli.py) imports
this module and runs ``lm_eval.simple_evaluate`` (``run_harness``). It follows lm-eval's own
conventions where they exist (context/continuation encoding from ``TemplateLM``, the
end-of-text token as the prefix of an empty context, ``loglikelihood_rolling``'s windows, stop
sequences), so a model without memory scores exactly as the ``hf`` backend scores its GPT-2
export (tests/test_lm_eval.py).

Windows are ``infinito.data.splits.Window``\\ s over one request's tokens (inputs ``start ..
start + length``, the last ``scored`` targets count), so the evaluate stage's ``score`` loop
computes the same numbers from them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from infinito.data.splits import Window
from infinito.data.tokenize import EOS_TOKEN_ID, load_tokenizer
from infinito.interop import InteropError
from infinito.model import CONFIG_FILE, Infinito
from infinito.runtime import autocast, resolve_device, resolve_dtype

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for the hf backend


def rolling_windows(n_tokens: int, max_length: int) -> list[Window]:
    """lm-eval's ``loglikelihood_rolling`` windows over a stream of ``n_tokens`` (prefix first).

    Windows of ``max_length`` inputs, disjoint in their targets: the first scores targets
    1..max_length, each next one the following max_length, each seeing only its own inputs as
    context; the last is moved left to a full ``max_length`` of inputs and scores only the
    targets not yet scored (lm-eval's ``get_rolling_token_windows`` with ``context_len=1``).
    With ``n_tokens - 1`` a multiple of ``max_length``, or at most ``max_length``, these are the
    evaluate stage's non-overlapping windows (= its sliding windows with stride ``max_length``).
    """
    n_targets = n_tokens - 1
    if n_targets < 1:
        return []
    first = min(max_length, n_targets)
    out = [Window(0, first, first)]
    done = first
    while done < n_targets:
        scored = min(max_length, n_targets - done)
        end = done + scored  # the last target's index in the stream
        out.append(Window(end - max_length, max_length, scored))
        done = end
    return out


def continuation_windows(
    n_tokens: int, n_scored: int, max_length: int, feed_memory: bool
) -> list[Window]:
    """Windows scoring the last ``n_scored`` targets of ``n_tokens`` with the most context.

    The scoring window holds the last ``max_length`` inputs (lm-eval's left truncation). With
    ``feed_memory`` the tokens before it come first as unscored windows of ``max_length``, in
    order, so the memory carries the context the window cannot hold.
    """
    if not 1 <= n_scored <= max_length:
        raise InteropError(
            f"a continuation of {n_scored} tokens does not fit the model's context of "
            f"{max_length} tokens"
        )
    length = min(max_length, n_tokens - 1)
    start = n_tokens - 1 - length
    feed = [Window(s, min(max_length, start - s), 0) for s in range(0, start, max_length)]
    return [*(feed if feed_memory else []), Window(start, length, n_scored)]


def _load(pretrained: str | Path, revision: str | None) -> Infinito:
    """An INFINITO checkpoint or Hub repo; a transformers GPT-2 folder or id becomes an ablation."""
    if backend_for(pretrained, revision) == "hf":
        from infinito.interop.gpt2 import infinito_from_gpt2

        return infinito_from_gpt2(str(pretrained), revision=revision, iit=False)
    return Infinito.from_pretrained(str(pretrained), revision=revision)


@register_model("infinito")
class InfinitoLM(TemplateLM):
    """An INFINITO checkpoint (``models/best``, an export folder or a Hub repo) for lm-eval.

    Memory: every request starts from an empty memory (``reset_memory``) and streams its own
    document in order, so nothing leaks between documents or between the candidate answers of
    one document. A request is one document's text (``loglikelihood_rolling``: its windows run
    one after another, each reading what the earlier ones wrote) or one context with one
    continuation (``loglikelihood``, ``generate_until``: the context that does not fit the
    model's window is streamed through first, window by window, and the scoring window or the
    generation reads what it wrote). A request that fits one window reads an empty memory,
    which reads exactly zero: such requests are batched (``batch_size``); streamed ones run
    one window per forward pass. Generation writes nothing. A model without memory batches
    everything and scores exactly like its GPT-2 export under the ``hf`` backend.

    Arguments (``--model_args``): ``pretrained`` (path or Hub id), ``revision``, ``batch_size``,
    ``max_length`` (at most the model's block_size, its default), ``device`` (auto, cpu, cuda,
    cuda:N), ``dtype`` (fp32, the default, bf16, fp16, auto), ``max_gen_toks``.
    """

    def __init__(
        self,
        pretrained: str | Path | Infinito = "models/best",
        revision: str | None = None,
        batch_size: int | str | None = 1,
        max_length: int | str | None = None,
        device: str | None = "auto",
        dtype: str = "fp32",
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,  # accepted from lm-eval's CLI, not used
    ) -> None:
        super().__init__()
        if batch_size is not None and not str(batch_size).isdigit():
            raise InteropError(
                f"batch_size={batch_size!r}: the infinito model takes a positive integer "
                "(windows per forward pass), not 'auto'"
            )
        self._device = resolve_device(device or "auto")
        self._dtype = resolve_dtype(dtype, self._device)
        model = pretrained if isinstance(pretrained, Infinito) else _load(pretrained, revision)
        self.model = model.to(self._device).eval()
        self.batch_size = max(1, int(batch_size or 1))
        block = self.model.config.block_size
        self._max_length = int(max_length) if max_length is not None else block
        if not 1 <= self._max_length <= block:
            raise InteropError(f"max_length={max_length} must be in [1, block_size={block}]")
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer = load_tokenizer()
        self._name = "an Infinito object" if isinstance(pretrained, Infinito) else str(pretrained)

    # ------------------------------------------------------------------ lm-eval's interface

    @property
    def eot_token_id(self) -> int:
        return EOS_TOKEN_ID

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "model_name": self._name,
            "model_num_parameters": self.model.num_params(),
            "model_iit": cfg.iit,
            "model_memory": cfg.use_memory,
        }

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **_: Any
    ) -> list[tuple[float, bool]]:
        plans = []
        for _, context, continuation in requests:
            tokens = context + continuation
            windows = continuation_windows(
                len(tokens), len(continuation), self.max_length, self._has_memory
            )
            plans.append((tokens, windows))
        results = self._score(plans)
        for (args, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], **_: Any) -> list[float]:
        plans = []
        for request in requests:
            tokens = [self.prefix_token_id, *self.tok_encode(request.args[0])]
            plans.append((tokens, rolling_windows(len(tokens), self.max_length)))
        results = [logprob for logprob, _ in self._score(plans)]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests: list[Instance], **_: Any) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            text = self._generate(context, gen_kwargs)
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    # ------------------------------------------------------------------ scoring

    @property
    def _has_memory(self) -> bool:
        return self.model.memory is not None

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> Any:
        """One forward pass over rows of input ids, right-padded (causal: padding is unseen)."""
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        with autocast(self._device, self._dtype):
            return self.model(x.to(self._device))

    def _window_logprob(
        self, logits: torch.Tensor, tokens: list[int], w: Window
    ) -> tuple[float, bool]:
        """Sum of log-probabilities of ``w``'s scored targets and whether all are greedy;
        ``logits`` (length, V) of the window's inputs."""
        logp = F.log_softmax(logits[w.length - w.scored : w.length].float(), dim=-1)
        targets = torch.tensor(
            tokens[w.start + w.length - w.scored + 1 : w.start + w.length + 1],
            device=logp.device,
        )
        total = logp.gather(1, targets[:, None]).sum()
        greedy = bool((logp.argmax(-1) == targets).all())
        return float(total), greedy

    def _score(self, plans: list[tuple[list[int], list[Window]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each request's scored targets; see the class docstring."""
        results: list[list[Any]] = [[0.0, True] for _ in plans]
        batched = [
            (i, w)
            for i, (_, windows) in enumerate(plans)
            if not self._has_memory or len(windows) == 1
            for w in windows
        ]
        batched.sort(key=lambda item: -item[1].length)  # similar lengths share a batch
        # batched windows read an empty memory: exactly zero (stream memories: one per row)
        self.model.reset_memory(rows=self.batch_size)
        for b in range(0, len(batched), self.batch_size):
            chunk = batched[b : b + self.batch_size]
            rows = [plans[i][0][w.start : w.start + w.length] for i, w in chunk]
            logits = self._forward(rows).logits
            for row, (i, w) in enumerate(chunk):
                logprob, greedy = self._window_logprob(logits[row, : w.length], plans[i][0], w)
                results[i][0] += logprob
                results[i][1] &= greedy
        for i, (tokens, windows) in enumerate(plans):
            if self._has_memory and len(windows) > 1:
                results[i] = list(self._stream(tokens, windows))
        return [(float(a), bool(b)) for a, b in results]

    def _stream(self, tokens: list[int], windows: list[Window]) -> tuple[float, bool]:
        """One request's windows in order, from an empty memory, writing after each."""
        self.model.reset_memory(rows=1)  # a stream memory: the request is one stream
        total, greedy = 0.0, True
        for w in windows:
            out = self._forward([tokens[w.start : w.start + w.length]])
            if w.scored:
                logprob, g = self._window_logprob(out.logits[0], tokens, w)
                total, greedy = total + logprob, greedy and g
            self.model.write_memory(out.candidates)
        return total, greedy

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(
            kwargs.pop("until", None), eos=self.tok_decode([EOS_TOKEN_ID])
        )
        max_new = int(kwargs.pop("max_gen_toks"))
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        tokens = self.tok_encode(context) or [self.prefix_token_id]
        keep = self.max_length - max_new if max_new < self.max_length else self.max_length
        head, prompt = tokens[: max(0, len(tokens) - keep)], tokens[-keep:]
        self.model.reset_memory(rows=1)
        if self._has_memory and head:  # the context beyond the window goes through the memory
            for s in range(0, len(head), self.max_length):
                self.model.write_memory(self._forward([head[s : s + self.max_length]]).candidates)
        idx = torch.tensor([prompt], dtype=torch.long, device=self._device)
        with autocast(self._device, self._dtype):
            out = self.model.generate(
                idx,
                max_new_tokens=max_new,
                temperature=temperature,
                top_k=kwargs.get("top_k"),
                top_p=kwargs.get("top_p"),
                eos_token_id=EOS_TOKEN_ID,
            )
        new = out[0, len(prompt) :].tolist()
        if EOS_TOKEN_ID in new:
            new = new[: new.index(EOS_TOKEN_ID)]
        return postprocess_generated_text(self.tok_decode(new), stop=until, think_end_token=None)


def flat_results(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``results`` as flat numeric keys: ``{task}_{metric}`` (``_{filter}`` unless
    the filter is ``none``), e.g. ``wikitext_word_perplexity``, ``hellaswag_acc_norm_stderr``."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or "," not in key:
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}_{metric}" if filt == "none" else f"{task}_{metric}_{filt}"
            if isinstance(value, float) and not math.isfinite(value):
                continue  # lm-eval reports "N/A" stderr as a string, rare infinities as well
            out[name] = float(value)
    return out


# ----------------------------------------------------------------------------- the command

HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "auto"}


def backend_for(model: str | Path, revision: str | None = None) -> str:
    """``hf`` for a transformers model (its config.json has a ``model_type``), else ``infinito``.

    Reads the local folder's config.json, or the Hub repo's (which needs the network).
    """
    path = Path(model)
    if path.is_dir():
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise InteropError(f"{path} has no {CONFIG_FILE}: not a model directory")
    else:
        from huggingface_hub import hf_hub_download

        try:
            config_path = Path(hf_hub_download(str(model), CONFIG_FILE, revision=revision))
        except Exception as e:  # offline, unknown repo, bad id: the same advice for all
            raise InteropError(
                f"{model} is not a local directory, and its {CONFIG_FILE} cannot be fetched "
                f"from the Hugging Face Hub ({type(e).__name__}: {e}); give a checkpoint or "
                "export folder, or a Hub model id with network access"
            ) from e
    with config_path.open() as f:
        return "hf" if "model_type" in json.load(f) else "infinito"


def run_harness(
    model: str | Path,
    tasks: Sequence[str],
    backend: str = "auto",
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "fp32",
    max_length: int | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: Path | None = None,
    revision: str | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Score ``model`` on lm-eval ``tasks`` with the ``infinito`` or ``hf`` backend; lm-eval's
    results dict. ``include_path`` adds a directory of task YAMLs (local tasks)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if backend == "auto":
        backend = backend_for(model, revision)
    dev = resolve_device(device)
    if backend == "infinito":
        args: dict[str, Any] = {"pretrained": str(model), "revision": revision, "dtype": dtype}
    elif backend == "hf":
        if dtype not in HF_DTYPES:
            raise InteropError(f"dtype {dtype!r} must be one of {', '.join(HF_DTYPES)}")
        args = {"pretrained": str(model), "dtype": HF_DTYPES[dtype]}
        if revision:
            args["revision"] = revision
    else:
        raise InteropError(f"backend {backend!r} must be auto, infinito or hf")
    if max_length is not None:
        args["max_length"] = max_length
    results = lm_eval.simple_evaluate(
        model=backend,
        model_args={k: v for k, v in args.items() if v is not None},
        tasks=list(tasks),
        batch_size=batch_size,
        device=str(dev),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=str(include_path) if include_path else None),
        log_samples=log_samples,
    )
    if results is None:  # only on a non-zero rank of a distributed run
        raise InteropError("lm-eval returned no results")
    results["backend"] = backend
    return results
