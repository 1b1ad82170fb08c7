"""train.init_from: training starts from GPT-2's weights or another run's checkpoint.

A tiny GPT-2 is made here with transformers (``GPT2LMHeadModel(GPT2Config(...))``, weights of
order one so that its loss is far from a fresh model's ln(V)) and written by save_pretrained: no
Hub. Dropout is 0 and the exploration noise off where a loss is compared, so the first training
step's cross-entropy is a deterministic function of the initial weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    TINY_PIPELINE,
    command_env,
    flatten,
    markov_tokens,
    stage_paths,
    train_cli_args,
    train_outputs,
    write_params,
    write_tokenized,
)
from tiny_model import populate, randomise
from transformers import GPT2Config, GPT2LMHeadModel

from infinito import init
from infinito.batches import TrainData, load_windows
from infinito.checkpoint import load_state
from infinito.config import ConfigError, ModelConfig, Params, TrainConfig, apply_overrides
from infinito.init import InitError, resolve
from infinito.model import Infinito
from infinito.runtime import torch_threads
from infinito.train import TrainingInterrupted, train
from infinito.trainer import Trainer

pytestmark = pytest.mark.usefixtures("hub_offline")

VOCAB = 64
DIMS: dict[str, Any] = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "n_layer": 2,
    "n_head": 2,
    "block_size": 32,
}
BASE: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 4,
    "lr": 1e-3,
    "lambda_phi": 0.1,
    "seed": 1,
    "data": {"seq_len": 32},
    "model": {
        **DIMS,
        "memory_slots": 8,
        "phi_chunk": 8,
        "threshold_init": 1.0,  # below the PHI of these states: the memory is written
        "dropout": 0.0,
        "noise": False,
    },
    "train": {"warmup_steps": 2, "log_every": 5, "device": "cpu"},
}
RTOL = 1e-5  # INFINITO's attention against transformers' on the same fp32 weights


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def params(overrides: dict[str, Any] | None = None) -> Params:
    return Params.from_dict(apply_overrides(BASE, overrides or {}))


def run(p: Params, data: Path, root: Path, **kwargs: Any) -> dict[str, Any]:
    return train(p, data, **train_outputs(root), **kwargs)


def final_state(root: Path) -> dict[str, Any]:
    return load_state(root / "checkpoints" / "state.pt")


def save_gpt2(path: Path, seed: int = 3, **config: Any) -> Path:
    """A random GPT-2 at test size with weights of order one, written by save_pretrained."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    for key, value in config.items():
        setattr(cfg, key, value)
    randomise(GPT2LMHeadModel(cfg), seed=seed).save_pretrained(path)
    return path


@pytest.fixture
def gpt2(tmp_path: Path) -> Path:
    return save_gpt2(tmp_path / "gpt2-tiny")


def first_batch(p: Params, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of the run's first optimizer step."""
    d = TrainData.open(data, p)
    starts = d.epoch_starts(p.seed, 0)
    return load_windows(d.train, starts[: p.batch_size], p.data.seq_len, torch.device("cpu"))


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def first_step_loss(root: Path) -> float:
    """Training cross-entropy of step 1 of a run of ``train.max_steps: 1`` (before its update)."""
    (row,) = final_state(root)["loop"]["history"]
    assert row["step"] == 1
    return row["train_loss"]


def memory_buffers(model: Infinito) -> set[str]:
    """The memory's contents (its slots); its running PHI statistics are calibration."""
    assert model.memory is not None
    return {f"memory.{name}" for name in model.memory.SLOT_BUFFERS}


# ----------------------------------------------------------------------------- from GPT-2


@pytest.mark.parametrize("iit", [True, False])
def test_a_run_from_a_gpt2_folder_starts_at_that_models_loss(
    gpt2: Path, tokenized_data: Callable[..., Path], tmp_path: Path, iit: bool
) -> None:
    data = tokenized_data()
    p = params({"train.init_from": str(gpt2), "train.max_steps": 1, "model.iit": iit})
    x, y = first_batch(p, data)
    with torch.no_grad():
        expected = cross_entropy(GPT2LMHeadModel.from_pretrained(gpt2).eval()(x).logits, y)
    assert abs(expected - torch.log(torch.tensor(float(VOCAB))).item()) > 1.0  # not a fresh loss
    metrics = run(p, data, tmp_path / "run")
    assert first_step_loss(tmp_path / "run") == pytest.approx(expected, rel=RTOL)
    assert metrics["init_from"] == str(gpt2) and "init_revision" not in metrics


def test_gpt2_weights_with_fresh_iit_parts_compute_gpt2s_logits(gpt2: Path) -> None:
    p = params({"train.init_from": str(gpt2)})
    torch.manual_seed(p.seed)
    model = resolve(str(gpt2)).build(p.model)
    assert model.training and model.config == p.model
    hf = GPT2LMHeadModel.from_pretrained(gpt2).eval()
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x).logits, hf(x).logits, atol=1e-4)
    # the IIT parts are the scratch model's at the same seed (drawn after the backbone)
    torch.manual_seed(p.seed)
    scratch = Infinito(p.model).state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(("memory.", "phi_weights.")):
            assert torch.equal(value, scratch[key]), key
    assert model.memory is not None and not model.memory.valid.any()


def test_the_gpt2_ablation_is_exactly_gpt2(gpt2: Path) -> None:
    p = params({"train.init_from": str(gpt2), "model.iit": False})
    model = resolve(str(gpt2)).build(p.model)
    hf = GPT2LMHeadModel.from_pretrained(gpt2)
    assert model.num_params() == hf.num_parameters() + hf.lm_head.weight.numel()  # untied head
    assert model.memory is None and model.phi_weights is None and model.noise is None


# ----------------------------------------------------------------------------- from a checkpoint


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A scratch IIT run (dropout and noise on, memory written): its data and its models/best."""
    root = tmp_path_factory.mktemp("source")
    lengths = {"train": 3000, "validation": 600, "test": 400}
    splits = {s: markov_tokens(n, VOCAB, seed) for seed, (s, n) in enumerate(lengths.items(), 1)}
    data = write_tokenized(root / "tokenized", splits, VOCAB)
    p = params({"model.dropout": 0.1, "model.noise": True, "train.max_steps": 12})
    with torch_threads(1):
        run(p, data, root)
    best = root / "models" / "best"
    assert Infinito.from_checkpoint(best).memory.valid.any()  # type: ignore[union-attr]
    return data, best


def test_a_run_from_a_checkpoint_continues_from_its_weights(
    source_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, best = source_run
    p = params({"train.init_from": str(best), "train.max_steps": 1})
    before: dict[str, torch.Tensor] = {}
    original = Trainer.optimizer_step

    def optimizer_step(self: Trainer, stop: list[int]) -> None:
        if not before:
            before.update({k: v.clone() for k, v in self.model.state_dict().items()})
        original(self, stop)

    monkeypatch.setattr(Trainer, "optimizer_step", optimizer_step)
    run(p, data, tmp_path / "run")

    source = Infinito.from_checkpoint(best)
    empty = memory_buffers(source)
    for key, value in source.state_dict().items():
        if key in empty:  # the memory's contents start empty
            assert not before[key].any(), key
        else:
            assert torch.equal(before[key], value), key
    source.reset_memory()
    x, y = first_batch(p, data)
    with torch.no_grad():
        expected = cross_entropy(source.eval()(x).logits, y)
    assert first_step_loss(tmp_path / "run") == pytest.approx(expected, rel=1e-6)


def test_iit_parts_carry_over_only_when_both_sides_have_them(tmp_path: Path) -> None:
    iit_cfg, plain_cfg = params().model, params({"model.iit": False}).model
    source = randomise(Infinito(iit_cfg))
    populate(source)
    source.save(tmp_path / "iit")
    Infinito(plain_cfg).save(tmp_path / "plain")

    # IIT checkpoint -> the ablation: the backbone only
    plain = resolve(str(tmp_path / "iit")).build(plain_cfg)
    assert plain.memory is None and set(plain.state_dict()) < set(source.state_dict())
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in plain.state_dict().items())

    # IIT checkpoint -> IIT with other non-dimension keys: weights, threshold and PHI weights
    # carried, the memory emptied, its size the new run's
    other = params({"model.memory_slots": 4, "model.threshold_init": 2.0}).model
    model = resolve(str(tmp_path / "iit")).build(other)
    assert model.memory is not None and model.memory.keys.shape[1] == 4
    assert not model.memory.valid.any()
    assert model.memory.threshold.item() == pytest.approx(source.memory.threshold.item())  # type: ignore[union-attr]
    for key, value in model.state_dict().items():
        if key not in memory_buffers(model):
            assert torch.equal(value, source.state_dict()[key]), key

    # ablation checkpoint -> IIT: the backbone carried, the IIT parts a scratch run's
    torch.manual_seed(0)
    model = resolve(str(tmp_path / "plain")).build(iit_cfg)
    torch.manual_seed(0)
    scratch = Infinito(iit_cfg).state_dict()
    backbone = Infinito.from_checkpoint(tmp_path / "plain").state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, backbone[key] if key in backbone else scratch[key]), key


def test_an_exported_infinito_folder_is_a_checkpoint(tmp_path: Path) -> None:
    source = randomise(Infinito(params().model))
    source.save_pretrained(tmp_path / "export")  # what infinito export --format infinito writes
    found = resolve(str(tmp_path / "export"))
    assert found.kind == "infinito"
    model = found.build(params().model)
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)


# ----------------------------------------------------------------------------- resume and DDP


def test_resume_after_interruption_of_a_fine_tune_equals_an_uninterrupted_one(
    gpt2: Path,
    tokenized_data: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tokenized_data()
    p = params(
        {
            "train.init_from": str(gpt2),
            "model.dropout": 0.1,  # everything random that could diverge
            "model.noise": True,
            "train.eval_every_steps": 5,
            "train.max_steps": 14,
        }
    )
    ref = run(p, data, tmp_path / "ref")

    original, calls = Infinito.write_memory, [0]

    def write_memory(self: Infinito, candidates: Any) -> dict[str, Any]:
        calls[0] += 1
        if calls[0] == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, candidates)

    monkeypatch.setattr(Infinito, "write_memory", write_memory)
    with pytest.raises(TrainingInterrupted, match="SIGINT at step"):
        run(p, data, tmp_path / "cut")
    assert not final_state(tmp_path / "cut")["loop"]["complete"]
    monkeypatch.undo()
    resumed = run(p, data, tmp_path / "cut")

    a, b = final_state(tmp_path / "ref"), final_state(tmp_path / "cut")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    timing = {"tokens_per_sec", "wall_time_sec", "eval_time_sec", "first_step_sec"}
    assert {k: v for k, v in ref.items() if k not in timing} == {
        k: v for k, v in resumed.items() if k not in timing
    }


# torchrun's processes: one thread each on 2 shared cores, no terminal, never a user's setup.
DDP_ENV = command_env({"OMP_NUM_THREADS": "1", "CI": "1", "WORLD_SIZE": None, "RANK": None})


def test_two_processes_fine_tune_as_one_does(
    gpt2: Path, tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    """2 gloo processes from the same GPT-2 folder as 1 process: equal up to summation order
    (the tolerances of tests/test_distributed.py)."""
    data = tokenized_data()
    overrides = {"train.init_from": str(gpt2), "train.max_steps": 6, "batch_size": 5}
    run(params(overrides), data, tmp_path / "one")

    root = tmp_path / "two"
    root.mkdir()
    raw = apply_overrides(BASE, {**overrides, "train.nproc_per_node": 2})
    write_params(root / "params.yaml", flatten(raw))
    cmd = [
        sys.executable,
        "-m",
        "infinito.train",
        *train_cli_args(root / "params.yaml", data, root),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DDP_ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launching 2 processes with torchrun" in proc.stderr

    a, b = final_state(tmp_path / "one"), final_state(root)
    assert b["loop"]["step"] == 6
    for name, t in a["model"].items():
        u = b["model"][name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias shifts every score of a query alike, so its gradient is zero up to
            # rounding, which Adam normalises into steps of up to lr: compare queries and values.
            d = DIMS["d_model"]
            t, u = torch.cat([t[:d], t[2 * d :]]), torch.cat([u[:d], u[2 * d :]])
        if t.is_floating_point():
            assert (t - u).abs().max().item() < 2e-4, name
        else:
            assert torch.equal(t, u), name
    (ra,), (rb,) = a["loop"]["history"], b["loop"]["history"]
    assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
    assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)


# ----------------------------------------------------------------------------- the record


def test_the_resume_fingerprint_holds_the_initial_weights(
    gpt2: Path, tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    data = tokenized_data()
    p = params({"train.init_from": str(gpt2), "train.max_steps": 2})
    run(p, data, tmp_path)
    recorded = final_state(tmp_path)["fingerprint_inputs"]["init"]
    assert recorded == resolve(str(gpt2)).record()
    assert set(recorded["files"]) == {"config.json", "model.safetensors"}

    save_gpt2(gpt2, seed=4)  # other weights in the same folder
    with pytest.raises(ConfigError, match="other params or data .*init.files.model.safetensors"):
        run(p, data, tmp_path)
    run(p, data, tmp_path, stale_state="discard")  # DVC's choice: start afresh from the new ones
    assert final_state(tmp_path)["fingerprint_inputs"]["init"] == resolve(str(gpt2)).record()


def test_the_init_stage_writes_the_weights_sha256(gpt2: Path, tmp_path: Path) -> None:
    import hashlib

    params_path = tmp_path / "params.yaml"
    write_params(params_path, flatten(apply_overrides(BASE, {"train.init_from": str(gpt2)})))
    out = tmp_path / "metrics" / "init_from.json"
    assert init.main(["--params", str(params_path), "--out", str(out)]) == 0
    manifest = json.loads(out.read_text())
    digest = hashlib.sha256((gpt2 / "model.safetensors").read_bytes()).hexdigest()
    assert manifest == {
        "init_from": str(gpt2),
        "kind": "gpt2",
        "revision": None,
        "files": {
            "config.json": hashlib.sha256((gpt2 / "config.json").read_bytes()).hexdigest(),
            "model.safetensors": digest,
        },
    }
    scratch = tmp_path / "scratch.yaml"
    write_params(scratch, flatten(BASE))
    assert init.main(["--params", str(scratch), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {
        "init_from": "scratch",
        "kind": "scratch",
        "revision": None,
        "files": {},
    }


# ----------------------------------------------------------------------------- a Hub id


SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of this test's own."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_repo(cache: Path, repo_id: str, files_from: Path) -> None:
    """``repo_id`` at commit SHA in the cache's layout, as a download by transformers leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((files_from / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)


def test_a_hub_id_in_the_local_cache_starts_offline_and_records_its_revision(
    gpt2: Path, hub_cache: Path, tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    cache_repo(hub_cache, "someone/gpt2-tiny", gpt2)
    found = resolve("someone/gpt2-tiny")
    assert (found.kind, found.revision) == ("gpt2", SHA)
    assert resolve(f"someone/gpt2-tiny@{SHA}").revision == SHA  # pinned
    p = params({"train.init_from": "someone/gpt2-tiny", "train.max_steps": 1})
    metrics = run(p, tokenized_data(), tmp_path / "run")
    assert metrics["init_from"] == "someone/gpt2-tiny" and metrics["init_revision"] == SHA
    on_disk = json.loads((tmp_path / "run" / "metrics" / "train.json").read_text())
    assert on_disk["init_revision"] == SHA


def test_a_hub_id_offline_is_an_error_naming_the_offline_starts(hub_cache: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(
        InitError,
        match=r"train.init_from='gpt2': no local folder gpt2 exists, and the Hub model 'gpt2' is "
        r"not in the local Hugging Face cache .* HF_HUB_OFFLINE is set\. Offline starts: a GPT-2 "
        r"folder written by save_pretrained",
    ):
        resolve("gpt2")
    assert time.perf_counter() - t0 < 5


def test_an_unreachable_hub_is_probed_briefly_then_only_the_cache_is_tried(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # closed
    t0 = time.perf_counter()
    with pytest.raises(InitError, match=r"Hub \(http://127.0.0.1:9\) is unreachable\. Offline"):
        resolve("gpt2-medium")
    assert time.perf_counter() - t0 < 10


# ----------------------------------------------------------------------------- errors


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def with_weights(folder: Path) -> Path:
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def a_file(d: Path) -> Path:
    (d / "weights.bin").write_bytes(b"x")
    return d / "weights.bin"


def an_empty_folder(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "absent", r"absent does not exist \(relative paths start at"),
        (a_file, r"weights.bin is a file, not a folder"),
        (an_empty_folder, r"empty has no config.json: it is neither an INFINITO checkpoint"),
        (
            lambda d: write_config(d / "llama", {"model_type": "llama"}),
            r"holds a transformers 'llama' model; INFINITO's backbone loads GPT-2",
        ),
        (
            lambda d: write_config(d / "noweights", {"model_type": "gpt2"}),
            r"holds a GPT-2 config.json but no weights \(model.safetensors",
        ),
        (
            lambda d: write_config(d / "half", ModelConfig().to_dict()),
            r"half has a config.json but no model.safetensors: it is neither an INFINITO",
        ),
        (
            lambda d: with_weights(write_config(d / "odd", {"hidden": 3})),
            r"odd/config.json is not an INFINITO model config \(.*unknown key model.hidden",
        ),
    ],
)
def test_what_is_no_start_is_an_error_naming_it(
    tmp_path: Path, make: Callable[[Path], Path], match: str
) -> None:
    with pytest.raises(InitError, match=match):
        resolve(str(make(tmp_path)))


def test_a_gpt2_that_infinito_cannot_compute_is_an_error(tmp_path: Path) -> None:
    folder = save_gpt2(tmp_path / "relu", activation_function="relu")
    with pytest.raises(InitError, match="cannot compute this GPT-2: .*activation_function='relu'"):
        resolve(str(folder)).check(params().model)


def test_damaged_gpt2_weights_are_an_error_naming_the_start(gpt2: Path) -> None:
    (gpt2 / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InitError, match=r"train.init_from=.*: cannot load a GPT-2 from"):
        resolve(str(gpt2)).build(params().model)


def test_contradicting_dimensions_name_both_values_and_the_overrides(gpt2: Path) -> None:
    wrong = params({"model.d_model": 48, "model.n_head": 4, "model.block_size": 64}).model
    with pytest.raises(
        InitError,
        match=r"model.d_model=48 \(params\) vs 32, model.n_head=4 \(params\) vs 2, "
        r"model.block_size=64 \(params\) vs 32\. .* -S model.d_model=32 -S model.n_head=2 "
        r"-S model.block_size=32$",
    ):
        resolve(str(gpt2)).check(wrong)


def test_a_checkpoint_of_other_dimensions_is_an_error(tmp_path: Path) -> None:
    Infinito(params({"model.n_layer": 1}).model).save(tmp_path / "ckpt")
    with pytest.raises(InitError, match=r"model.n_layer=2 \(params\) vs 1\. .* -S model.n_layer=1"):
        resolve(str(tmp_path / "ckpt")).build(params().model)


def test_a_bad_start_fails_before_any_work(
    gpt2: Path, tokenized_data: Callable[..., Path], tmp_path: Path
) -> None:
    data = tokenized_data()
    with pytest.raises(InitError, match="does not exist"):
        run(params({"train.init_from": str(tmp_path / "nope")}), data, tmp_path / "run")
    with pytest.raises(InitError, match=r"model.d_model=48 \(params\) vs 32"):
        p = params({"train.init_from": str(gpt2), "model.d_model": 48, "model.n_head": 4})
        run(p, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_init_stage_fails_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_path = tmp_path / "params.yaml"
    write_params(params_path, flatten(apply_overrides(BASE, {"train.init_from": "./nope"})))
    out = tmp_path / "init_from.json"
    assert init.main(["--params", str(params_path), "--out", str(out)]) == 2
    assert "init: error: train.init_from='./nope': nope does not exist" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("value", ["", " gpt2"])
def test_init_from_must_be_a_name_without_spaces_around_it(value: str) -> None:
    with pytest.raises(ConfigError, match=r"train.init_from=.* must be 'scratch', a folder"):
        TrainConfig(init_from=value)


def test_the_dimension_keys_are_the_gpt2_mappings() -> None:
    from infinito.interop.gpt2 import DIMENSIONS

    assert tuple(DIMENSIONS) == init.DIMENSIONS


# ----------------------------------------------------------------------------- DVC

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.mark.slow
def test_dvc_retrains_when_the_initial_weights_change_and_only_then(
    dvc_repo: Callable[..., Path], run_cmd: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "gpt2-local"
    gpt2_dims = {"vocab_size": 50257, "n_layer": 1}  # TINY_PIPELINE's model, GPT-2's vocabulary
    save_gpt2(folder, **gpt2_dims)
    repo = dvc_repo(overrides={**TINY_PIPELINE, "train.init_from": str(folder)})
    out = run_cmd(["dvc", "repro", "train"], repo, env=ONE_THREAD).stdout
    assert ran_stages(out) == ["check-params", "download", "tokenize", "init", "train"]
    manifest_path = stage_paths("init")["--out"]  # dvc.yaml's, its one home
    manifest = json.loads((repo / manifest_path).read_text())
    assert manifest["kind"] == "gpt2" and set(manifest["files"]) == {
        "config.json",
        "model.safetensors",
    }
    assert json.loads((repo / "metrics" / "train.json").read_text())["init_from"] == str(folder)

    # unchanged weights: the init stage re-checks them, training is up to date
    status = json.loads(run_cmd(["dvc", "status", "train", "--with-deps", "--json"], repo).stdout)
    assert status == {"init": ["always changed"]}
    again = run_cmd(["dvc", "repro", "train"], repo, env=ONE_THREAD).stdout
    assert ran_stages(again) == ["init"] and "Stage 'train' didn't change, skipping" in again

    # other weights in the same folder: the manifest changes, so training is out of date
    save_gpt2(folder, seed=4, **gpt2_dims)
    run_cmd(["dvc", "repro", "init"], repo)
    status = json.loads(run_cmd(["dvc", "status", "train", "--json"], repo).stdout)
    assert status == {"train": [{"changed deps": {manifest_path: "modified"}}]}
    out = run_cmd(["dvc", "repro", "train"], repo, env=ONE_THREAD).stdout
    assert "Running stage 'train'" in out
    assert "discarding checkpoints/state.pt" in out and "init.files.model.safetensors" in out
