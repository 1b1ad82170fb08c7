"""evaluate stage: perplexity, bits per byte, word-level perplexity and IIT statistics.

``python -m infinito.evaluate --model models/best --data data/tokenized
--metrics metrics/eval.json`` loads the best checkpoint and scores every split in
``evaluate.splits`` under two protocols:

* **non-overlapping** (the seed's): the split is cut into consecutive windows of ``seq_len``
  inputs; window ``i`` reads tokens ``[i*seq_len, (i+1)*seq_len)`` and predicts the next token at
  each position. A shorter last window covers the tail, so every token but the first is scored
  exactly once; early positions in each window see little context.
* **sliding**: windows of ``seq_len`` inputs advance by ``stride`` (``evaluate.sliding_stride``,
  default ``seq_len // 2``). The first window scores all its targets, each later one only the
  targets not yet scored (its last ``stride``), so every token is again scored exactly once, now
  with at least ``seq_len - stride`` tokens of context.

Perplexity is ``exp(sum NLL / tokens scored)`` over the whole split (token-weighted, never a mean
of batch means); bits per byte divides the same NLL sum by ``ln 2`` and the split's UTF-8 byte
count, word-level perplexity by its whitespace word count (both from ``meta.json``).

Memory: the model runs in eval mode, its memory is reset at the start of each pass and the
windows stream in order; after each batch the model writes that batch's candidates, so later
windows read what earlier ones wrote (the model's normal operation; a write only becomes
readable in a later call, so no window reads its own future). With the shared memory, windows
in one batch read the same memory, so with the memory on, results depend on
``evaluate.batch_size``; with stream memories (``model.memory_scope: stream``) the windows are
cut into ``evaluate.batch_size`` contiguous streams, each with its own memory, emptied where its
stream enters a new document, as in training (docs/memory.md). Each pass is repeated with memory
reads disabled: the difference is the memory's contribution. For a model without memory (the
ablation) reads are already off and the ``*_no_memory`` keys repeat the main numbers. The
non-overlapping pass's write statistics (``{split}_memory_accepted_fraction`` and the others of
``infinito.iit.WRITE_STATS``) are means over its writes; a statistic no write measured (no
rejected candidate, no eviction) is left out.

The scoring loop is ``infinito/scoring.py`` (training's validation runs the same one); the split
readers and window protocols are ``infinito/data/splits.py``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from infinito.atomic import DiskFull, write_json
from infinito.config import PARAMS_FILE, ConfigError, Params, stage_params
from infinito.data.splits import (
    check_vocab,
    nonoverlapping_windows,
    open_split,
    read_documents,
    read_meta,
    sliding_windows,
)
from infinito.runtime import resolve_device, resolve_dtype
from infinito.scoring import Score, perplexity, score

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
# The params.yaml keys this stage reads: dvc.yaml's evaluate params (tests keep them equal).
PARAMS_KEYS = ("data.seq_len", "evaluate", "train.device", "train.precision")


# ----------------------------------------------------------------------------- the stage


def _split_metrics(
    prefix: str, main: Score, no_memory: Score, split_meta: dict[str, Any]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for suffix, s in (("", main), ("_no_memory", no_memory)):
        out[f"{prefix}loss{suffix}"] = s.loss
        out[f"{prefix}ppl{suffix}"] = s.ppl
        if split_meta.get("bytes"):
            out[f"{prefix}bits_per_byte{suffix}"] = s.nll_sum / LN2 / split_meta["bytes"]
        if split_meta.get("words"):
            out[f"{prefix}word_ppl{suffix}"] = perplexity(s.nll_sum / split_meta["words"])
    # Positive: the memory lowers the loss.
    out[f"{prefix}memory_contribution_loss"] = no_memory.loss - main.loss
    out[f"{prefix}memory_contribution_ppl"] = no_memory.ppl - main.ppl
    return out


def evaluate(params: Params, model_dir: Path, data_dir: Path, metrics_path: Path) -> dict[str, Any]:
    """Score ``evaluate.splits`` under both protocols and write flat metrics to ``metrics_path``."""
    from infinito.model import Infinito, checkpoint_config

    cfg = params.evaluate
    seq_len = params.data.seq_len
    stride = cfg.sliding_stride or max(1, seq_len // 2)
    meta = read_meta(data_dir)
    checkpoint_config(model_dir)  # no checkpoint: fail before choosing a device
    device = resolve_device(params.train.device)
    dtype = resolve_dtype(params.train.precision, device)
    model = Infinito.from_checkpoint(model_dir, map_location="cpu").to(device)
    mcfg = model.config
    if seq_len > mcfg.block_size:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds the checkpoint's model.block_size={mcfg.block_size}"
        )
    check_vocab(
        mcfg.vocab_size,
        meta["vocab_size"],
        f"the checkpoint in {model_dir}",
        f"the tokenizer in {Path(data_dir) / 'meta.json'}",
    )
    splits = {s: open_split(data_dir, s, meta) for s in cfg.splits}

    metrics: dict[str, Any] = {"seq_len": seq_len, "sliding_stride": stride}
    seconds = 0.0
    scored = 0
    for split, tokens in splits.items():
        split_meta = meta["splits"].get(split, {})
        protocols = {
            "": nonoverlapping_windows(len(tokens), seq_len),
            "sliding_": sliding_windows(len(tokens), seq_len, stride),
        }
        metrics[f"{split}_tokens"] = len(tokens) - 1
        docs = read_documents(data_dir, split, meta) if mcfg.stream_memory else None
        for infix, windows in protocols.items():
            main = score(model, tokens, windows, cfg.batch_size, device, dtype, documents=docs)
            if mcfg.use_memory:
                no_mem = score(
                    model, tokens, windows, cfg.batch_size, device, dtype, False, documents=docs
                )
            else:
                no_mem = main  # reads are already off: the same computation
            seconds += main.seconds + (no_mem.seconds if no_mem is not main else 0.0)
            scored += main.tokens * (2 if no_mem is not main else 1)
            metrics.update(_split_metrics(f"{split}_{infix}", main, no_mem, split_meta))
            if infix == "":
                metrics.update(
                    {
                        f"{split}_{k}": v
                        for k, v in main.stats.items()
                        if k not in ("threshold", "aux_loss") and not k.startswith("phi_weight_")
                    }
                )
                if main.memory:  # the memory at the end of the pass
                    metrics[f"{split}_memory_utilisation"] = main.memory["memory_utilisation"]
                    metrics[f"{split}_stored_phi_mean"] = main.memory["stored_phi_mean"]
                metrics.update(
                    {f"{split}_{k}": v for k, v in main.writes.items() if math.isfinite(v)}
                )
            log.info(
                "%s %s: loss %.4f  ppl %.2f  (no memory: ppl %.2f)",
                split,
                infix.rstrip("_") or "non-overlapping",
                main.loss,
                main.ppl,
                no_mem.ppl,
            )
    metrics.update({f"iit_{k}": v for k, v in model.iit_stats().items()})
    metrics["n_params"] = model.num_params()
    metrics["eval_tokens_per_sec"] = scored / seconds if seconds > 0 else 0.0
    write_json(metrics_path, metrics)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line. Paths have no defaults: dvc.yaml's command gives them."""
    parser = argparse.ArgumentParser(
        prog="infinito evaluate",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="checkpoint directory (model.safetensors + config.json)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="tokenized data directory ({split}.bin + meta.json)",
    )
    parser.add_argument("--metrics", type=Path, required=True, help="eval.json to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        with stage_params(args.params, PARAMS_KEYS) as params:
            metrics = evaluate(params, args.model, args.data, args.metrics)
    except (ConfigError, DiskFull) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in metrics if k.endswith("_ppl") and "memory" not in k]
    print("  ".join(f"{k}={metrics[k]:.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
