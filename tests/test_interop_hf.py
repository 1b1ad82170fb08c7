"""transformers / Hub interop: the GPT-2 weight mapping both ways, the export folders, the mixin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import command_env
from safetensors.torch import load_file, save_file
from tiny_model import EXPORT_ABLATION, EXPORT_IIT, populate, randomise
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from infinito.config import ConfigError, ModelConfig, Params
from infinito.data.tokenize import load_tokenizer
from infinito.interop import InteropError
from infinito.interop.gpt2 import config_from_gpt2, gpt2_to_infinito, infinito_from_gpt2, to_gpt2
from infinito.interop.hf import export_gpt2, export_infinito, export_model, push_folder
from infinito.interop.model_card import model_card
from infinito.model import CheckpointError, Infinito

pytestmark = pytest.mark.usefixtures("hub_offline")

TOL = 1e-4  # max abs logit difference allowed between the two implementations (fp32)
# The mapping alone: any vocabulary. Exports carry GPT-2's tokenizer: its vocabulary.
SMALL = ModelConfig(vocab_size=61, d_model=32, n_layer=2, n_head=4, block_size=32, iit=False)
ABLATION, IIT = EXPORT_ABLATION, EXPORT_IIT
TEXT = "The history of the river town begins with a stone bridge and a wool market."


def build(cfg: ModelConfig, seed: int = 0) -> Infinito:
    torch.manual_seed(seed)
    return Infinito(cfg).eval()


def ids(cfg: ModelConfig, batch: int = 3, length: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


def tiny_gpt2(tmp_path: Path, tie: bool = True, **overrides: object) -> Path:
    """A random GPT-2 at test size, written by save_pretrained (no Hub)."""
    torch.manual_seed(3)
    config = GPT2Config(
        vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tie
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    path = tmp_path / "gpt2-tiny"
    randomise(GPT2LMHeadModel(config)).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- INFINITO -> GPT-2


def test_gpt2_export_computes_infinitos_logits() -> None:
    model = randomise(build(SMALL))
    hf = to_gpt2(model)
    x = ids(SMALL)
    with torch.no_grad():
        diff = (hf(x).logits - model(x).logits).abs().max().item()
    assert diff <= TOL
    # the untied head stays INFINITO's own matrix, not a copy of the embedding
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)


def test_gpt2_export_refuses_a_model_with_iit_parts(tmp_path: Path) -> None:
    with pytest.raises(InteropError, match="IIT parts.*--format infinito"):
        to_gpt2(build(IIT))
    with pytest.raises(InteropError, match="vocab_size=61 is smaller than .* 50257"):
        export_gpt2(build(SMALL), tmp_path / "out", "card")


def test_exported_ablation_loads_in_a_fresh_python_with_only_transformers(
    tmp_path: Path,
) -> None:
    model = randomise(build(ABLATION))
    folder = export_gpt2(model, tmp_path / "export", "---\nlicense: mit\n---\n# card\n")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new" and config["n_positions"] == 32
    assert config["tie_word_embeddings"] is False

    script = tmp_path / "load.py"
    script.write_text(
        "import json, sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "folder, text = sys.argv[1], sys.argv[2]\n"
        "tok = AutoTokenizer.from_pretrained(folder)\n"
        "model = AutoModelForCausalLM.from_pretrained(folder).eval()\n"
        "enc = tok(text, return_tensors='pt')\n"
        "out = model.generate(**enc, max_new_tokens=6, do_sample=False)\n"
        "print(json.dumps({'class': type(model).__name__,\n"
        "  'ids': enc.input_ids[0].tolist(), 'logits': model(enc.input_ids).logits[0].tolist(),\n"
        "  'generated': out[0].tolist(), 'eos': tok.eos_token_id,\n"
        "  'tied': model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(),\n"
        "  'infinito_imported': any(m.split('.')[0] == 'infinito' for m in sys.modules)}))\n"
    )
    env = command_env({"PYTHONPATH": None})
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), TEXT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"] == "GPT2LMHeadModel" and not got["infinito_imported"]
    assert not got["tied"] and got["eos"] == 50256
    assert got["ids"] == load_tokenizer().encode(TEXT)
    x = torch.tensor([got["ids"]])
    with torch.no_grad():
        ours = model(x).logits[0]
        expected = model.generate(x, max_new_tokens=6, temperature=0)[0].tolist()
    assert (torch.tensor(got["logits"]) - ours).abs().max().item() <= TOL
    assert got["generated"] == expected  # transformers' greedy generate = INFINITO's


# ----------------------------------------------------------------------------- GPT-2 -> INFINITO


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("iit", [False, True])
def test_gpt2_weights_give_gpt2s_logits_before_training(
    tmp_path: Path, tie: bool, iit: bool
) -> None:
    folder = tiny_gpt2(tmp_path, tie=tie)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    torch.manual_seed(0)
    model = infinito_from_gpt2(folder, iit=iit, memory_slots=8, phi_chunk=8)
    x = ids(SMALL)
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= TOL
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    if iit:  # fresh IIT parts on top: an empty memory, the initial threshold and phi weights
        assert model.memory is not None and not model.memory.valid.any()
        # the standardised threshold's initial z, and no PHI statistics yet
        assert model.memory.threshold_raw.item() == model.config.threshold_z_init
        assert not model.memory.phi_stats_ready
        assert model.phi_weights is not None
        assert torch.allclose(model.phi_weights.weights(), torch.tensor([0.3, 0.3, 0.2, 0.2]))


def test_gpt2_to_infinito_returns_config_and_a_strict_state_dict(tmp_path: Path) -> None:
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2(tmp_path))
    config, state = gpt2_to_infinito(hf, iit=True, memory_slots=8, phi_chunk=8, dropout=0.0)
    assert (config.vocab_size, config.d_model, config.n_layer) == (61, 32, 2)
    assert (config.n_head, config.block_size, config.dropout) == (4, 32, 0.0)
    model = Infinito(config)
    model.load_state_dict(state, strict=True)
    # Conv1D (in, out) became nn.Linear (out, in)
    conv = hf.transformer.h[0].attn.c_attn.weight
    assert torch.equal(state["transformer.h.0.attn.c_attn.weight"], conv.t())
    assert state["transformer.h.1.mlp.c_fc.weight"].shape == (128, 32)


def test_round_trip_infinito_to_gpt2_and_back_is_exact(tmp_path: Path) -> None:
    model = randomise(build(SMALL))
    to_gpt2(model).save_pretrained(tmp_path / "hf")
    back = infinito_from_gpt2(tmp_path / "hf", iit=False)
    assert back.config == SMALL
    original, restored = model.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"activation_function": "relu"}, "activation_function='relu' must be one of gelu_new"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06 must be 1e-05"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"scale_attn_weights": False}, "scale_attn_weights=False must be true"),
        ({"n_inner": 64}, "n_inner=64 must be null or 4 \\* n_embd = 128"),
    ],
)
def test_incompatible_gpt2_configs_are_errors_naming_the_field(
    override: dict[str, object], match: str
) -> None:
    config = GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    for key, value in override.items():
        setattr(config, key, value)
    with pytest.raises(InteropError, match=match):
        config_from_gpt2(config)


def test_a_contradicting_dimension_names_both_values() -> None:
    config = GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    with pytest.raises(InteropError, match="model.d_model=64 contradicts .* n_embd=32"):
        config_from_gpt2(config, d_model=64)
    with pytest.raises(InteropError, match="model.block_size=256 contradicts .* n_positions=32"):
        config_from_gpt2(config, block_size=256)
    assert config_from_gpt2(config, d_model=32, iit=False).d_model == 32  # agreeing is fine
    with pytest.raises(ConfigError, match="unknown key model.n_embd"):
        config_from_gpt2(config, n_embd=32)


# ----------------------------------------------------------------------------- the IIT folder


def test_iit_export_round_trips_weights_memory_and_logits(tmp_path: Path) -> None:
    model = build(IIT)
    populate(model)
    x = ids(IIT, batch=2)
    with torch.no_grad():
        expected = model(x).logits
    folder = export_infinito(model, tmp_path / "export", "# card\n")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names
    assert json.loads((folder / "config.json").read_text()) == IIT.to_dict()
    loaded = Infinito.from_pretrained(folder)
    assert not loaded.training  # the mixin's convention: eval mode
    assert loaded.memory is not None and loaded.memory.valid.any()  # memory included
    state, back = model.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    # the same two files as Infinito.save: the training checkpoint loader reads the folder too
    assert Infinito.from_checkpoint(folder).config == IIT
    assert AutoTokenizer.from_pretrained(folder).encode(TEXT) == load_tokenizer().encode(TEXT)


def test_from_pretrained_is_strict(tmp_path: Path) -> None:
    model = build(IIT)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    del state["memory.keys"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensors \['memory.keys'\]"):
        Infinito.from_pretrained(tmp_path / "m")
    with pytest.raises(TypeError, match="unexpected arguments \\['strict'\\]"):
        Infinito.from_pretrained(tmp_path / "m", strict=False)


def test_from_pretrained_with_a_repo_id_fetches_the_two_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Hub here: the download functions are replaced by a local 'Hub' that records calls."""
    import huggingface_hub.hub_mixin

    import infinito.model

    hub = tmp_path / "hub" / "user" / "infinito-tiny"
    build(IIT).save_pretrained(hub)
    calls: list[tuple[str, object]] = []

    def hf_hub_download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append((repo_id, filename))
        return str(tmp_path / "hub" / repo_id / filename)

    def snapshot_download(repo_id: str, allow_patterns: list[str], **kwargs: object) -> str:
        calls.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "hub" / repo_id)

    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(infinito.model, "snapshot_download", snapshot_download)
    model = Infinito.from_pretrained("user/infinito-tiny")
    assert model.config == IIT
    assert ("user/infinito-tiny", ("config.json", "model.safetensors")) in calls


def test_push_to_hub_uploads_a_folder_that_from_pretrained_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Hub here: HfApi's two calls are replaced; the uploaded folder is kept and loaded."""
    import huggingface_hub

    uploads: list[tuple[str, Path]] = []

    def create_repo(self: object, repo_id: str, **kwargs: object) -> object:
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self: object, *, repo_id: str, folder_path: Path, **kwargs: object) -> str:
        kept = tmp_path / "uploaded" / str(len(uploads))
        shutil.copytree(folder_path, kept)
        uploads.append((repo_id, kept))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = build(IIT)
    populate(model)
    model.push_to_hub("user/infinito-tiny")
    folder = export_infinito(model, tmp_path / "export", "# card\n")
    url = push_folder(folder, "user/infinito-export")
    assert url.endswith("/commit/0")
    assert [repo for repo, _ in uploads] == ["user/infinito-tiny", "user/infinito-export"]
    state = model.state_dict()
    for _, kept in uploads:
        loaded = Infinito.from_pretrained(kept).state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert (uploads[1][1] / "README.md").read_text() == "# card\n"


# ----------------------------------------------------------------------------- model card, command


def write_run(root: Path, cfg: ModelConfig) -> dict[str, Path]:
    """A checkpoint, the params that describe it and its metrics files, as a run leaves them."""
    build(cfg).save(root / "models" / "best")
    params = Params.from_dict({"model": cfg.to_dict(), "data": {"seq_len": 32}})
    (root / "params.yaml").write_text(json.dumps(params.to_dict()))  # JSON is YAML
    train = {"best_val_loss": 4.123456789, "tokens_trained": 123456, "wall_time_sec": 61.5}
    evaluation = {"test_ppl": 87.654321, "test_word_ppl": 201.5, "validation_ppl": 90.25}
    (root / "metrics").mkdir()
    (root / "metrics" / "train.json").write_text(json.dumps(train))
    (root / "metrics" / "eval.json").write_text(json.dumps(evaluation))
    return {
        "model": root / "models" / "best",
        "params": root / "params.yaml",
        "train": root / "metrics" / "train.json",
        "eval": root / "metrics" / "eval.json",
    }


@pytest.mark.parametrize(("cfg", "fmt"), [(ABLATION, "gpt2"), (IIT, "infinito")])
def test_export_writes_a_model_card_with_the_runs_numbers(
    tmp_path: Path, cfg: ModelConfig, fmt: str
) -> None:
    from huggingface_hub import ModelCard

    run = write_run(tmp_path, cfg)
    folder, used = export_model(
        run["model"], tmp_path / "out", "auto", run["params"], run["train"], run["eval"]
    )
    assert used == fmt
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == ("transformers" if fmt == "gpt2" else "infinito")
    assert card.data.license == "mit" and card.data.datasets == ["Salesforce/wikitext"]
    assert card.data.eval_results[0].metric_value == pytest.approx(87.654321)
    for number in ("4.12346", "123,456", "87.6543", "201.5", "90.25"):
        assert number in card.text
    assert "No instruction tuning" in card.text and "wikitext-2-raw-v1" in card.text
    assert ("The ablation" in card.text) == (fmt == "gpt2")
    assert ("Memory state" in card.text) == (fmt == "infinito")
    if fmt == "gpt2":
        assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "gpt2"
    else:
        assert Infinito.from_pretrained(folder).config == cfg


def test_export_refuses_params_that_describe_another_model(tmp_path: Path) -> None:
    run = write_run(tmp_path, ABLATION)
    build(IIT).save(run["model"])  # the checkpoint changed, params.yaml did not
    with pytest.raises(ConfigError, match="does not describe .*model.iit: params False"):
        export_model(run["model"], tmp_path / "out", "auto", run["params"])


def test_a_card_without_metrics_says_so() -> None:
    card = model_card(build(ABLATION), "gpt2")
    assert "No metrics were given" in card and "Unknown: the export was given no params" in card


def test_export_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infinito.cli import main

    run = write_run(tmp_path, ABLATION)
    monkeypatch.chdir(tmp_path)  # the command's defaults are the pipeline's paths
    assert main(["export"]) == 0
    assert (tmp_path / "exports" / "gpt2" / "model.safetensors").is_file()
    assert main(["export", "--format", "infinito", "--out", "iit-format"]) == 0
    assert Infinito.from_pretrained(tmp_path / "iit-format").config == ABLATION
    run["model"].joinpath("config.json").unlink()
    assert main(["export"]) == 2
