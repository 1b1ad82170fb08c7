"""dvc.yaml's stages: each command's paths have that one home, each ``deps`` its real imports.

Paths: the stage modules' command lines take every path as a required option, so what a stage
reads and writes is said once, in dvc.yaml's command (the test fixtures read it from there).

Deps: every stage lists exactly the INFINITO modules its command imports. A stage re-runs when
one of its deps changes, so a missing module would leave a stale result and an extra one
(training listing the evaluate stage, say) would re-run work for nothing. The imports are read
from the source with ``ast``, transitively and including the imports inside functions (the
stages import the model lazily), so the check does not depend on what one code path happens
to import.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import train_cli_args, train_outputs

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The source file of ``infinito...`` module ``name`` (a package's ``__init__.py``)."""
    base = REPO_ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """The ``infinito`` modules one file imports anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "infinito")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "infinito":
                continue
            names.add(node.module)
            # ``from infinito import distributed`` imports a module, not a name
            names.update(
                f"{node.module}.{a.name}"
                for a in node.names
                if module_file(f"{node.module}.{a.name}") is not None
            )
    return names


def import_closure(module: str) -> set[str]:
    """Repository-relative files of ``module`` and of everything it imports, transitively,
    with the ``__init__.py`` of every subpackage on the way."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in seen and module_file(prefix) is not None:
                seen.add(prefix)
                todo.extend(imported_modules(module_file(prefix)))  # type: ignore[arg-type]
    files = {module_file(m).relative_to(REPO_ROOT).as_posix() for m in seen}  # type: ignore[union-attr]
    return files - {"infinito/__init__.py"}  # empty (asserted below): it changes nothing


def stage_module(stage: str) -> str:
    words = shlex.split(STAGES[stage]["cmd"])
    assert words[:2] == ["python", "-m"], f"{stage}: cmd is not `python -m <module> ...`"
    return words[2]


def test_the_root_package_is_empty() -> None:
    assert (REPO_ROOT / "infinito" / "__init__.py").read_text().strip() == ""


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_the_modules_its_command_imports(stage: str) -> None:
    deps = {d for d in STAGES[stage]["deps"] if d.startswith("infinito/")}
    assert deps == import_closure(stage_module(stage))


def test_training_does_not_depend_on_the_evaluate_stage() -> None:
    """Changing an evaluation metric must not retrain the model."""
    assert "infinito/evaluate.py" not in STAGES["train"]["deps"]
    assert "infinito/evaluate.py" not in import_closure("infinito.train")


def test_the_closure_sees_imports_inside_functions() -> None:
    """The model is imported inside ``train()``, ``evaluate()`` ...: it must still count."""
    assert "infinito/model.py" in import_closure("infinito.train")
    assert "infinito/model.py" in import_closure("infinito.evaluate")


# ----------------------------------------------------------------------------- commands


def stage_args(stage: str) -> list[str]:
    return shlex.split(STAGES[stage]["cmd"])[3:]


def path_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.type is Path and a.dest != "params"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_paths_live_only_in_dvc_yaml(stage: str) -> None:
    """No stage's command line repeats a path as a default: dvc.yaml's command gives it."""
    module = importlib.import_module(stage_module(stage))
    if not hasattr(module, "build_parser"):  # the data stages build theirs inside main
        with pytest.raises(SystemExit) as exit_:
            module.main([])
        assert exit_.value.code == 2
        return
    parser = module.build_parser()
    options = path_options(parser)
    assert options, f"{stage} takes no path"
    assert all(a.default is None for a in options), [a.dest for a in options if a.default]
    given = parser.parse_args(stage_args(stage))  # dvc.yaml's command gives every required one
    for action in options:
        if action.required:
            assert getattr(given, action.dest) is not None
            words = stage_args(stage)
            i = next(i for i, w in enumerate(words) if w in action.option_strings)
            with pytest.raises(SystemExit):
                parser.parse_args(words[:i] + words[i + 2 :])


def test_the_train_fixture_paths_are_dvc_yaml_s(tmp_path: Path) -> None:
    """The tests' train outputs are dvc.yaml's, read from its command (never copied)."""
    given = dict(zip(stage_args("train")[::2], stage_args("train")[1::2], strict=True))
    outputs = train_outputs(tmp_path)
    assert outputs["out_dir"] == tmp_path / given["--out"]
    assert outputs["state_dir"] == tmp_path / given["--state"]
    assert outputs["live_dir"] == tmp_path / given["--live"]
    args = train_cli_args(tmp_path / "p.yaml", tmp_path / "d", tmp_path)
    assert args[args.index("--metrics") + 1] == str(tmp_path / given["--metrics"])
