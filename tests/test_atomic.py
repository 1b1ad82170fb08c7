"""Atomic writes: a failure mid-write leaves the previous file or directory whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from infinito.atomic import atomic_dir, atomic_open, write_json


def test_write_json_replaces_and_is_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "m" / "metrics.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.stat(path).st_mode & 0o044, "outputs must not be private to their owner"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half of the new")
        raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_dir_swaps_whole_directory(tmp_path: Path) -> None:
    target = tmp_path / "best"
    with atomic_dir(target) as d:
        (d / "w").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "w").write_text("2")
        raise RuntimeError("crash")
    assert (target / "w").read_text() == "1"
    with atomic_dir(target) as d:
        (d / "w").write_text("3")
    assert (target / "w").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
