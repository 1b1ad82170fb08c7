"""params.yaml and infinito/config.py: every key loads, bad input fails naming the key."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import COMMITTED_PARAMS

from infinito.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    Params,
    TrainConfig,
    load_params,
    parse_yaml,
    read_params,
    write_params,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS = COMMITTED_PARAMS  # never the workspace's file, which experiments rewrite


def _raw() -> dict[str, Any]:
    return read_params(PARAMS)


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _get(params: Params, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _write(tmp_path: Path, values: dict[str, Any]) -> Path:
    """params.yaml with dotted keys set to exactly these values (strings stay strings)."""
    data = _raw()
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_every_params_key_loads_with_its_value() -> None:
    params = load_params(PARAMS)
    leaves = _leaves(_raw())
    assert len(leaves) > 50
    for key, value in leaves.items():
        loaded = _get(params, key)
        expected = tuple(value) if isinstance(value, list) else value
        assert loaded == expected, key


def test_every_config_field_is_in_params_yaml() -> None:
    """The schema and the committed file list the same keys (no field without a documented key)."""
    params = load_params(PARAMS)
    fields = set(_leaves(params.to_dict()))
    assert fields == set(_leaves(_raw()))


def test_dataclass_defaults_are_the_seed_configuration() -> None:
    assert load_params(PARAMS) == Params()


def test_seed_values() -> None:
    p = load_params(PARAMS)
    assert (p.epochs, p.batch_size, p.lr, p.lambda_phi, p.seed) == (20, 16, 2e-4, 0.1, 42)
    assert p.data.seq_len == 256
    m = p.model
    assert (m.vocab_size, m.d_model, m.n_layer, m.n_head, m.memory_slots) == (50257, 512, 6, 8, 256)
    assert (m.iit, m.memory, m.phi_loss, m.noise) == (True, True, True, True)
    assert (m.threshold_init, m.phi_priority_weight) == (3.0, 0.8)
    assert (p.train.device, p.train.precision, p.train.compile) == ("auto", "auto", "auto")
    assert "Artificial intelligence is" in p.generate.prompts
    assert (p.generate.max_new_tokens, p.generate.temperature) == (100, 0.8)


def test_sections_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_params(PARAMS).model.d_model = 64  # type: ignore[misc]


def test_config_does_not_import_torch() -> None:
    code = "import sys, infinito.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epoch": 3}, r"unknown key epoch; allowed top-level keys: epochs"),
        ({"model.n_heads": 8}, r"unknown key model\.n_heads; allowed keys in model: .*n_head"),
        ({"train.warmup": 10}, r"unknown key train\.warmup"),
    ],
)
def test_unknown_key_fails_naming_it(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_params(_write(tmp_path, overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.d_model": "512"}, r"model\.d_model='512' must be an integer"),
        ({"epochs": 2.5}, r"epochs=2\.5 must be an integer"),
        ({"model.iit": "yes"}, r"model\.iit='yes' must be true or false"),
        ({"batch_size": True}, r"batch_size=True must be an integer"),
        ({"lr": "fast"}, r"lr='fast' must be a number"),
        ({"train.compile": "maybe"}, r"train\.compile='maybe' must be bool \| 'auto'"),
        ({"train.schedule": "linear"}, r"train\.schedule='linear' must be one of 'cosine'"),
        ({"evaluate.splits": ["test", "dev"]}, r"evaluate\.splits\[1\]='dev' must be one of"),
        ({"generate.prompts": "hello"}, r"generate\.prompts='hello' must be a list of str"),
        ({"model": [1, 2]}, r"model must be a mapping"),
    ],
)
def test_wrong_type_fails_naming_the_key(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_params(_write(tmp_path, overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.n_head": 7}, r"model\.n_head=7 must divide model\.d_model=512"),
        ({"lr": -1.0}, r"lr=-1\.0 must be positive"),
        ({"data.split_fractions": [0.9, 0.1, 0.1]}, r"data\.split_fractions=.* summing to 1"),
        ({"data.seq_len": 512}, r"data\.seq_len=512 must be <= model\.block_size=256"),
        ({"data.source": " "}, r"data\.source=' ' must be 'builtin'"),
        ({"model.dropout": 1.0}, r"model\.dropout=1\.0 must be in \[0, 1\)"),
        ({"train.device": "gpu"}, r"train\.device='gpu' must be auto, cpu, cuda or cuda:N"),
        ({"generate.top_p": 0.0}, r"generate\.top_p=0\.0 must be in \(0, 1\]"),
        ({"benchmark.batch_sizes": []}, r"benchmark\.batch_sizes=\[\] must be a non-empty list"),
        ({"evaluate.sliding_stride": 300}, r"evaluate\.sliding_stride=300 must be <= data"),
        ({"model.memory_scope": "batch"}, r"model\.memory_scope='batch' must be one of 'shared'"),
        ({"model.memory_write_fraction": 0.0}, r"model\.memory_write_fraction=0\.0 must be in"),
        ({"model.threshold_mode": "z"}, r"model\.threshold_mode='z' must be one of 'absolute'"),
        ({"model.threshold_z_init": 9.0}, r"model\.threshold_z_init=9\.0 must be in \[-5, 5\]"),
    ],
)
def test_invalid_value_fails_naming_the_key(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_params(_write(tmp_path, overrides))


def test_sections_validate_on_construction() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_head=7 must divide model\.d_model=512"):
        ModelConfig(d_model=512, n_head=7)
    with pytest.raises(ConfigError, match=r"unknown key data\.sorce"):
        DataConfig.from_dict({"sorce": "builtin"})
    assert TrainConfig.from_dict({"compile": False}).compile is False
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        assert TrainConfig.from_dict({"compile": mode}).compile == mode


def test_compile_setting_to_torch_compile_mode() -> None:
    from torch import device

    from infinito.runtime import compile_mode

    cpu, cuda = device("cpu"), device("cuda")
    assert [compile_mode("auto", d) for d in (cpu, cuda)] == [None, "default"]
    assert [compile_mode(True, d) for d in (cpu, cuda)] == ["default", "default"]
    assert [compile_mode(False, d) for d in (cpu, cuda)] == [None, None]
    assert compile_mode("reduce-overhead", cpu) == compile_mode("reduce-overhead", cuda)
    assert compile_mode("max-autotune", cuda) == "max-autotune"


def test_exponent_floats_load_as_dvc_writes_them(tmp_path: Path) -> None:
    """``dvc exp run -S lr=1e-5`` writes ``lr: 1e-05``, which plain PyYAML reads as a string."""
    text = PARAMS.read_text().replace("lr: 2.0e-4", "lr: 1e-05")
    assert "lr: 1e-05" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_params(path).lr == 1e-5


def test_overrides_parse_values_as_dvc_does() -> None:
    p = load_params(PARAMS, overrides={"lr": "1e-4", "model.iit": "false", "batch_size": "32"})
    assert (p.lr, p.model.iit, p.batch_size) == (1e-4, False, 32)
    assert load_params(PARAMS, overrides={"data.source": "data/corpus.txt"}).data.source == (
        "data/corpus.txt"
    )
    with pytest.raises(ConfigError, match=r"override epochs\.x: epochs is not a section"):
        load_params(PARAMS, overrides={"epochs.x": 1})


def test_only_true_and_false_are_booleans(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text().replace("iit: true", "iit: yes"))
    with pytest.raises(ConfigError, match=r"model\.iit='yes' must be true or false"):
        load_params(path)


def test_duplicate_key_fails(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text() + "\nlr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr'"):
        load_params(path)


def test_write_params_edits_like_dvc_keeping_comments(tmp_path: Path) -> None:
    """Overrides are set in place: every comment and untouched line survives the round trip."""
    overrides = {"lr": "1e-4", "model.iit": False, "evaluate.splits": ["test"]}
    path = tmp_path / "params.yaml"
    write_params(path, overrides, base=PARAMS)
    assert load_params(path) == load_params(PARAMS, overrides)
    text = path.read_text()
    comments = [line for line in PARAMS.read_text().splitlines() if line.lstrip().startswith("#")]
    assert comments and all(c in text for c in comments)
    assert "# peak learning rate" in text and "# master switch" in text  # inline ones too
    untouched = [line for line in PARAMS.read_text().splitlines() if "seq_len" in line]
    assert all(line in text for line in untouched)
    write_params(path, {"seed": 7})  # in place, from its own content
    assert load_params(path) == load_params(PARAMS, {**overrides, "seed": 7})


def test_only_config_reads_yaml() -> None:
    """One YAML parser for params.yaml (DVC's): no other module imports a YAML library."""
    importers: dict[str, set[str]] = {}
    files = [f for d in ("infinito", "pipelines", "scripts") for f in (REPO_ROOT / d).rglob("*.py")]
    assert len(files) > 20
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for top in {n.split(".")[0] for n in names} & {"yaml", "ruamel"}:
                importers.setdefault(file.relative_to(REPO_ROOT).as_posix(), set()).add(top)
    assert importers == {"infinito/config.py": {"ruamel"}}


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"params file .* not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_params(bad)


def test_params_reference_page_is_complete_and_true() -> None:
    """docs/params.md's table: every key once, its default, and the stages dvc.yaml gives it to."""
    page = (REPO_ROOT / "docs" / "params.md").read_text()
    table = page[page.index("# Params reference") :]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| [^|]+ \| ([^|]+) \|$", table, re.M)
    documented = {key: (default.strip(), stages.strip()) for key, default, stages in rows}
    assert len(rows) == len(documented), "a key is listed twice"
    leaves = _leaves(_raw())
    assert set(documented) == set(leaves), "docs/params.md's table and params.yaml differ"
    with (REPO_ROOT / "dvc.yaml").open() as f:
        stages = yaml.safe_load(f)["stages"]
    for key, (default, readers) in documented.items():
        if default.startswith("`"):
            assert parse_yaml(default.strip("`"), key) == leaves[key], key
        expected = [
            name
            for name, stage in stages.items()
            if any(key == p or key.startswith(f"{p}.") for p in stage.get("params", []))
        ]
        assert readers.split(", ") == expected, f"{key}: docs say {readers}, dvc.yaml {expected}"


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", ".NaN"])
@pytest.mark.parametrize("key", ["lr", "lambda_phi", "model.dropout", "train.grad_clip"])
def test_float_params_reject_inf_and_nan(tmp_path: Path, key: str, text: str) -> None:
    """``dvc exp run -S lr=.inf`` used to train (NaN at step 2): YAML's inf and nan are floats."""
    path = tmp_path / "params.yaml"
    write_params(path, {key: text}, base=PARAMS)
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=\S+ must be a finite number"):
        load_params(path)


def test_every_float_field_rejects_inf() -> None:
    """Each float key of every section, through the dataclasses' one type check."""
    floats = [k for k, v in _leaves(Params().to_dict()).items() if isinstance(v, float)]
    assert len(floats) > 15
    for key in floats:
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}=inf must be a finite"):
            Params.from_dict(
                {key.split(".")[0]: {key.split(".")[1]: math.inf}}
                if "." in key
                else {key: math.inf}
            )


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("  dropout: 0.1", r"lacks model\.dropout \(default 0\.1\)"),
        ("lr: 2.0e-4", r"lacks lr \(default 0\.0002\)"),
    ],
)
def test_a_key_missing_from_the_file_is_an_error_naming_it(
    tmp_path: Path, remove: str, message: str
) -> None:
    """No silent default: the file (and dvc.lock's record of it) states every value."""
    lines = PARAMS.read_text().splitlines()
    kept = [line for line in lines if not line.startswith(remove)]
    assert len(kept) == len(lines) - 1
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(kept) + "\n")
    with pytest.raises(ConfigError, match=message):
        load_params(path)
    section = tmp_path / "no-section.yaml"
    section.write_text(PARAMS.read_text().split("\nbenchmark:")[0] + "\n")
    with pytest.raises(ConfigError, match=r"lacks benchmark: give every key"):
        load_params(section)
