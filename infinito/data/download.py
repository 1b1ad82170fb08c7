"""The download stage: a corpus into ``data/raw/{train,validation,test}.txt`` + ``manifest.json``.

``data.source`` selects the corpus:

- ``builtin``: the Python reference documentation that CPython ships as ``pydoc_data.topics``
  (79 topics, about 0.46 MB of English on Python 3.11), so the whole pipeline runs offline.
  Whole topics go to one split each, so validation and test are documents never seen in
  training: in the order of the SHA-256 of their names, topics fill validation and then test up
  to their byte shares of ``data.split_fractions`` (a topic is taken when at least half of it
  fits); the rest is train. Within a split, topics appear in name order, separated by one blank
  line.
- a WikiText config (``wikitext-2-raw-v1``, ``wikitext-2-v1``, ``wikitext-103-raw-v1``,
  ``wikitext-103-v1``) through ``datasets.load_dataset("Salesforce/wikitext", config)``; one
  dataset row per line. The Hub is probed first with a short timeout: when it is unreachable
  only the local Hugging Face cache is tried, and a miss fails at once naming the offline sources.
- a local path: a directory with one file per split (``train.txt``; ``valid.txt`` or
  ``validation.txt``; ``test.txt``; or WikiText's ``wiki.{train,valid,test}.{tokens,raw}``), copied
  line by line; or one text file, cut at line boundaries into three contiguous blocks holding
  ``data.split_fractions`` of its bytes (train first, test last).

Every output line ends with ``\\n`` (``\\r\\n`` becomes ``\\n``); text is UTF-8. The manifest
records the source and, per split, the SHA-256, line count and byte count of the written file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from infinito.atomic import DiskFull, atomic_dir, write_json
from infinito.config import SPLITS, WIKITEXT_SOURCES, ConfigError, DataConfig, stage_params
from infinito.data import DataError

BUILTIN = "builtin"
# The params.yaml keys this stage reads: dvc.yaml's download params (tests keep them equal).
PARAMS_KEYS = ("data.source", "data.split_fractions")
HUB_DATASET = "Salesforce/wikitext"
HUB_PROBE_TIMEOUT_S = 5.0  # a reachable Hub answers well within this; an unreachable one fails fast
LOCAL_SPLIT_FILES = {
    "train": ("train.txt", "wiki.train.tokens", "wiki.train.raw"),
    "validation": ("valid.txt", "validation.txt", "wiki.valid.tokens", "wiki.valid.raw"),
    "test": ("test.txt", "wiki.test.tokens", "wiki.test.raw"),
}
OFFLINE_HINT = (
    "Offline sources: data.source=builtin (Python's reference documentation, always present), or "
    "data.source=<path> naming a directory with train.txt, valid.txt (or validation.txt) and "
    "test.txt (WikiText's wiki.{train,valid,test}.{tokens,raw} also work) or a single text file "
    "split by data.split_fractions; e.g. dvc exp run -S data.source=builtin"
)


class _SplitWriter:
    """Write lines to one split file while counting lines and bytes and hashing the content."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._sha = hashlib.sha256()
        self.lines = 0
        self.bytes = 0
        self.has_text = False  # a line that is not only whitespace was written

    def write_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            data = (line + "\n").encode("utf-8")
            self._f.write(data)
            self._sha.update(data)
            self.lines += 1 + line.count("\n")
            self.bytes += len(data)
            if not self.has_text and line.strip():
                self.has_text = True

    def stats(self) -> dict[str, Any]:
        return {"sha256": self._sha.hexdigest(), "lines": self.lines, "bytes": self.bytes}


def resolve_source(cfg: DataConfig) -> tuple[str, Path | None]:
    """Classify ``data.source`` as ``builtin``, ``wikitext``, ``dir`` or ``file``; check it.

    A local path is resolved against the working directory (the repository root under DVC).
    """
    source = cfg.source
    if source == BUILTIN:
        return "builtin", None
    if source in WIKITEXT_SOURCES:
        return "wikitext", None
    path = Path(source).expanduser()
    if path.is_dir():
        return "dir", path
    if path.is_file():
        return "file", path
    raise ConfigError(
        f"data.source={source!r} is neither 'builtin', a WikiText config "
        f"({', '.join(WIKITEXT_SOURCES)}), nor an existing file or directory "
        f"(looked for {path.resolve()})"
    )


def download(cfg: DataConfig, out: Path) -> dict[str, Any]:
    """Write the splits of ``cfg.source`` and ``manifest.json`` into ``out``; return the manifest.

    ``out`` is replaced as a whole, atomically: a failure leaves the previous contents in place.
    """
    write = _prepare(cfg)  # every check (and the Hub probe) happens before any output exists
    with atomic_dir(out) as tmp, contextlib.ExitStack() as stack:
        writers = {
            split: _SplitWriter(stack.enter_context((tmp / f"{split}.txt").open("wb")))
            for split in SPLITS
        }
        origin = write(writers)
        for split, w in writers.items():
            if not w.has_text:
                raise DataError(
                    f"data.source={cfg.source!r} gives an empty {split} split ({origin}); every "
                    f"split needs text: use a larger corpus or adjust data.split_fractions"
                )
        manifest = {
            "source": cfg.source,
            "origin": origin,
            "splits": {split: w.stats() for split, w in writers.items()},
        }
        stack.close()  # the split files are complete before the directory is moved into place
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _prepare(cfg: DataConfig) -> Callable[[dict[str, _SplitWriter]], str]:
    """Check ``data.source`` and open the corpus; return a function that writes the splits."""
    kind, path = resolve_source(cfg)
    if kind == "builtin":
        return lambda writers: _write_builtin(writers, cfg.split_fractions)
    if kind == "wikitext":
        dataset = _load_wikitext(cfg.source)
        return lambda writers: _write_wikitext(writers, dataset, cfg.source)
    assert path is not None
    if kind == "dir":
        files = _local_split_files(path)
        return lambda writers: _write_local_dir(writers, files)
    return lambda writers: _write_local_file(writers, path, cfg.split_fractions)


# --- builtin ---------------------------------------------------------------------------------


def builtin_documents() -> dict[str, str]:
    """The builtin corpus: topic name -> text of CPython's ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    return dict(topics)


def assign_documents(docs: dict[str, str], fractions: tuple[float, ...]) -> dict[str, list[str]]:
    """Assign whole documents to splits: split name -> document names in name order.

    Documents, ordered by the SHA-256 of their name (the same on every machine), fill validation
    and then test up to their byte shares of ``fractions``; a document is taken when at least
    half of it fits. All other documents are train.
    """
    order = sorted(docs, key=lambda name: hashlib.sha256(name.encode("utf-8")).hexdigest())
    sizes = {name: len(docs[name].encode("utf-8")) for name in order}
    total = sum(sizes.values())
    held_out = SPLITS[1:]
    targets = {split: frac * total for split, frac in zip(SPLITS, fractions, strict=True)}
    filled = dict.fromkeys(held_out, 0)
    out: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name in order:
        split = next((s for s in held_out if filled[s] + sizes[name] / 2 <= targets[s]), SPLITS[0])
        out[split].append(name)
        if split in filled:
            filled[split] += sizes[name]
    return {split: sorted(names) for split, names in out.items()}


def _write_builtin(writers: dict[str, _SplitWriter], fractions: tuple[float, ...]) -> str:
    docs = builtin_documents()
    assignment = assign_documents(docs, fractions)
    for split, names in assignment.items():
        for i, name in enumerate(names):
            if i:
                writers[split].write_lines([""])  # one blank line between documents
            writers[split].write_lines(docs[name].rstrip("\n").split("\n"))
    counts = ", ".join(f"{split} {len(names)}" for split, names in assignment.items())
    return (
        f"pydoc_data.topics of Python {sys.version.split()[0]}: {len(docs)} topics "
        f"({counts}), whole topics per split"
    )


# --- WikiText through Hugging Face datasets -------------------------------------------------


def _hub_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One quick request to the Hub: any HTTP answer means reachable; no answer means not."""
    url = f"{endpoint.rstrip('/')}/api/datasets/{HUB_DATASET}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered (even 401/404/5xx): the network works
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make ``datasets`` and ``huggingface_hub`` use only the local cache, without retries.

    Both read ``HF_HUB_OFFLINE`` once at import; their module-level flags are what they consult
    at call time, so these are set for the duration of the block.
    """
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_wikitext(config: str) -> Any:
    """``datasets.load_dataset("Salesforce/wikitext", config)``, failing fast when offline."""
    import datasets

    offline = bool(datasets.config.HF_HUB_OFFLINE)
    reason = "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    if not offline and not _hub_reachable(datasets.config.HF_ENDPOINT):
        offline = True
        reason = f"the Hugging Face Hub ({datasets.config.HF_ENDPOINT}) is unreachable"
        print(f"download: {reason}; looking in the local cache only", file=sys.stderr)
    try:
        if offline:
            with _hub_offline():
                return datasets.load_dataset(HUB_DATASET, config)
        return datasets.load_dataset(HUB_DATASET, config)
    except Exception as e:  # datasets raises several types; all mean the same thing here
        if offline:
            raise DataError(
                f"data.source={config!r} needs {HUB_DATASET} from the Hugging Face Hub, but "
                f"{reason} and it is not in the local cache ({datasets.config.HF_DATASETS_CACHE}). "
                f"{OFFLINE_HINT}. [{type(e).__name__}: {e}]"
            ) from e
        raise DataError(
            f"data.source={config!r}: loading {HUB_DATASET} ({config}) failed: "
            f"{type(e).__name__}: {e}. {OFFLINE_HINT}"
        ) from e


def _write_wikitext(writers: dict[str, _SplitWriter], dataset: Any, config: str) -> str:
    for split in SPLITS:
        if split not in dataset:
            raise DataError(f"{HUB_DATASET} {config} has no {split} split (has {list(dataset)})")
        # Rows are lines: non-empty ones carry their own trailing newline, blank ones are "".
        for batch in dataset[split].iter(batch_size=10_000):
            writers[split].write_lines(row.removesuffix("\n") for row in batch["text"])
    return f"Hugging Face datasets {HUB_DATASET}, config {config}"


# --- local files ------------------------------------------------------------------------------


def _local_split_files(root: Path) -> dict[str, Path]:
    """Find one file per split in ``root``; missing or ambiguous names are an error."""
    files: dict[str, Path] = {}
    for split, names in LOCAL_SPLIT_FILES.items():
        found = [root / n for n in names if (root / n).is_file()]
        if not found:
            raise ConfigError(
                f"data.source={str(root)!r} is a directory without a {split} file; expected one "
                f"of {', '.join(names)}"
            )
        if len(found) > 1:
            raise ConfigError(
                f"data.source={str(root)!r} has several {split} files "
                f"({', '.join(p.name for p in found)}); keep exactly one"
            )
        files[split] = found[0]
    return files


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (byte length, line without its line ending) for each line of a UTF-8 file."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}, line {number}, is not UTF-8 ({e.reason} at byte {e.start}); "
                    f"convert the file to UTF-8"
                ) from e
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not text
            line = line.removesuffix("\n")
            yield len(raw), line.removesuffix("\r")


def _write_local_dir(writers: dict[str, _SplitWriter], files: dict[str, Path]) -> str:
    for split, path in files.items():
        writers[split].write_lines(line for _, line in _read_lines(path))
    names = ", ".join(f"{split}={path.name}" for split, path in files.items())
    return f"local directory {files['train'].parent} ({names})"


def _write_local_file(
    writers: dict[str, _SplitWriter], path: Path, fractions: tuple[float, ...]
) -> str:
    total = path.stat().st_size
    bounds = [sum(fractions[: i + 1]) * total for i in range(len(SPLITS))]
    index, offset = 0, 0
    for size, line in _read_lines(path):
        # A line belongs to the block in which it starts: contiguous blocks at line boundaries.
        while index < len(SPLITS) - 1 and offset >= bounds[index]:
            index += 1
        writers[SPLITS[index]].write_lines([line])
        offset += size
    return f"local file {path}, cut into contiguous blocks by data.split_fractions"


# --- entry point ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infinito download", description="Fetch the corpus named by data.source."
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--out", type=Path, required=True, help="output directory (data/raw)")
    args = parser.parse_args(argv)
    try:
        with stage_params(args.params, PARAMS_KEYS) as params:
            manifest = download(params.data, args.out)
    except (ConfigError, DataError) as e:
        print(f"download: error: {e}", file=sys.stderr)
        return 1
    except DiskFull as e:
        print(f"download: error: {e}", file=sys.stderr)
        return 2
    print(f"download: {manifest['origin']}")
    for split, s in manifest["splits"].items():
        print(
            f"  {split:<10} {s['lines']:>9} lines {s['bytes']:>11} bytes -> {args.out}/{split}.txt"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
