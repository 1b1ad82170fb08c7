"""download stage: builtin corpus, local directory, single file, WikiText rows, offline failure."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_params

from infinito.config import SPLITS, ConfigError, DataConfig
from infinito.data import DataError
from infinito.data import download as dl


def _check_manifest(out: Path, manifest: dict[str, Any], source: str) -> None:
    """The manifest describes exactly the files written."""
    assert manifest["source"] == source
    assert set(manifest["splits"]) == set(SPLITS)
    with (out / "manifest.json").open() as f:
        assert yaml.safe_load(f) == manifest
    for split in SPLITS:
        data = (out / f"{split}.txt").read_bytes()
        stats = manifest["splits"][split]
        documents = stats["documents"]
        assert stats == {
            "sha256": hashlib.sha256(data).hexdigest(),
            "lines": data.count(b"\n"),
            "bytes": len(data),
            "documents": documents,
        }
        assert documents == sorted(set(documents)) and all(
            0 <= n < stats["lines"] for n in documents
        )
        assert data.endswith(b"\n")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{s}.txt" for s in SPLITS), "manifest.json"]
    )


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


# --- builtin -------------------------------------------------------------------------------


def test_builtin_writes_three_disjoint_splits(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    manifest = dl.download(DataConfig(source="builtin"), out)
    _check_manifest(out, manifest, "builtin")
    docs = dl.builtin_documents()
    assignment = dl.assign_documents(docs, (0.9, 0.05, 0.05))
    names = [n for split in SPLITS for n in assignment[split]]
    assert sorted(names) == sorted(docs)  # every topic once, so the splits share no document
    for split in SPLITS:
        text = (out / f"{split}.txt").read_text(encoding="utf-8")
        assert all(docs[n].rstrip("\n") in text for n in assignment[split])
    total = sum(s["bytes"] for s in manifest["splits"].values())
    for split, frac in zip(SPLITS, (0.9, 0.05, 0.05), strict=True):
        share = manifest["splits"][split]["bytes"] / total
        assert abs(share - frac) < 0.03, (split, share)


def test_builtin_is_deterministic_and_follows_fractions(tmp_path: Path) -> None:
    a = dl.download(DataConfig(source="builtin"), tmp_path / "a")
    b = dl.download(DataConfig(source="builtin"), tmp_path / "b")
    assert a == b
    c = dl.download(DataConfig(source="builtin", split_fractions=(0.6, 0.2, 0.2)), tmp_path / "c")
    total = sum(s["bytes"] for s in c["splits"].values())
    assert 0.15 < c["splits"]["validation"]["bytes"] / total < 0.25


def test_assign_documents_keeps_documents_whole() -> None:
    docs = {f"doc{i}": "x" * (100 + i) for i in range(40)}
    out = dl.assign_documents(docs, (0.8, 0.1, 0.1))
    assert sorted(sum(out.values(), [])) == sorted(docs)
    assert all(out[s] == sorted(out[s]) for s in SPLITS)
    assert len(out["validation"]) == 4 and len(out["test"]) == 4


# --- local sources -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ("train.txt", "valid.txt", "test.txt"),
        ("train.txt", "validation.txt", "test.txt"),
        ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
        ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"),
    ],
)
def test_local_directory(tmp_path: Path, names: tuple[str, str, str]) -> None:
    src = tmp_path / "corpus"
    src.mkdir()
    texts = {
        "train": "\ufeff = Title = \r\n\r\n First line .\r\nSecond line\r\n",
        "validation": "valid one\n\nvalid two",  # no final newline
        "test": "test \u00e9t\u00e9\n",
    }
    for name, split in zip(names, SPLITS, strict=True):
        (src / name).write_bytes(texts[split].encode("utf-8"))
    out = tmp_path / "raw"
    manifest = dl.download(DataConfig(source=str(src)), out)
    _check_manifest(out, manifest, str(src))
    assert manifest["dataset"] is None
    for name, split in zip(names, SPLITS, strict=True):  # the files as read, BOM and CRLF too
        data = texts[split].encode("utf-8")
        assert manifest["inputs"][split] == {
            "file": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    assert _lines(out / "train.txt") == [" = Title = ", "", " First line .", "Second line"]
    assert _lines(out / "validation.txt") == ["valid one", "", "valid two"]
    assert _lines(out / "test.txt") == ["test \u00e9t\u00e9"]
    assert [manifest["splits"][s]["documents"] for s in SPLITS] == [[0], [], []]


def test_documents_start_at_wikitext_titles_and_builtin_topics(tmp_path: Path) -> None:
    """A title line between blank lines starts an article; section headings and table rows
    written like titles (WikiText-2 has `` = Goals ; A = `` rows) do not."""
    src = tmp_path / "corpus"
    src.mkdir()
    lines = [" ", " = One = ", " ", " text", " ", " = = Part = = ", " ", " more", " = a ; b = ",
             " = c ; d = ", " ", " = Two = ", " ", " last", " = End = "]  # fmt: skip
    (src / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (src / "valid.txt").write_text(" = V = \n", encoding="utf-8")  # a title at the very end
    (src / "test.txt").write_text("plain text\n", encoding="utf-8")
    manifest = dl.download(DataConfig(source=str(src)), tmp_path / "raw")
    assert [manifest["splits"][s]["documents"] for s in SPLITS] == [[1, 11], [0], []]
    builtin = dl.download(DataConfig(source="builtin"), tmp_path / "builtin")
    assignment = dl.assign_documents(dl.builtin_documents(), (0.9, 0.05, 0.05))
    for split in SPLITS:
        assert len(builtin["splits"][split]["documents"]) == len(assignment[split])


def test_local_directory_missing_or_ambiguous_split(tmp_path: Path) -> None:
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "train.txt").write_text("a\n")
    (src / "valid.txt").write_text("b\n")
    with pytest.raises(ConfigError, match=r"without a test file; expected one of test\.txt"):
        dl.download(DataConfig(source=str(src)), tmp_path / "raw")
    (src / "test.txt").write_text("c\n")
    (src / "validation.txt").write_text("d\n")
    with pytest.raises(ConfigError, match=r"several validation files \(valid\.txt, validation"):
        dl.download(DataConfig(source=str(src)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_single_file_is_cut_into_contiguous_blocks(tmp_path: Path) -> None:
    lines = [f"line {i:03d} " + "word " * (i % 7) for i in range(200)]
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "raw"
    manifest = dl.download(DataConfig(source=str(src), split_fractions=(0.8, 0.1, 0.1)), out)
    _check_manifest(out, manifest, str(src))
    parts = [_lines(out / f"{split}.txt") for split in SPLITS]
    assert parts[0] + parts[1] + parts[2] == lines  # order kept, nothing lost or repeated
    data = src.read_bytes()
    assert manifest["inputs"] == {
        "corpus": {
            "file": "corpus.txt",
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    }
    total = src.stat().st_size
    for split, frac in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        assert abs(manifest["splits"][split]["bytes"] / total - frac) < 0.02


def test_single_file_too_small_for_a_split(tmp_path: Path) -> None:
    src = tmp_path / "tiny.txt"
    src.write_text("one line only\nand another\n")
    with pytest.raises(DataError, match=r"empty validation split .* adjust data\.split_fractions"):
        dl.download(DataConfig(source=str(src)), tmp_path / "raw")


def test_unknown_source_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.source='wikitext-2' is neither 'builtin'"):
        dl.download(DataConfig(source="wikitext-2"), tmp_path / "raw")


def test_non_utf8_file_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "latin1.txt"
    src.write_bytes(b"fine\n" * 30 + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt, line 31, is not UTF-8"):
        dl.download(DataConfig(source=str(src)), tmp_path / "raw")


def test_failed_download_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    good = dl.download(DataConfig(source="builtin"), out)
    src = tmp_path / "corpus"
    src.mkdir()
    for name in ("train.txt", "valid.txt"):
        (src / name).write_text("fine\n")
    (src / "test.txt").write_bytes(b"\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"test\.txt, line 1, is not UTF-8"):
        dl.download(DataConfig(source=str(src)), out)
    assert yaml.safe_load((out / "manifest.json").read_text()) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "raw"]  # no temporaries


# --- WikiText through datasets ---------------------------------------------------------------


def test_wikitext_rows_become_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows as Salesforce/wikitext serves them: "" for blank lines, others end with "\\n"."""
    import datasets

    rows = {
        "train": ["", " = Valkyria = \n", "", " Senj\u014d no Valkyria . \n"],
        "validation": ["", " = Homarus = \n"],
        "test": [" = Robert = \n", " born 1962 \n"],
    }
    calls: list[tuple[str, str]] = []

    def fake_load(path: str, name: str) -> datasets.DatasetDict:
        calls.append((path, name))
        return datasets.DatasetDict(
            {s: datasets.Dataset.from_dict({"text": r}) for s, r in rows.items()}
        )

    monkeypatch.setattr(dl, "_hub_reachable", lambda endpoint, timeout=5.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    out = tmp_path / "raw"
    manifest = dl.download(DataConfig(source="wikitext-103-raw-v1"), out)
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1")]
    _check_manifest(out, manifest, "wikitext-103-raw-v1")
    for split in SPLITS:  # blank rows become WikiText's blank line, a single space
        assert _lines(out / f"{split}.txt") == [r.removesuffix("\n") or " " for r in rows[split]]
    assert manifest["inputs"] is None and manifest["dataset"] is None


def _hub_rows(path: Path) -> list[str]:
    """The rows Salesforce/wikitext serves for one of WikiText's files: its loader reads the file
    as text (universal newlines) and yields each line with its newline, or "" when the line is
    only whitespace."""
    with path.open(encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


def test_wikitext_2_from_the_hub_equals_the_local_folder(
    wikitext_2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.source=wikitext-2-v1 (the Hub, faked offline from the shared files) and
    data.source=<the folder> write the same text, line by line, and both are recognised."""
    import datasets

    files = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
    rows = {split: _hub_rows(wikitext_2 / name) for split, name in files.items()}
    assert [len(r) for r in rows.values()] == [36718, 3760, 4358]  # one row per line
    assert rows["train"][:2] == ["", " = Valkyria Chronicles III = \n"]

    def fake_load(path: str, name: str) -> datasets.DatasetDict:
        assert (path, name) == ("Salesforce/wikitext", "wikitext-2-v1")
        return datasets.DatasetDict(
            {s: datasets.Dataset.from_dict({"text": r}) for s, r in rows.items()}
        )

    monkeypatch.setattr(dl, "_hub_reachable", lambda endpoint, timeout=5.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub = dl.download(DataConfig(source="wikitext-2-v1"), tmp_path / "hub")
    local = dl.download(DataConfig(source=str(wikitext_2)), tmp_path / "local")
    _check_manifest(tmp_path / "hub", hub, "wikitext-2-v1")
    _check_manifest(tmp_path / "local", local, str(wikitext_2))
    for split, name in files.items():
        from_hub = _lines(tmp_path / "hub" / f"{split}.txt")
        from_folder = _lines(tmp_path / "local" / f"{split}.txt")
        assert len(from_hub) == len(from_folder) == len(rows[split])
        for number, (a, b) in enumerate(zip(from_hub, from_folder, strict=True), start=1):
            assert a == b, f"{split} line {number}: hub {a!r} != folder {b!r}"
        written = (tmp_path / "local" / f"{split}.txt").read_bytes()
        assert written == (wikitext_2 / name).read_bytes()  # the published files, byte for byte
    assert hub["splits"] == local["splits"]
    assert hub["dataset"] == local["dataset"] == "wikitext-2-v1"
    known = dl.KNOWN_DATASETS["wikitext-2-v1"]
    assert {s: i["sha256"] for s, i in local["inputs"].items()} == known
    assert {s: i["file"] for s, i in local["inputs"].items()} == files


def test_identify_needs_every_split_to_match() -> None:
    known = dl.KNOWN_DATASETS["wikitext-2-v1"]
    splits = {split: {"sha256": sha, "lines": 1, "bytes": 1} for split, sha in known.items()}
    assert dl.identify(splits) == "wikitext-2-v1"
    splits["test"] = {"sha256": hashlib.sha256(b"other\n").hexdigest(), "lines": 1, "bytes": 6}
    assert dl.identify(splits) is None


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"),
        # A closed local port: the Hub is "unreachable" without depending on this machine's network.
        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "is unreachable"),
    ],
    ids=["offline-mode", "hub-unreachable"],
)
def test_hub_failure_is_fast_and_clear(
    tmp_path: Path, run_cmd: Any, env: dict[str, str], reason: str
) -> None:
    params = tmp_path / "params.yaml"
    write_params(params, {"data.source": "wikitext-2-raw-v1"})
    cache = tmp_path / "hf"  # empty: nothing is cached
    env = {
        **env,
        "HF_HOME": str(cache),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "HF_HUB_CACHE": str(cache / "hub"),
    }
    start = time.monotonic()
    proc = run_cmd(
        [sys.executable, "-m", "infinito.data.download", "--params", params, "--out", "raw"],
        tmp_path,
        env=env,
        check=False,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout
    assert reason in proc.stdout
    assert "not in the local cache" in proc.stdout
    assert "data.source=builtin" in proc.stdout and "data.source=<path>" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert "Retry" not in proc.stdout  # no retry loop (huggingface_hub's takes 23 s offline)
    assert elapsed < 20, f"took {elapsed:.1f}s"
    assert not (tmp_path / "raw").exists()


def test_main_reports_bad_source_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    write_params(params, {"data.source": str(tmp_path / "missing")})
    assert dl.main(["--params", str(params), "--out", str(tmp_path / "raw")]) == 1
    assert "download: error: data.source=" in capsys.readouterr().err


def test_main_builtin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    write_params(params, {"data.source": "builtin"})
    assert dl.main(["--params", str(params), "--out", str(tmp_path / "raw")]) == 0
    assert "pydoc_data.topics" in capsys.readouterr().out
    assert (tmp_path / "raw" / "manifest.json").is_file()


def test_cli_module_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "infinito.data.download", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--out" in proc.stdout
