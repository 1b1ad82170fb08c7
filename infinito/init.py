"""Where training starts: random weights, an INFINITO checkpoint, or GPT-2's pretrained weights.

``train.init_from`` names the start (docs/finetuning.md):

- ``scratch``: GPT-2's random initialisation, seeded by ``seed`` (the default);
- a folder holding an INFINITO checkpoint: ``config.json`` of ``model.*`` keys and
  ``model.safetensors``, as ``models/best`` of another run or ``infinito export --format
  infinito`` write;
- a folder written by transformers' ``save_pretrained`` for GPT-2: ``config.json`` with
  ``model_type: gpt2`` and its weights (``infinito export --format gpt2`` writes one too);
- a Hugging Face Hub id (``gpt2``, ``openai-community/gpt2-medium``, an INFINITO export pushed to
  the Hub), optionally pinned as ``id@revision``. A local path that exists wins over a Hub id.

The rules:

- the backbone's dimensions (``DIMENSIONS``: vocab_size, d_model, n_layer, n_head, block_size)
  come from the weights, and params.yaml must say the same: a contradiction is an error naming
  both values and the ``-S`` overrides that fix it. So the run's params stay its true record
  (``dvc exp show``, the resume fingerprint, ``infinito export``'s params check);
- the backbone is always carried over; the IIT parameters (memory projections and null logits,
  the threshold, the PHI weights) are carried over from a checkpoint that has them when
  ``model.*`` has them too, and drawn fresh otherwise, as a scratch run at the same seed draws
  them (GPT-2 has none: all fresh);
- the memory's contents (its slot buffers) start empty: they hold states of the source's last
  training batches, which mean nothing to the new run's data, and an empty memory reads exactly
  zero, so before the first step the model computes the source's logits;
- every other ``model.*`` key (dropout, noise, phi_chunk, memory_slots, ...) is the new run's.

``resolve`` finds the files (no weights read; a Hub id is probed with a short timeout and, when
the Hub is unreachable or ``HF_HUB_OFFLINE`` is set, looked up in the local cache only),
``InitSource.check`` compares dimensions, ``InitSource.record`` is the manifest (sha256 of every
file the weights are read from, the Hub revision), ``InitSource.build`` the initial model.
``python -m infinito.init --out metrics/init_from.json`` is the init stage: DVC runs it at every
``dvc repro`` (``always_changed``) and re-runs training only when its manifest changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from infinito import hub
from infinito.atomic import DiskFull, write_json
from infinito.config import PARAMS_FILE, ConfigError, ModelConfig, stage_params

if TYPE_CHECKING:
    from infinito.model import Infinito

log = logging.getLogger(__name__)

# The params.yaml keys this stage reads: dvc.yaml's init params (tests keep them equal).
PARAMS_KEYS = ("train.init_from",)
SCRATCH = "scratch"
CONFIG_FILE = "config.json"  # INFINITO's checkpoints and transformers' folders alike
# ModelConfig field -> GPT2Config field (infinito.interop.gpt2.DIMENSIONS): what the weights fix.
DIMENSIONS = ("vocab_size", "d_model", "n_layer", "n_head", "block_size")
# GPT-2 weights in the order transformers prefers them: a single file, or an index of shards.
GPT2_WEIGHTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
HUB_FILES = [
    CONFIG_FILE,
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
]
OFFLINE_STARTS = (
    "Offline starts: a GPT-2 folder written by save_pretrained (on a machine with network: "
    "python -c \"from transformers import GPT2LMHeadModel as M; M.from_pretrained('gpt2')"
    ".save_pretrained('pretrained/gpt2')\", copy the folder here, then "
    "-S train.init_from=pretrained/gpt2), an INFINITO checkpoint folder (models/best of another "
    "run, or infinito export's folder), or train.init_from=scratch (docs/finetuning.md)"
)


class InitError(ConfigError):
    """``train.init_from`` names nothing usable, or weights that do not fit ``model.*``."""


def _fail(init_from: str, why: str) -> InitError:
    return InitError(f"train.init_from={init_from!r}: {why}")


@dataclass(frozen=True)
class InitSource:
    """A resolved ``train.init_from``: its kind and the local folder holding its files."""

    init_from: str  # as params.yaml gives it
    kind: Literal["scratch", "infinito", "gpt2"]
    folder: Path | None = None  # a Hub id's snapshot in the local Hugging Face cache
    revision: str | None = None  # the Hub commit a Hub id resolved to

    def files(self) -> list[str]:
        """The files the weights are read from, relative to ``folder``."""
        if self.folder is None:
            return []
        if self.kind == "infinito":
            from infinito.model import WEIGHTS_FILE

            return [CONFIG_FILE, WEIGHTS_FILE]
        return [CONFIG_FILE, *_gpt2_weight_files(self.folder)]

    def dimensions(self) -> dict[str, int]:
        """The backbone's dimensions (``DIMENSIONS``) as the weights fix them; {} for scratch."""
        if self.folder is None:
            return {}
        if self.kind == "infinito":
            from infinito.model import checkpoint_config

            cfg = checkpoint_config(self.folder)
            return {key: getattr(cfg, key) for key in DIMENSIONS}
        from infinito.interop import InteropError
        from infinito.interop.gpt2 import DIMENSIONS as GPT2_FIELDS
        from infinito.interop.gpt2 import check_gpt2_config

        hf = _gpt2_config(self.folder)
        try:
            check_gpt2_config(hf)
        except InteropError as e:
            raise _fail(
                self.init_from, f"INFINITO's backbone cannot compute this GPT-2: {e}"
            ) from e
        return {ours: getattr(hf, theirs) for ours, theirs in GPT2_FIELDS.items()}

    def check(self, model: ModelConfig) -> None:
        """Fail, naming both values and the fix, when ``model.*`` contradicts the weights."""
        dims = self.dimensions()
        wrong = {k: v for k, v in dims.items() if getattr(model, k) != v}
        if not wrong:
            return
        pairs = ", ".join(
            f"model.{k}={getattr(model, k)} (params) vs {v}" for k, v in wrong.items()
        )
        fix = " ".join(f"-S model.{k}={v}" for k, v in wrong.items())
        raise _fail(
            self.init_from,
            f"params.yaml's model section contradicts the weights' dimensions: {pairs}. The "
            "backbone's dimensions come from the weights: set them in params.yaml's model "
            f"section, e.g. dvc exp run -S train.init_from={self.init_from} {fix}",
        )

    def record(self) -> dict[str, Any]:
        """The manifest: the start as given, its kind, the Hub revision and each file's sha256.

        Equal records mean equal initial weights (with equal ``model.*`` and ``seed``).
        """
        assert self.folder is not None or self.kind == SCRATCH
        files = {name: _sha256(self.folder / name) for name in self.files()} if self.folder else {}
        return {
            "init_from": self.init_from,
            "kind": self.kind,
            "revision": self.revision,
            "files": files,
        }

    def metrics(self) -> dict[str, str]:
        """``metrics/train.json``'s keys: the start, and the Hub revision it resolved to."""
        out = {"init_from": self.init_from}
        if self.revision is not None:
            out["init_revision"] = self.revision
        return out

    def describe(self) -> str:
        if self.kind == SCRATCH:
            return "random weights (scratch)"
        what = "an INFINITO checkpoint" if self.kind == "infinito" else "GPT-2 weights"
        if self.revision is None:
            return f"{what} in {self.folder}"
        return f"{what} of the Hub's {self.init_from} at revision {self.revision} ({self.folder})"

    def build(self, model: ModelConfig) -> Infinito:
        """The initial model for ``model.*``, in training mode (seed torch's RNG first: fresh
        parts are drawn as ``Infinito(model)`` draws them)."""
        from infinito.model import Infinito

        self.check(model)
        if self.kind == SCRATCH:
            return Infinito(model)
        assert self.folder is not None
        if self.kind == "gpt2":
            from infinito.interop import InteropError
            from infinito.interop.gpt2 import infinito_from_gpt2, load_gpt2

            try:
                return infinito_from_gpt2(load_gpt2(self.folder), **model.to_dict()).train()
            except InteropError as e:  # e.g. damaged weights
                raise _fail(self.init_from, str(e)) from e
        return _from_checkpoint(Infinito.from_checkpoint(self.folder), Infinito(model))


def _from_checkpoint(source: Infinito, fresh: Infinito) -> Infinito:
    """``fresh`` with every tensor of ``source`` it has too, except the memory's contents (and
    the threshold's parameter when the two measure it differently: ``model.threshold_mode``)."""
    state = fresh.state_dict()
    empty = set()
    if fresh.memory is not None:
        # the slots' contents; the running PHI statistics calibrate the threshold and carry
        empty = {f"memory.{name}" for name in fresh.memory.SLOT_BUFFERS}
        if source.config.threshold_mode != fresh.config.threshold_mode:
            empty.add("memory.threshold_raw")  # softplus^-1 of a PHI value, or a z-score
    carried = {k: v for k, v in source.state_dict().items() if k in state and k not in empty}
    for key, value in carried.items():
        if value.shape != state[key].shape:  # equal dimensions make this a bug
            raise InitError(
                f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(state[key].shape)}"
            )
    state.update(carried)
    fresh.load_state_dict(state, strict=True)
    iit = sorted({k.split(".")[0] for k in carried} & {"memory", "phi_weights"})
    drawn = sorted({k.split(".")[0] for k in state if k not in carried and k not in empty})
    log.info(
        "init: carried over the checkpoint's backbone%s; drawn fresh: %s; the memory starts empty",
        f" and {', '.join(iit)}" if iit else "",
        ", ".join(drawn) or "nothing",
    )
    return fresh.train()


# ----------------------------------------------------------------------------- resolving


def resolve(init_from: str) -> InitSource:
    """Classify ``train.init_from`` and find its files; fails naming what is wrong and the fix."""
    if init_from == SCRATCH:
        return InitSource(init_from, "scratch")
    path = Path(init_from).expanduser()
    if path.exists():
        kind = _folder_kind(init_from, path)
        return InitSource(init_from, kind, path)
    repo_id, _, revision = init_from.partition("@")
    if not _is_hub_id(repo_id):
        raise _fail(
            init_from,
            f"{path} does not exist (relative paths start at {Path.cwd()}); give an INFINITO "
            "checkpoint folder, a GPT-2 save_pretrained folder, a Hugging Face Hub id such as "
            "gpt2, or scratch",
        )
    return _from_hub(init_from, repo_id, revision or None)


def _folder_kind(init_from: str, path: Path) -> Literal["infinito", "gpt2"]:
    """``gpt2`` for a transformers folder (config.json names a model_type), else ``infinito``."""
    neither = (
        "neither an INFINITO checkpoint (config.json of model.* keys and model.safetensors, as "
        "models/best or infinito export write) nor a transformers GPT-2 folder (config.json "
        "with model_type gpt2 and model.safetensors or pytorch_model.bin, as save_pretrained "
        "writes)"
    )
    if not path.is_dir():
        raise _fail(init_from, f"{path} is a file, not a folder: {neither}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise _fail(init_from, f"{path} has no {CONFIG_FILE}: it is {neither}")
    try:
        with config_path.open() as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(init_from, f"cannot read {config_path} ({e}): it is {neither}") from e
    if not isinstance(config, dict):
        raise _fail(init_from, f"{config_path} is not a JSON object: {path} is {neither}")
    if "model_type" not in config:
        from infinito.model import WEIGHTS_FILE, checkpoint_config

        if not (path / WEIGHTS_FILE).is_file():
            raise _fail(
                init_from, f"{path} has a config.json but no {WEIGHTS_FILE}: it is {neither}"
            )
        try:
            checkpoint_config(path)
        except ConfigError as e:
            raise _fail(
                init_from,
                f"{config_path} is not an INFINITO model config ({e}): {path} is {neither}",
            ) from e
        return "infinito"
    if config["model_type"] != "gpt2":
        raise _fail(
            init_from,
            f"{path} holds a transformers {config['model_type']!r} model; INFINITO's backbone "
            "loads GPT-2 (model_type gpt2) only",
        )
    if not _gpt2_weight_files(path):
        names = ", ".join(name for pair in GPT2_WEIGHTS for name in pair)
        raise _fail(init_from, f"{path} holds a GPT-2 config.json but no weights ({names})")
    return "gpt2"


def _gpt2_weight_files(folder: Path) -> list[str]:
    """The weight files transformers would read from ``folder`` (an index and its shards)."""
    for single, index in GPT2_WEIGHTS:
        if (folder / single).is_file():
            return [single]
        if (folder / index).is_file():
            with (folder / index).open() as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [index, *shards]
    return []


def _gpt2_config(folder: Path) -> Any:
    from transformers import GPT2Config

    return GPT2Config.from_pretrained(str(folder))


def _is_hub_id(repo_id: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _from_hub(init_from: str, repo_id: str, revision: str | None) -> InitSource:
    """A Hub id's snapshot (config and safetensors only), downloaded or from the local cache."""
    from huggingface_hub import constants, snapshot_download

    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None and not hub.reachable(f"{constants.ENDPOINT}/api/models/{repo_id}"):
        reason = f"the Hugging Face Hub ({constants.ENDPOINT}) is unreachable"
        log.warning("init: %s; looking for %s in the local cache only", reason, repo_id)
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=HUB_FILES,
                local_files_only=reason is not None,
            )
        )
    except Exception as e:  # not found, gated, offline, incomplete: all end here
        where = f"no local folder {init_from} exists, and the Hub model {repo_id!r}"
        if revision:
            where += f" at revision {revision!r}"
        if reason is not None:
            raise _fail(
                init_from,
                f"{where} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and "
                f"{reason}. {OFFLINE_STARTS}. [{type(e).__name__}: {e}]",
            ) from e
        raise _fail(init_from, f"{where} cannot be fetched ({type(e).__name__}: {e})") from e
    return InitSource(init_from, _folder_kind(init_from, folder), folder, folder.name)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------- the init stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinito init",
        description="Resolve train.init_from and write its manifest (the weights' sha256).",
    )
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    parser.add_argument("--out", type=Path, required=True, help="the manifest (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The init stage: the manifest that the train stage depends on."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        with stage_params(args.params, PARAMS_KEYS) as params:
            source = resolve(params.train.init_from)
            record = source.record()
        write_json(args.out, record)
    except (ConfigError, DiskFull) as e:
        print(f"init: error: {e}", file=sys.stderr)
        return 2
    print(f"init: training starts from {source.describe()}; manifest {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
