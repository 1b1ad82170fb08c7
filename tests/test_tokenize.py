"""tokenize stage: GPT-2 ids, exact streaming, round trip, meta.json counts, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from infinito.config import SPLITS, DataConfig
from infinito.data import DataError
from infinito.data import tokenize as tk
from infinito.data.download import download


def _encode(text: str) -> list[int]:
    return tk.load_tokenizer().backend_tokenizer.encode(text, add_special_tokens=False).ids


def _encode_pieces(parts: list[str]) -> list[int]:
    backend = tk.load_tokenizer().backend_tokenizer
    return [i for e in backend.encode_batch_fast(parts, add_special_tokens=False) for i in e.ids]


@pytest.fixture(scope="module")
def builtin_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("builtin") / "raw"
    download(DataConfig(source="builtin"), raw)
    return raw


def test_hello_world_ids() -> None:
    tok = tk.load_tokenizer()
    assert tok("Hello world!")["input_ids"] == [15496, 995, 0]
    assert _encode("Hello world!") == [15496, 995, 0]
    assert len(tok) == tk.VOCAB_SIZE == 50257
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tk.EOS_TOKEN_ID == 50256
    assert tok.decode([15496, 995, 0]) == "Hello world!"
    assert tk.load_tokenizer() is tok  # built once per process


def test_naive_line_cuts_change_the_ids() -> None:
    """Why pieces need a rule: whitespace after the newline can merge with it into one token."""
    assert _encode("a\n\u00a0 b") == [64, 44320, 275]  # "\n" + no-break space is one token
    assert _encode_pieces(["a\n", "\u00a0 b"]) == [64, 198, 1849, 275]
    assert not tk.safe_cut("a", "\u00a0 b")
    assert not tk.safe_cut("a ", "b")  # the whole splits " " | "\n"; the left part ends " \n"
    assert tk.safe_cut("a", "b") and tk.safe_cut("a ", " b") and tk.safe_cut("a\t", " b")
    assert not tk.safe_cut("a", "  b") and not tk.safe_cut("a", "\tb") and not tk.safe_cut("a", " ")


def test_pieces_concatenate_to_the_joined_text() -> None:
    lines = ["x" * 5, " y", "z ", "  w", "v"] * 20
    parts = list(tk.pieces(lines, piece_chars=1))
    assert "".join(parts) == "\n".join(lines)
    assert len(parts) > 20
    assert all(p.endswith("\n") for p in parts[:-1])


def _pretokens(parts: list[str]) -> list[str]:
    pre = tk.load_tokenizer().backend_tokenizer.pre_tokenizer
    return [s for part in parts for s, _ in pre.pre_tokenize_str(part)]


def test_pieces_encode_like_the_whole_on_adversarial_lines() -> None:
    """Random lines of spaces, tabs, Unicode spaces, letters, digits, punctuation, contractions.

    Pre-tokens are compared as well as ids: GPT-2's merges hide most wrong cuts (" \n" and
    " ", "\n" both give 220, 198), the pre-tokens show every one, whatever the vocabulary.
    """
    alphabet = [" ", "  ", "\t", "\u00a0", "\u3000", "\x1c", "\x0b", "\r", "a", "Zb", "7", "42"]
    alphabet += [".", "'s", "'", "\u00e9t\u00e9", "\u200b", "--", "x y", "\U0001f600"]
    rng = random.Random(0)
    naive_differs = 0
    for _ in range(3000):
        lines = ["".join(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(6)]
        lines = [line for line in lines if line.strip()]
        if not lines:
            continue
        text = "\n".join(lines)
        parts = list(tk.pieces(lines, piece_chars=1))
        assert _pretokens(parts) == _pretokens([text]), lines
        assert _encode_pieces(parts) == _encode(text), lines
        naive = [line + "\n" for line in lines[:-1]] + [lines[-1]]
        naive_differs += _pretokens(naive) != _pretokens([text])
    assert naive_differs > 1000  # the cases exercise boundaries where cutting anywhere fails


def test_pieces_encode_like_the_whole_on_real_text(wikitext_valid: Path) -> None:
    lines = list(tk.nonempty_lines(wikitext_valid))
    text = "\n".join(lines)
    parts = list(tk.pieces(lines, piece_chars=256))
    assert len(parts) > 1000
    assert _encode_pieces(parts) == _encode(text)


def _joined(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").split("\n")
    return "\n".join(line for line in lines if line.strip())


def test_stage_round_trip_and_meta(builtin_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "tokenized"
    meta = tk.tokenize(builtin_raw, out)
    assert meta == json.loads((out / "meta.json").read_text())
    assert list(meta) == ["tokenizer", "vocab_size", "eos_token_id", "dtype", "splits"]
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_token_id"], meta["dtype"]) == (
        "gpt2",
        50257,
        50256,
        "uint16",
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", *(f"{s}.bin" for s in SPLITS), *(f"{s}.docs.npy" for s in SPLITS)]
    )
    tok = tk.load_tokenizer()
    manifest = json.loads((builtin_raw / "manifest.json").read_text())
    for split in SPLITS:
        ids = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        text = _joined(builtin_raw / f"{split}.txt")
        assert tok.decode(ids.tolist()) == text  # cutting pieces at documents changes no id
        assert ids.tolist() == _encode(text)
        starts = np.load(out / f"{split}.docs.npy")
        assert meta["splits"][split] == {
            "tokens": len(ids),
            "bytes": len(text.encode("utf-8")),
            "words": len(text.split()),
            "documents": len(starts),
        }
        # one start per topic, at the token where the topic's first line begins
        lines = (builtin_raw / f"{split}.txt").read_text(encoding="utf-8").split("\n")
        first = [
            next(x for x in lines[n:] if x.strip()) for n in manifest["splits"][split]["documents"]
        ]
        assert starts.dtype == np.int64 and len(starts) == len(first) > 0
        assert starts[0] == 0 and np.all(np.diff(starts) > 0)
        for offset, line in zip(starts.tolist(), first, strict=True):
            assert tok.decode(ids[offset : offset + 40].tolist()).startswith(line[:20])


def test_wikitext_articles_start_where_their_titles_do(
    wikitext_valid: Path, tmp_path: Path
) -> None:
    """WikiText-2's validation split: 60 articles, each starting at its `` = Title = `` line
    (tables' `` = a ; b = `` rows inside articles are not titles)."""
    from infinito.config import DataConfig
    from infinito.data.download import download

    raw = tmp_path / "raw"
    download(DataConfig(source=str(wikitext_valid.parent)), raw)
    meta = tk.tokenize(raw, tmp_path / "tok")
    assert meta["splits"]["validation"]["documents"] == 60
    ids = np.fromfile(tmp_path / "tok" / "validation.bin", dtype=np.uint16)
    starts = np.load(tmp_path / "tok" / "validation.docs.npy")
    tok = tk.load_tokenizer()
    titles = [line for line in wikitext_valid.read_text().split("\n") if line.startswith(" = ")]
    titles = [t for t in titles if not t.startswith(" = = ")]
    for offset, title in zip(starts.tolist(), titles, strict=True):
        assert tok.decode(ids[offset : offset + 60].tolist()).startswith(title)


def test_small_pieces_and_batches_give_identical_files(tmp_path: Path, builtin_raw: Path) -> None:
    src = builtin_raw / "train.txt"
    a = tk.tokenize_file(src, tmp_path / "a.bin")
    b = tk.tokenize_file(src, tmp_path / "b.bin", piece_chars=64, batch_chars=1000)
    assert a == b
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_counts_on_a_hand_made_split(tmp_path: Path) -> None:
    src = tmp_path / "x.txt"
    src.write_text(" = A = \n\n   \nHello world!\n caf\u00e9 au lait\n", encoding="utf-8")
    stats = tk.tokenize_file(src, tmp_path / "x.bin")
    text = " = A = \nHello world!\n caf\u00e9 au lait"
    assert stats == {
        "tokens": len(_encode(text)),
        "bytes": len(text.encode()),
        "words": 8,
        "documents": 0,
    }
    ids = np.fromfile(tmp_path / "x.bin", dtype=np.uint16)
    assert tk.load_tokenizer().decode(ids.tolist()) == text


def test_missing_raw_split_is_a_clear_error(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"lacks validation\.txt, test\.txt: run the download"):
        tk.tokenize(raw, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_blank_split_is_an_error(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in SPLITS:
        (raw / f"{split}.txt").write_text("text\n" if split != "test" else "\n  \n")
    with pytest.raises(DataError, match=r"test\.txt has no text"):
        tk.tokenize(raw, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_main(builtin_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tk.main(["--raw", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")]) == 1
    assert "tokenize: error:" in capsys.readouterr().err
    assert tk.main(["--raw", str(builtin_raw), "--out", str(tmp_path / "t")]) == 0
    assert "validation" in capsys.readouterr().out
    assert (tmp_path / "t" / "meta.json").is_file()
