"""Typed configuration: one frozen dataclass per section of ``params.yaml``.

This module imports no torch, so any part of INFINITO (and the Prefect flows) can read and
validate parameters cheaply. Building a section rejects unknown keys, wrong types and invalid
values with an error that names the key and says what is allowed::

    >>> ModelConfig(d_model=512, n_head=7)
    ConfigError: model.n_head=7 must divide model.d_model=512

``load_params(path)`` reads the whole file into ``Params`` (every key must be there: a missing
one is an error naming it, never a silent default); ``apply_overrides`` applies dotted
``key=value`` overrides (``{"lr": 1e-4, "model.iit": False}``) the way ``dvc exp run -S`` does.
``stage_params`` is how each stage's ``main`` reads its params: it reads the stage's keys again
when the stage ends and fails it if they changed meanwhile, so dvc.lock never records values
the outputs were not computed with.
Every reader of ``params.yaml`` goes through ``parse_yaml``, the parser DVC itself uses
(``ruamel.yaml``, YAML 1.2), so the stages, the Prefect flow's pre-check and DVC agree on what
the file says; ``write_params`` edits it as DVC does, keeping its comments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.representer import RoundTripRepresenter

WIKITEXT_SOURCES = (
    "wikitext-2-raw-v1",
    "wikitext-2-v1",
    "wikitext-103-raw-v1",
    "wikitext-103-v1",
)
SPLITS = ("train", "validation", "test")
PARAMS_FILE = "params.yaml"  # DVC's default params file, at the repository root
# Inference numerics for CPU decoding (infinito/quantize.py): fp32 as trained, bf16 weights,
# int8 dynamic quantization of the linear layers.
INFERENCE_DTYPES = ("fp32", "bf16", "int8")


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type or out of range; the message names it."""


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r} {allowed}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it normalised (lists become tuples)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        _fail(key, value, f"must be {_type_name(tp)}")
    if origin is Literal:
        if value in get_args(tp) and type(value) is type(get_args(tp)[0]):
            return value
        _fail(key, value, f"must be one of {', '.join(repr(a) for a in get_args(tp))}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            _fail(key, value, f"must be {_type_name(tp)}")
        (item_tp, *_) = get_args(tp)
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        _fail(key, value, "must be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(key, value, "must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(key, value, "must be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .inf and .nan are floats too
                _fail(key, value, "must be a finite number (not inf or nan)")
            return float(value)
        _fail(key, value, "must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(key, value, "must be a string")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module


class Section:
    """Mixin for section dataclasses: strict construction from a mapping."""

    SECTION: typing.ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, prefix: str | None = None) -> typing.Self:
        prefix = cls.SECTION if prefix is None else prefix
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix} must be a mapping of keys to values, got {data!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown key {_join(prefix, unknown[0])}; allowed keys in "
                f"{prefix or 'the top level'}: {', '.join(names)}"
            )
        values = {k: _coerce(_join(prefix, k), v, hints[k]) for k, v in data.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            return v

        return plain(self)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        _fail(key, value, allowed)


@dataclass(frozen=True)
class DataConfig(Section):
    """``data``: where the corpus comes from and how it is cut into windows."""

    SECTION: typing.ClassVar[str] = "data"

    source: str = "wikitext-2-raw-v1"  # builtin | a WikiText config | a local path
    seq_len: int = 256  # tokens per training window
    split_fractions: tuple[float, ...] = (0.9, 0.05, 0.05)  # train/validation/test

    def __post_init__(self) -> None:
        _check(
            bool(self.source.strip()),
            "data.source",
            self.source,
            f"must be 'builtin', one of {', '.join(WIKITEXT_SOURCES)}, or a local path",
        )
        _check(self.seq_len >= 2, "data.seq_len", self.seq_len, "must be at least 2")
        f = self.split_fractions
        _check(
            len(f) == 3 and all(x > 0 for x in f) and abs(sum(f) - 1.0) < 1e-6,
            "data.split_fractions",
            list(f),
            "must be three positive fractions (train, validation, test) summing to 1",
        )


@dataclass(frozen=True)
class ModelConfig(Section):
    """``model``: INFINITO V5.2's dimensions and IIT switches. Defaults are the seed's."""

    SECTION: typing.ClassVar[str] = "model"

    vocab_size: int = 50257  # GPT-2 BPE
    d_model: int = 512
    n_layer: int = 6
    n_head: int = 8
    block_size: int = 256  # learned positions: the longest context
    dropout: float = 0.1
    iit: bool = True  # master switch; False is the ablation
    memory: bool = True  # IIT-guided external memory
    phi_loss: bool = True  # Delta-Phi auxiliary loss
    noise: bool = True  # exploration noise in training
    memory_slots: int = 256  # per memory (per stream with memory_scope: stream)
    memory_scope: Literal["shared", "stream"] = "shared"  # one memory, or one per batch row
    memory_write_fraction: float = 0.0625  # most slots one write may change, as a fraction
    phi_chunk: int = 32  # tokens per PHI chunk (one memory candidate per chunk)
    threshold_mode: Literal["absolute", "standardised"] = "standardised"
    threshold_init: float = 3.0  # absolute: the initial threshold on the PHI scale [0, 10]
    threshold_z_init: float = 0.0  # standardised: initial threshold in std above mean PHI
    threshold_temperature: float = 0.5  # read-gate softness (PHI units, or std: standardised)
    noise_std: float = 0.05  # relative to each token's hidden-state RMS
    phi_priority_weight: float = 0.8  # eviction priority weight on PHI vs usage

    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "n_layer", "n_head", "block_size"):
            v = getattr(self, key)
            _check(v >= 1, f"model.{key}", v, "must be a positive integer")
        _check(
            self.d_model % self.n_head == 0,
            "model.n_head",
            self.n_head,
            f"must divide model.d_model={self.d_model}",
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        _check(
            self.memory_slots >= 1,
            "model.memory_slots",
            self.memory_slots,
            "must be a positive integer",
        )
        _check(
            self.phi_chunk >= 2,
            "model.phi_chunk",
            self.phi_chunk,
            "must be at least 2 (PHI compares consecutive states within a chunk)",
        )
        _check(
            0.0 < self.threshold_init < 10.0,
            "model.threshold_init",
            self.threshold_init,
            "must be in (0, 10), the PHI scale",
        )
        _check(
            0.0 < self.memory_write_fraction <= 1.0,
            "model.memory_write_fraction",
            self.memory_write_fraction,
            "must be in (0, 1] (1: a write may replace every slot, the seed's behaviour)",
        )
        _check(
            -5.0 <= self.threshold_z_init <= 5.0,
            "model.threshold_z_init",
            self.threshold_z_init,
            "must be in [-5, 5] (standard deviations of candidate PHI around its mean)",
        )
        _check(
            self.threshold_temperature > 0,
            "model.threshold_temperature",
            self.threshold_temperature,
            "must be positive",
        )
        _check(self.noise_std >= 0, "model.noise_std", self.noise_std, "must be >= 0")
        _check(
            0.0 <= self.phi_priority_weight <= 1.0,
            "model.phi_priority_weight",
            self.phi_priority_weight,
            "must be in [0, 1]",
        )

    @property
    def use_memory(self) -> bool:
        return self.iit and self.memory

    @property
    def use_phi_loss(self) -> bool:
        return self.iit and self.phi_loss

    @property
    def use_noise(self) -> bool:
        return self.iit and self.noise and self.noise_std > 0

    @property
    def stream_memory(self) -> bool:
        """One memory per stream: training and evaluation read the data as batch-row streams.
        The ablation ignores ``memory_scope``."""
        return self.use_memory and self.memory_scope == "stream"

    @property
    def use_phi(self) -> bool:
        """PHI is computed whenever any IIT part needs it."""
        return self.use_memory or self.use_phi_loss


@dataclass(frozen=True)
class TrainConfig(Section):
    """``train``: optimisation, schedule, evaluation cadence, early stopping, hardware."""

    SECTION: typing.ClassVar[str] = "train"

    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    eval_every_steps: int = 0  # 0: once per epoch only
    patience: int = 3  # epochs without improvement before stopping
    min_delta: float = 0.001
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: default mode on CUDA (falls back to eager if it fails); true: default mode anywhere;
    # a torch.compile mode: that mode anywhere (no fallback); false: eager
    compile: (
        bool
        | Literal[
            "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
        ]
    ) = "auto"
    max_steps: int | None = None
    log_every: int = 50
    nproc_per_node: int = 1
    micro_batch_size: int | None = None  # windows per forward pass per process; None: whole share
    init_from: str = "scratch"  # scratch | an INFINITO checkpoint folder | a GPT-2 folder or Hub id

    def __post_init__(self) -> None:
        _check(
            bool(self.init_from.strip()) and self.init_from == self.init_from.strip(),
            "train.init_from",
            self.init_from,
            "must be 'scratch', a folder (an INFINITO checkpoint or a transformers GPT-2 "
            "save_pretrained folder) or a Hugging Face Hub id such as gpt2, without spaces "
            "around it",
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(
            0.0 <= self.min_lr_ratio <= 1.0,
            "train.min_lr_ratio",
            self.min_lr_ratio,
            "must be in [0, 1]",
        )
        _check(
            0.0 < self.plateau_factor < 1.0,
            "train.plateau_factor",
            self.plateau_factor,
            "must be in (0, 1)",
        )
        _check(
            self.plateau_patience >= 0,
            "train.plateau_patience",
            self.plateau_patience,
            "must be >= 0",
        )
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        for key in ("beta1", "beta2"):
            v = getattr(self, key)
            _check(0.0 <= v < 1.0, f"train.{key}", v, "must be in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        _check(
            self.eval_every_steps >= 0,
            "train.eval_every_steps",
            self.eval_every_steps,
            "must be >= 0 (0: once per epoch)",
        )
        _check(self.patience >= 1, "train.patience", self.patience, "must be at least 1")
        _check(self.min_delta >= 0, "train.min_delta", self.min_delta, "must be >= 0")
        dev = self.device
        _check(
            dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
            "train.device",
            dev,
            "must be auto, cpu, cuda or cuda:N",
        )
        _check(
            self.max_steps is None or self.max_steps >= 1,
            "train.max_steps",
            self.max_steps,
            "must be null or a positive integer",
        )
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be at least 1")
        _check(
            self.nproc_per_node >= 1,
            "train.nproc_per_node",
            self.nproc_per_node,
            "must be at least 1",
        )
        _check(
            self.micro_batch_size is None or self.micro_batch_size >= 1,
            "train.micro_batch_size",
            self.micro_batch_size,
            "must be null or a positive integer",
        )


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """``evaluate``: perplexity protocols."""

    SECTION: typing.ClassVar[str] = "evaluate"

    batch_size: int = 16  # equal to the seed batch_size: validation then matches training's
    sliding_stride: int | None = None  # None: seq_len // 2
    splits: tuple[Literal["train", "validation", "test"], ...] = ("validation", "test")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "must be >= 1")
        _check(
            self.sliding_stride is None or self.sliding_stride >= 1,
            "evaluate.sliding_stride",
            self.sliding_stride,
            "must be null or >= 1",
        )
        _check(
            len(self.splits) >= 1,
            "evaluate.splits",
            list(self.splits),
            "must name at least one of train, validation, test",
        )


@dataclass(frozen=True)
class GenerateConfig(Section):
    """``generate``: prompts and sampling settings for the samples stage."""

    SECTION: typing.ClassVar[str] = "generate"

    prompts: tuple[str, ...] = (
        "Artificial intelligence is",
        "The history of",
        "In the beginning",
        "Scientists have discovered",
    )
    max_new_tokens: int = 100
    samples_per_prompt: int = 2
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    repetition_penalty: float = 1.1  # 1.0 disables

    def __post_init__(self) -> None:
        _check(
            len(self.prompts) >= 1 and all(p.strip() for p in self.prompts),
            "generate.prompts",
            list(self.prompts),
            "must be a list of non-empty strings",
        )
        _check(
            self.max_new_tokens >= 1, "generate.max_new_tokens", self.max_new_tokens, "must be >= 1"
        )
        _check(
            self.samples_per_prompt >= 1,
            "generate.samples_per_prompt",
            self.samples_per_prompt,
            "must be >= 1",
        )
        _check(
            self.temperature >= 0,
            "generate.temperature",
            self.temperature,
            "must be >= 0 (0: greedy)",
        )
        _check(self.top_k >= 0, "generate.top_k", self.top_k, "must be >= 0 (0 disables)")
        _check(
            0.0 < self.top_p <= 1.0, "generate.top_p", self.top_p, "must be in (0, 1] (1 disables)"
        )
        _check(
            self.repetition_penalty >= 1.0,
            "generate.repetition_penalty",
            self.repetition_penalty,
            "must be >= 1 (1 disables)",
        )


@dataclass(frozen=True)
class BenchmarkConfig(Section):
    """``benchmark``: the inference benchmark's grid."""

    SECTION: typing.ClassVar[str] = "benchmark"

    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_lengths: tuple[int, ...] = (16, 128)
    new_tokens: int = 64
    repeats: int = 5
    warmup: int = 1
    hf_reference: bool = True
    # CPU decoding variants timed at batch 1 against HF's fp32 generate, with their test
    # perplexity; empty: none (the seed's benchmark). fp32 is always the reference.
    quantized_variants: tuple[str, ...] = ()
    quantized_ppl_tokens: int = 32768  # test-split tokens each variant scores; 0: all

    def __post_init__(self) -> None:
        for v in self.quantized_variants:
            _check(
                v in INFERENCE_DTYPES[1:],
                "benchmark.quantized_variants",
                list(self.quantized_variants),
                f"must list only {', '.join(INFERENCE_DTYPES[1:])}",
            )
        _check(
            self.quantized_ppl_tokens >= 0,
            "benchmark.quantized_ppl_tokens",
            self.quantized_ppl_tokens,
            "must be >= 0 (0: the whole test split)",
        )
        for key in ("batch_sizes", "prompt_lengths"):
            v = getattr(self, key)
            _check(
                len(v) >= 1 and all(x >= 1 for x in v),
                f"benchmark.{key}",
                list(v),
                "must be a non-empty list of positive integers",
            )
        _check(self.new_tokens >= 1, "benchmark.new_tokens", self.new_tokens, "must be >= 1")
        _check(self.repeats >= 1, "benchmark.repeats", self.repeats, "must be >= 1")
        _check(self.warmup >= 0, "benchmark.warmup", self.warmup, "must be >= 0")


@dataclass(frozen=True)
class Params(Section):
    """The whole of ``params.yaml``: the seed's top-level flags and one section per concern."""

    SECTION: typing.ClassVar[str] = ""
    _SECTIONS: typing.ClassVar[dict[str, type[Section]]] = {
        "data": DataConfig,
        "model": ModelConfig,
        "train": TrainConfig,
        "evaluate": EvaluateConfig,
        "generate": GenerateConfig,
        "benchmark": BenchmarkConfig,
    }

    epochs: int = 20
    batch_size: int = 16
    lr: float = 2.0e-4
    lambda_phi: float = 0.1
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "must be a positive integer")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be a positive integer")
        _check(self.lr > 0, "lr", self.lr, "must be positive")
        _check(self.lambda_phi >= 0, "lambda_phi", self.lambda_phi, "must be >= 0 (0 disables)")
        _check(self.seed >= 0, "seed", self.seed, "must be a non-negative integer")
        _check(
            self.data.seq_len <= self.model.block_size,
            "data.seq_len",
            self.data.seq_len,
            f"must be <= model.block_size={self.model.block_size} (the model's context)",
        )
        stride = self.evaluate.sliding_stride
        _check(
            stride is None or stride <= self.data.seq_len,
            "evaluate.sliding_stride",
            stride,
            f"must be <= data.seq_len={self.data.seq_len}",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, prefix: str | None = None) -> Params:
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"params must be a mapping of keys to values, got {data!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown key {unknown[0]}; allowed top-level keys: {', '.join(allowed)}"
            )
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls._SECTIONS:
                values[key] = cls._SECTIONS[key].from_dict(value, key)
            else:
                values[key] = _coerce(key, value, hints[key])
        return cls(**values)


# ----------------------------------------------------------------------------- reading YAML


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text as DVC does: ``ruamel.yaml``'s safe loader, YAML 1.2.

    So ``1e-4`` and ``1e-05`` are floats (DVC's ``-S lr=1e-5`` writes the latter), only
    ``true``/``false`` are booleans (``model.iit: yes`` stays the string ``'yes'`` and fails
    validation instead of silently becoming True), and a key given twice in one mapping is an
    error instead of the last one silently winning. ``source`` names the text in errors.
    """
    try:
        return YAML(typ="safe").load(text)
    except DuplicateKeyError as e:
        found = re.search(r'duplicate key "(.*?)" with value', str(e.problem))
        key = repr(found.group(1)) if found else str(e.problem)
        line = f" (line {e.problem_mark.line + 1})" if e.problem_mark is not None else ""
        raise ConfigError(f"{source}: duplicate key {key}{line}: give each key once") from e
    except YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from e


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file of the pipeline (``params.yaml``, ``dvc.yaml``) with ``parse_yaml``."""
    path = Path(path)
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The raw mapping of a params file (unvalidated: ``Params.from_dict`` checks it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"params file {path} not found; run from the repository root or pass --params"
        )
    return read_yaml(path) or {}


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate ``params.yaml``; ``overrides`` maps dotted keys to values.

    The file must give every key (``check_complete``): a key left out is an error naming it,
    never a silent default, so the file (and DVC's record of it) describes the whole run.
    """
    return params_from(read_params(path), str(path), overrides)


def params_from(
    data: dict[str, Any], source: str, overrides: dict[str, Any] | None = None
) -> Params:
    """Validate the raw mapping of the params file ``source`` (``overrides`` applied first)."""
    if overrides:
        data = apply_overrides(data, overrides)
    params = Params.from_dict(data)
    check_complete(data, source)
    return params


def missing_keys(data: dict[str, Any]) -> list[str]:
    """The dotted keys of ``Params`` that the raw mapping ``data`` does not give."""

    def walk(defaults: dict[str, Any], given: Any, prefix: str) -> list[str]:
        given = given if isinstance(given, dict) else {}
        out: list[str] = []
        for key, default in defaults.items():
            if key not in given:
                out.append(f"{prefix}{key}")
            elif isinstance(default, dict):
                out += walk(default, given[key], f"{prefix}{key}.")
        return out

    return walk(Params().to_dict(), data, "")


def check_complete(data: dict[str, Any], source: str) -> None:
    """Every key of the schema must be in the params file ``source`` (its raw mapping ``data``)."""
    missing = missing_keys(data)
    if not missing:
        return
    defaults = Params().to_dict()
    shown = []
    for key in missing[:5]:
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        shown.append(f"{key} (default {value!r})" if not isinstance(value, dict) else key)
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise ConfigError(
        f"{source} lacks {', '.join(shown)}{more}: give every key (docs/params.md lists them "
        f"with their defaults), so the file and DVC's record of it describe the whole run"
    )


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as ``key: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


# ----------------------------------------------------------------------------- stages' params


class ParamsChanged(ConfigError):
    """The params file changed while a stage ran: DVC would record values it did not use."""


_ABSENT = "<absent>"


def param_values(data: Any, keys: Sequence[str] | None) -> dict[str, Any]:
    """The raw values of the dotted ``keys`` (dvc.yaml's ``params`` of a stage) in ``data``;
    ``None``: the whole mapping. A key that is not there maps to ``"<absent>"``."""
    if keys is None:
        return dict(data) if isinstance(data, dict) else {"": data}
    out: dict[str, Any] = {}
    for dotted in keys:
        node: Any = data
        for part in dotted.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        out[dotted] = node
    return out


@contextlib.contextmanager
def stage_params(
    path: str | Path,
    keys: Sequence[str] | None,
    overrides: dict[str, Any] | None = None,
) -> Iterator[Params]:
    """Load a stage's params, and when the block ends without an error, read the file again:
    if any of ``keys`` (the stage's ``params`` in dvc.yaml; None: the whole file) changed
    meanwhile, raise ``ParamsChanged`` naming them.

    DVC records a stage's params in dvc.lock from the file as it is when the command exits, so
    an edit during the run (another ``dvc exp run -S`` rewriting params.yaml) would be recorded
    against outputs computed with the old values. Failing the stage keeps dvc.lock true.
    """
    path = Path(path)
    data = read_params(path)
    before = param_values(data, keys)
    yield params_from(data, str(path), overrides)
    try:
        after = param_values(read_params(path), keys)
    except ConfigError as e:
        raise ParamsChanged(
            f"{path} can no longer be read ({e}) after this stage ran; its outputs were "
            f"computed with the values read at the start; restore the file and rerun"
        ) from e
    changed = diff_keys(before, after)
    if changed:
        what = "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
        raise ParamsChanged(
            f"{path} changed while this stage ran ({what}): its outputs were computed with the "
            f"values read at the start, so the stage fails rather than let DVC record the new "
            f"ones; rerun it (dvc repro) to compute with the new values"
        )


class _ParamsRepresenter(RoundTripRepresenter):
    """Writes None as ``null``, as params.yaml spells it (ruamel's default leaves it empty)."""

    def represent_none(self, data: Any) -> Any:
        return self.represent_scalar("tag:yaml.org,2002:null", "null")


_ParamsRepresenter.add_representer(type(None), _ParamsRepresenter.represent_none)


def write_params(
    path: str | Path, overrides: dict[str, Any] | None = None, base: str | Path | None = None
) -> None:
    """Write the params file ``base`` (default: ``path`` itself) to ``path`` with dotted-key
    ``overrides`` set, as ``dvc exp run -S`` edits it: a round trip through ``ruamel.yaml``
    that keeps comments, key order, quotes and every untouched line."""
    source = Path(path if base is None else base)
    yaml = YAML()  # round-trip
    yaml.Representer = _ParamsRepresenter
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's layout
    if not source.is_file():
        raise ConfigError(f"params file {source} not found")
    data = yaml.load(source.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys to values")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    with Path(path).open("w", encoding="utf-8") as f:
        yaml.dump(data, f)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the raw params mapping with dotted-key overrides applied.

    Values given as strings are parsed as YAML (``"1e-4"`` -> 1e-4, ``"false"`` -> False), as
    ``dvc exp run -S key=value`` does.
    """
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        _set_dotted(out, dotted, value)
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted`` = ``a.b.c`` (a string value parsed first)."""
    if isinstance(value, str):
        value = parse_yaml(value, f"override {dotted}") if value.strip() else value
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
        node = child
    node[leaf] = value
