"""Every damaged input and a full disk end in one line naming the file and the fix, exit 2.

Damaged: a truncated or garbage ``models/best/model.safetensors`` or ``config.json`` (evaluate,
generate, benchmark, export), a truncated ``data/tokenized/meta.json`` (train, evaluate), token
ids outside the vocabulary in a ``.bin`` (train, evaluate). A full disk while tokenize, download
or the trainer's save writes (``OSError(ENOSPC)`` raised inside ``infinito/atomic.py``'s
writers): "no space left ..., nothing was overwritten; free space and rerun".
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import train_cli_args, write_params, write_tokenized

from infinito import benchmark, cli, evaluate, generate, train
from infinito.atomic import atomic_dir, atomic_open
from infinito.config import ModelConfig
from infinito.data import download, tokenize
from infinito.model import Infinito

MODEL = {"vocab_size": 64, "d_model": 32, "n_layer": 1, "n_head": 2, "block_size": 32}
TINY = {
    "epochs": 1,
    "batch_size": 4,
    "data.seq_len": 16,
    **{f"model.{k}": v for k, v in MODEL.items()},
    "model.memory_slots": 8,
    "model.phi_chunk": 8,
    "train.device": "cpu",
    "train.compile": False,
    "train.max_steps": 3,
    "train.warmup_steps": 1,
    "evaluate.batch_size": 4,
    "generate.max_new_tokens": 2,
    "generate.samples_per_prompt": 1,
    "benchmark.batch_sizes": [1],
    "benchmark.prompt_lengths": [4],
    "benchmark.new_tokens": 2,
    "benchmark.repeats": 1,
    "benchmark.warmup": 0,
    "benchmark.hf_reference": False,
}
NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------- damaged checkpoints


def _damage(kind: str, ckpt: Path) -> Path:
    weights, config = ckpt / "model.safetensors", ckpt / "config.json"
    if kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return weights
    if kind == "garbage weights":
        weights.write_bytes(os.urandom(4096))
        return weights
    if kind == "truncated config":
        config.write_text(config.read_text()[:20])
        return config
    config.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))  # garbage config
    return config


def _stage_args(stage: str, root: Path, ckpt: Path, data: Path) -> list[str]:
    return {
        "evaluate": ["--model", ckpt, "--data", data, "--metrics", root / "eval.json"],
        "generate": ["--model", ckpt, "--samples", root / "s.md", "--metrics", root / "g.json"],
        "benchmark": ["--model", ckpt, "--metrics", root / "b.json"],
    }[stage]


@pytest.mark.parametrize(
    "kind", ["truncated weights", "garbage weights", "truncated config", "garbage config"]
)
@pytest.mark.parametrize("stage", ["evaluate", "generate", "benchmark", "export"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_fix(
    stage: str,
    kind: str,
    tmp_path: Path,
    tokenized_data: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = tmp_path / "models" / "best"
    torch.manual_seed(0)
    Infinito(ModelConfig(**MODEL, memory_slots=8, phi_chunk=8)).save(ckpt)
    damaged = _damage(kind, ckpt)
    params = write_params(tmp_path / "params.yaml", TINY)
    if stage == "export":
        argv = ["export", "--model", str(ckpt), "--out", str(tmp_path / "x")]
        code = cli.main([*argv, "--params", str(tmp_path / "none.yaml")])
    else:
        args = _stage_args(stage, tmp_path, ckpt, tokenized_data())
        module = {"evaluate": evaluate, "generate": generate, "benchmark": benchmark}[stage]
        code = module.main(["--params", str(params), *map(str, args)])
    assert code == 2
    one_error_line(
        capsys.readouterr().err, str(damaged), f"dvc checkout {ckpt}", "dvc repro -f train"
    )


# ---------------------------------------------------------------- damaged tokenized data


def _train_args(params: Path, data: Path, root: Path) -> list[str]:
    return train_cli_args(params, data, root)


def _eval_args(params: Path, data: Path, root: Path) -> list[str]:
    torch.manual_seed(0)
    Infinito(ModelConfig(**MODEL, memory_slots=8, phi_chunk=8)).save(root / "best")
    return ["--params", str(params), "--model", str(root / "best"), "--data", str(data),
            "--metrics", str(root / "eval.json")]  # fmt: skip


STAGE_MAINS: dict[str, tuple[Callable[[list[str]], int], Callable[..., list[str]]]] = {
    "train": (train.main, _train_args),
    "evaluate": (evaluate.main, _eval_args),
}


@pytest.mark.parametrize("stage", sorted(STAGE_MAINS))
def test_a_truncated_meta_json_is_one_line_naming_it(
    stage: str,
    tmp_path: Path,
    tokenized_data: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tokenized_data()
    meta = data / "meta.json"
    meta.write_text(meta.read_text()[:40])
    main, args = STAGE_MAINS[stage]
    assert main(args(write_params(tmp_path / "params.yaml", TINY), data, tmp_path)) == 2
    one_error_line(
        capsys.readouterr().err,
        f"{meta} is damaged",
        f"dvc checkout {data}",
        "dvc repro -f tokenize",
    )


@pytest.mark.parametrize(
    ("stage", "split"),
    [("train", "train"), ("train", "validation"), ("evaluate", "validation"), ("evaluate", "test")],
)
def test_token_ids_outside_the_vocabulary_are_one_line_naming_the_file(
    stage: str, split: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    splits = {
        s: rng.integers(0, 64, size=n)
        for s, n in (("train", 3000), ("validation", 600), ("test", 400))
    }
    splits[split][123] = 50000  # GPT-2's ids in data meant for a 64-token vocabulary
    data = write_tokenized(tmp_path / "tokenized", splits, vocab_size=64)
    main, args = STAGE_MAINS[stage]
    assert main(args(write_params(tmp_path / "params.yaml", TINY), data, tmp_path)) == 2
    one_error_line(
        capsys.readouterr().err,
        f"{data / f'{split}.bin'} is damaged: token 123 has id 50000, outside the vocabulary",
        f"dvc checkout {data}",
    )


# ---------------------------------------------------------------- a full disk


def test_atomic_writers_turn_enospc_into_disk_full_and_keep_the_old_output(tmp_path: Path) -> None:
    from infinito.atomic import DiskFull

    path = tmp_path / "out.txt"
    path.write_text("old")
    with (
        pytest.raises(
            DiskFull, match=rf"no space left .*: writing {path} failed, nothing was overwritten"
        ),
        atomic_open(path) as f,
    ):
        f.write("half")
        raise OSError(NO_SPACE.errno, NO_SPACE.strerror)
    target = tmp_path / "dir"
    target.mkdir()
    (target / "kept").write_text("1")
    # named after the output, not the temporary it was writing in
    refused = pytest.raises(DiskFull, match=rf"writing {target} failed")
    with refused, atomic_dir(target) as d, atomic_open(d / "inner.json"):
        raise OSError(NO_SPACE.errno, NO_SPACE.strerror)
    assert path.read_text() == "old" and (target / "kept").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "out.txt"]


def test_a_full_disk_during_tokenize_keeps_the_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "validation", "test"):
        (raw / f"{split}.txt").write_text("Some text to tokenize.\n" * 50)
    out = tmp_path / "tokenized"
    out.mkdir()
    (out / "previous").write_text("the last good output")
    real = tokenize.tokenize_file

    def fills_the_disk(src: Path, dst: Path, *args: Any, **kwargs: Any) -> dict[str, int]:
        if src.name == "validation.txt":
            dst.write_bytes(b"\0" * 64)
            raise OSError(NO_SPACE.errno, NO_SPACE.strerror)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(tokenize, "tokenize_file", fills_the_disk)
    assert tokenize.main(["--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    one_error_line(err, f"writing {out} failed", "nothing was overwritten", "free space and rerun")
    assert [p.name for p in out.iterdir()] == ["previous"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "tokenized"]


def test_a_full_disk_during_download_keeps_the_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "previous").write_text("the last good output")
    real = download._SplitWriter.write_lines
    calls = [0]

    def fills_the_disk(self: Any, lines: Any) -> None:
        calls[0] += 1
        if calls[0] > 20:
            raise OSError(NO_SPACE.errno, NO_SPACE.strerror)
        real(self, lines)

    monkeypatch.setattr(download._SplitWriter, "write_lines", fills_the_disk)
    params = write_params(tmp_path / "params.yaml", {"data.source": "builtin"})
    assert download.main(["--params", str(params), "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, f"writing {out} failed", "free space and rerun")
    assert [p.name for p in out.iterdir()] == ["previous"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "raw"]


def test_a_full_disk_while_the_trainer_saves_is_one_line(
    tmp_path: Path,
    tokenized_data: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_space(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial")
        raise OSError(NO_SPACE.errno, NO_SPACE.strerror)

    monkeypatch.setattr("infinito.checkpoint.torch.save", no_space)
    params = write_params(tmp_path / "params.yaml", TINY)
    assert train.main(train_cli_args(params, tokenized_data(), tmp_path)) == 2
    state = tmp_path / "checkpoints" / "state.pt"
    one_error_line(capsys.readouterr().err, "train: error: no space left", f"writing {state}")
    assert not state.exists()
    assert [p.name for p in state.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_meta_json_that_is_not_an_object(tmp_path: Path) -> None:
    from infinito.config import ConfigError
    from infinito.data.splits import read_meta

    data = write_tokenized(tmp_path / "t", {"train": np.arange(10)}, 64)
    (data / "meta.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="is damaged"):
        read_meta(data)
