"""Shared fixtures: the checkout's paths, real English text, and throwaway git + DVC repositories.

``dvc_repo(overrides=...)`` builds a temporary git repository holding this checkout's pipeline
(``dvc.yaml``, ``params.yaml`` with overrides applied, DVC's config, the ``infinito`` and
``pipelines`` packages) in one commit, ready for ``dvc repro`` or ``dvc exp run``.
``run_cmd(args, cwd)`` runs a command there with this interpreter's bin first on PATH and no
Hugging Face Hub access.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infinito import config

REPO_ROOT = Path(__file__).resolve().parents[1]


def _committed_params() -> Path:
    """params.yaml as committed (``git show HEAD:params.yaml``), in a file of its own.

    Tests never read the workspace's params.yaml: ``make quickstart`` (``dvc exp run -S``) and
    experiments rewrite it. Outside a git checkout (a source archive) the file itself is used.
    Commit an edit of params.yaml before testing it.
    """
    proc = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return REPO_ROOT / "params.yaml"
    path = Path(tempfile.mkdtemp(prefix="infinito-tests-params-")) / "params.yaml"
    path.write_text(proc.stdout, encoding="utf-8")
    return path


# The committed seed configuration: what every test reads instead of the workspace's file.
COMMITTED_PARAMS = _committed_params()
# Real English text kept beside the checkout (../shared), never copied into the repository.
WIKITEXT_VALID = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"

# What a temporary pipeline repository gets from this checkout.
PIPELINE_FILES = (
    "dvc.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvc/plots",  # the custom plot templates dvc.yaml names
    ".dvcignore",
    ".gitignore",
)
PIPELINE_PACKAGES = ("infinito", "pipelines")
GIT_IDENTITY = {"user.name": "INFINITO tests", "user.email": "tests@infinito.invalid"}

RunCmd = Callable[..., subprocess.CompletedProcess[str]]


def command_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment for subprocesses: this interpreter's bin first, the Hub off, no analytics.

    ``extra`` adds variables; a value of None removes one.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
    env["DVC_NO_ANALYTICS"] = "1"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def write_params(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write the committed params.yaml to ``path`` with dotted-key ``overrides`` applied
    (comments kept, as ``dvc exp run -S`` keeps them); return ``path``."""
    config.write_params(path, overrides, base=COMMITTED_PARAMS)
    return path


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted-key overrides from a nested (partial) params mapping: ``{"model": {"iit": False}}``
    -> ``{"model.iit": False}``, for ``write_params``."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def make_dvc_repo(
    dest: Path,
    overrides: dict[str, Any] | None = None,
    extra: Iterable[str] = (),
    git_identity: bool = True,
) -> Path:
    """Create a committed git + DVC repository at ``dest`` holding this checkout's pipeline.

    ``extra`` names further files or directories (relative to the checkout) to copy. With
    ``git_identity=False`` the repository has no user name or email of its own (the initial
    commit gets one through the environment only), as on a fresh machine.
    """
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for rel in (*PIPELINE_FILES, *PIPELINE_PACKAGES, *extra):
        src, dst = REPO_ROOT / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copy2(src, dst)
    write_params(dest / "params.yaml", overrides)

    def git(*args: str, env: dict[str, str] | None = None) -> None:
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True, env=env)

    git("init", "-q", "-b", "main")
    git("config", "commit.gpgsign", "false")
    env = None
    if git_identity:
        for key, value in GIT_IDENTITY.items():
            git("config", key, value)
    else:
        env = dict(os.environ)
        for role in ("AUTHOR", "COMMITTER"):
            env[f"GIT_{role}_NAME"] = GIT_IDENTITY["user.name"]
            env[f"GIT_{role}_EMAIL"] = GIT_IDENTITY["user.email"]
    git("add", "-A")
    git("commit", "-q", "-m", "pipeline under test", env=env)
    return dest


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``dvc_repo(overrides=None, extra=(), git_identity=True, name="repo") -> Path``."""

    def build(
        overrides: dict[str, Any] | None = None,
        extra: Iterable[str] = (),
        git_identity: bool = True,
        name: str = "repo",
    ) -> Path:
        return make_dvc_repo(tmp_path / name, overrides, extra, git_identity)

    return build


def _run(
    args: Sequence[str | Path],
    cwd: Path,
    env: dict[str, str | None] | None = None,
    check: bool = True,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in ``cwd`` (stdout and stderr together); on failure show the output."""
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=command_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}")
    return proc


@pytest.fixture(scope="session")
def run_cmd() -> RunCmd:
    """``run_cmd(args, cwd, env=None, check=True, timeout=600) -> CompletedProcess``."""
    return _run


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    """WikiText-2's validation text from ../shared; skipped, saying why, when it is absent."""
    if not WIKITEXT_VALID.is_file():
        pytest.skip(
            f"real English text not found at {WIKITEXT_VALID} (../shared beside the checkout)"
        )
    return WIKITEXT_VALID


@pytest.fixture(scope="session")
def wikitext_2() -> Path:
    """The WikiText-2 v1 folder in ../shared (train.txt, valid.txt, test.txt); skipped, saying
    why, when it is absent."""
    folder = WIKITEXT_VALID.parent
    if not all((folder / name).is_file() for name in ("train.txt", "valid.txt", "test.txt")):
        pytest.skip(f"WikiText-2 not found at {folder} (../shared beside the checkout)")
    return folder


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Hugging Face libraries of this process offline (a Hub call fails at once instead of
    waiting on the network) and their dataset cache under tmp_path. They read HF_HUB_OFFLINE
    at import, so the module constants are patched as well as the environment."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def markov_tokens(n: int, vocab_size: int, seed: int) -> np.ndarray:
    """A learnable token stream: every token is followed by one of three fixed successors."""
    successors = np.random.default_rng(0).integers(0, vocab_size, size=(vocab_size, 3))
    choices = np.random.default_rng(seed).integers(0, 3, size=n)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    for i in range(1, n):
        out[i] = successors[out[i - 1], choices[i]]
    return out


DOCUMENT_TOKENS = 500  # synthetic splits start a document every this many tokens


def write_tokenized(path: Path, splits: dict[str, np.ndarray], vocab_size: int) -> Path:
    """Write ``{split}.bin`` (uint16), ``{split}.docs.npy`` + ``meta.json`` in the tokenize
    stage's format.

    Byte and word counts are nominal (4 bytes and 0.75 words per token): synthetic tokens have
    no text; a document starts every ``DOCUMENT_TOKENS`` tokens.
    """
    path.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "tokenizer": "synthetic",
        "vocab_size": vocab_size,
        "eos_token_id": vocab_size - 1,
        "dtype": "uint16",
        "splits": {},
    }
    for name, tokens in splits.items():
        np.asarray(tokens, dtype=np.uint16).tofile(path / f"{name}.bin")
        n = len(tokens)
        documents = np.arange(0, n, DOCUMENT_TOKENS, dtype=np.int64)
        np.save(path / f"{name}.docs.npy", documents)
        meta["splits"][name] = {
            "tokens": n,
            "bytes": 4 * n,
            "words": (3 * n) // 4,
            "documents": len(documents),
        }
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


@pytest.fixture
def tokenized_data(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tokenized_data(lengths=None, vocab_size=64, name="tokenized") -> Path``:
    a data/tokenized-format directory of Markov tokens (fast, no tokenizer)."""

    def build(
        lengths: dict[str, int] | None = None, vocab_size: int = 64, name: str = "tokenized"
    ) -> Path:
        lengths = lengths or {"train": 3000, "validation": 600, "test": 400}
        splits = {
            s: markov_tokens(n, vocab_size, seed)
            for seed, (s, n) in enumerate(lengths.items(), start=1)
        }
        return write_tokenized(tmp_path / name, splits, vocab_size)

    return build


# ---------------------------------------------------------------- a reproduced tiny pipeline

# The whole pipeline at toy size on the builtin corpus (about half a minute on 2 cores). The
# vocabulary stays GPT-2's: the tokenize stage decides it.
# A tiny trainer on tokenized_data's tokens (vocabulary 64): the stop, signal and supervision
# tests' run, as dotted overrides for write_params.
TINY_TRAINER: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 4,
    "lr": 3e-3,
    "data.seq_len": 32,
    "model.vocab_size": 64,
    "model.d_model": 32,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.block_size": 32,
    "model.memory_slots": 8,
    "model.phi_chunk": 8,
    "train.warmup_steps": 2,
    "train.device": "cpu",
    "train.compile": False,
}


def nan_loss_at(monkeypatch: pytest.MonkeyPatch, call: int) -> list[int]:
    """Make the ``call``-th training-mode forward pass of any Infinito return a NaN loss; the
    returned counter (passes so far) may be reset to count again."""
    import torch

    from infinito.model import Infinito

    original = Infinito.forward
    calls = [0]

    def forward(self: Infinito, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        out = original(self, idx, targets)
        if self.training:
            calls[0] += 1
            if calls[0] == call:
                out = out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(Infinito, "forward", forward)
    return calls


TINY_PIPELINE: dict[str, Any] = {
    "data.source": "builtin",
    "data.seq_len": 32,
    "data.split_fractions": [0.94, 0.03, 0.03],  # few topics in validation/test: quick scoring
    "epochs": 1,
    "batch_size": 4,
    "model.d_model": 32,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.block_size": 32,
    "model.memory_slots": 16,
    "model.phi_chunk": 8,
    "train.max_steps": 4,
    "train.warmup_steps": 1,
    "train.device": "cpu",
    "train.compile": False,
    "evaluate.splits": ["validation"],
    "evaluate.batch_size": 8,
    "generate.prompts": ["The history of"],
    "generate.max_new_tokens": 8,
    "generate.samples_per_prompt": 1,
    "benchmark.batch_sizes": [1],
    "benchmark.prompt_lengths": [8],
    "benchmark.new_tokens": 4,
    "benchmark.repeats": 1,
    "benchmark.warmup": 0,
    "benchmark.hf_reference": False,
}


def copy_repo(src: Path, dest: Path) -> Path:
    """Copy a repository with its git history, DVC cache and workspace outputs."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def reproduced_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TINY_PIPELINE repository after ``dvc repro``, its results committed as the baseline.

    Shared by the whole session: never change it, copy it (``pipeline_repo``, ``copy_repo``).
    """
    repo = make_dvc_repo(tmp_path_factory.mktemp("reproduced") / "repo", TINY_PIPELINE)
    _run(["dvc", "repro"], repo, timeout=900)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "baseline results"], repo)
    return repo


@pytest.fixture
def pipeline_repo(reproduced_repo: Path, tmp_path: Path) -> Path:
    """A private copy of ``reproduced_repo``: every stage up to date, results committed."""
    return copy_repo(reproduced_repo, tmp_path / "pipeline")


_PREFECT_HOME = pytest.StashKey[Path]()

# dvc.yaml's always_changed stages (init): every `dvc repro` runs them, and `dvc status` lists
# them even when everything is up to date. Their outputs stay the same, so nothing after re-runs.
ALWAYS_CHANGED = tuple(
    name
    for name, stage in config.read_yaml(REPO_ROOT / "dvc.yaml")["stages"].items()
    if stage.get("always_changed")
)
UP_TO_DATE_STATUS = {name: ["always changed"] for name in ALWAYS_CHANGED}  # dvc status --json


def stage_paths(stage: str) -> dict[str, str]:
    """The ``--option path`` pairs of a dvc.yaml stage's command: the paths' one home."""
    cmd = config.read_yaml(REPO_ROOT / "dvc.yaml")["stages"][stage]["cmd"]
    words = shlex.split(cmd)[3:]  # after python -m <module>
    pairs = zip(words, [*words[1:], ""], strict=True)
    return {w: v for w, v in pairs if w.startswith("--") and v and not v.startswith("--")}


# train()'s keyword for each path option of the train stage's command
TRAIN_PATH_KEYWORDS = {
    "--out": "out_dir",
    "--state": "state_dir",
    "--metrics": "metrics_path",
    "--live": "live_dir",
}


def train_outputs(root: Path) -> dict[str, Path]:
    """The train stage's output paths under ``root``, as dvc.yaml's command gives them, by
    keyword of ``infinito.train.train``."""
    paths = stage_paths("train")
    return {keyword: root / paths[flag] for flag, keyword in TRAIN_PATH_KEYWORDS.items()}


def train_cli_args(params: Path, data: Path, root: Path) -> list[str]:
    """Arguments of ``python -m infinito.train`` writing ``train_outputs(root)``."""
    outputs = train_outputs(root)
    args = ["--params", str(params), "--data", str(data)]
    for flag, keyword in TRAIN_PATH_KEYWORDS.items():
        args += [flag, str(outputs[keyword])]
    return args


@pytest.fixture(autouse=True)
def _one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models run fastest on one thread and do not fight other processes for the cores.

    Benchmarks under tests/benchmarks keep torch's default, which is what they measure.
    """
    if "benchmarks" in request.path.parts:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config: pytest.Config) -> None:
    """Prefect, before anything imports it: a throwaway home, no analytics, a patient startup."""
    home = Path(tempfile.mkdtemp(prefix="infinito-tests-prefect-"))
    config.stash[_PREFECT_HOME] = home
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)  # never a user's real server
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(_PREFECT_HOME, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)
    if COMMITTED_PARAMS.parent != REPO_ROOT:
        shutil.rmtree(COMMITTED_PARAMS.parent, ignore_errors=True)
