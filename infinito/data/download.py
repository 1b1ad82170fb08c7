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
records the source; per split, the SHA-256, line count and byte count of the written file and
``documents``, the 0-based numbers of the lines where a document starts (builtin: each topic;
every other source: each WikiText article title, see ``is_wikitext_title``; none for a text
without such titles; the tokenize stage turns them into token offsets); for local sources, the
name, SHA-256 and size of each input file as read (``inputs``: per split for a directory,
``corpus`` for a single file; null for the other sources); and ``dataset``: the name of a known
published corpus whose checksums the written splits match (``KNOWN_DATASETS``; WikiText-2 v1 as
PyTorch's examples and the WikiText archive ship it), or null. WikiText from the Hub is written
as WikiText's own files are: the Hub's loader turns every blank line (a single space in the
files) into an empty row, and the stage writes it back as a single space, so ``wikitext-2-v1``
from the Hub and a local copy of its files give the same bytes and the same ``dataset``.
docs/wikitext-2.md says how to use a local copy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from infinito import hub
from infinito.atomic import DiskFull, atomic_dir, write_json
from infinito.config import SPLITS, WIKITEXT_SOURCES, ConfigError, DataConfig, stage_params
from infinito.data import DataError

BUILTIN = "builtin"
# The params.yaml keys this stage reads: dvc.yaml's download params (tests keep them equal).
PARAMS_KEYS = ("data.source", "data.split_fractions")
HUB_DATASET = "Salesforce/wikitext"
LOCAL_SPLIT_FILES = {
    "train": ("train.txt", "wiki.train.tokens", "wiki.train.raw"),
    "validation": ("valid.txt", "validation.txt", "wiki.valid.tokens", "wiki.valid.raw"),
    "test": ("test.txt", "wiki.test.tokens", "wiki.test.raw"),
}
# Published corpora recognised by the SHA-256 of their split files (as written to data/raw).
# WikiText-2 v1: wiki.{train,valid,test}.tokens of Merity et al.'s archive, byte for byte the
# train/valid/test.txt of PyTorch's examples/word_language_model/data/wikitext-2.
KNOWN_DATASETS: dict[str, dict[str, str]] = {
    "wikitext-2-v1": {
        "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "validation": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    },
}
WIKITEXT_BLANK_LINE = " "  # how WikiText's files write a blank line; the Hub's rows have ""
OFFLINE_HINT = (
    "Offline sources: data.source=builtin (Python's reference documentation, always present), or "
    "data.source=<path> naming a directory with train.txt, valid.txt (or validation.txt) and "
    "test.txt (WikiText's wiki.{train,valid,test}.{tokens,raw} also work) or a single text file "
    "split by data.split_fractions; e.g. dvc exp run -S data.source=builtin"
)


Inputs = dict[str, dict[str, Any]] | None  # input file name, SHA-256 and bytes, per split
Writer = Callable[[dict[str, "_SplitWriter"]], tuple[str, Inputs]]


def is_wikitext_title(line: str) -> bool:
    """A WikiText article title, `` = Title = `` (sections are `` = = Section = = ``)."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


class _SplitWriter:
    """Write lines to one split file while counting lines and bytes and hashing the content.

    It also records where documents start (``documents``: 0-based line numbers): at every
    WikiText article title, a title line with a blank line (or the file's start) before it and a
    blank line after it (WikiText-2's tables have rows such as `` = Goals ; A = `` between other
    lines); writers of corpora with other documents mark them with ``start_document`` and turn
    ``detect_titles`` off.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._sha = hashlib.sha256()
        self.lines = 0
        self.bytes = 0
        self.has_text = False  # a line that is not only whitespace was written
        self.detect_titles = True
        self.documents: list[int] = []
        self._title: int | None = None  # a title line waiting for the blank line after it
        self._after_blank = True

    def start_document(self) -> None:
        """The next line written starts a document."""
        self.documents.append(self.lines)

    def write_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            blank = not line.strip()
            if self._title is not None and blank:
                self.documents.append(self._title)
            self._title = None
            if self.detect_titles and self._after_blank and is_wikitext_title(line):
                self._title = self.lines
            self._after_blank = blank
            data = (line + "\n").encode("utf-8")
            self._f.write(data)
            self._sha.update(data)
            self.lines += 1 + line.count("\n")
            self.bytes += len(data)
            if not self.has_text and line.strip():
                self.has_text = True

    def stats(self) -> dict[str, Any]:
        documents = self.documents + ([self._title] if self._title is not None else [])
        return {
            "sha256": self._sha.hexdigest(),
            "lines": self.lines,
            "bytes": self.bytes,
            "documents": documents,
        }


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


def identify(splits: dict[str, dict[str, Any]]) -> str | None:
    """The name of the known dataset whose every split has the written SHA-256, or None."""
    for name, sums in KNOWN_DATASETS.items():
        if all(splits.get(split, {}).get("sha256") == sha for split, sha in sums.items()):
            return name
    return None


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
        origin, inputs = write(writers)
        for split, w in writers.items():
            if not w.has_text:
                raise DataError(
                    f"data.source={cfg.source!r} gives an empty {split} split ({origin}); every "
                    f"split needs text: use a larger corpus or adjust data.split_fractions"
                )
        splits = {split: w.stats() for split, w in writers.items()}
        manifest = {
            "source": cfg.source,
            "origin": origin,
            "dataset": identify(splits),
            "inputs": inputs,
            "splits": splits,
        }
        stack.close()  # the split files are complete before the directory is moved into place
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _prepare(cfg: DataConfig) -> Writer:
    """Check ``data.source`` and open the corpus; return a function that writes the splits."""
    kind, path = resolve_source(cfg)
    if kind == "builtin":
        return lambda writers: (_write_builtin(writers, cfg.split_fractions), None)
    if kind == "wikitext":
        dataset = _load_wikitext(cfg.source)
        return lambda writers: (_write_wikitext(writers, dataset, cfg.source), None)
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
        writers[split].detect_titles = False  # the documents are the topics
        for i, name in enumerate(names):
            if i:
                writers[split].write_lines([""])  # one blank line between documents
            writers[split].start_document()
            writers[split].write_lines(docs[name].rstrip("\n").split("\n"))
    counts = ", ".join(f"{split} {len(names)}" for split, names in assignment.items())
    return (
        f"pydoc_data.topics of Python {sys.version.split()[0]}: {len(docs)} topics "
        f"({counts}), whole topics per split"
    )


# --- WikiText through Hugging Face datasets -------------------------------------------------


def _hub_reachable(endpoint: str, timeout: float = hub.PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub at ``endpoint`` answers a request for the WikiText dataset."""
    return hub.reachable(f"{endpoint.rstrip('/')}/api/datasets/{HUB_DATASET}", timeout)


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
        # Rows are the lines of WikiText's files: non-empty ones carry their own trailing
        # newline; blank ones (a single space in the files) were emptied by the Hub's loader
        # and are written back as the files have them.
        for batch in dataset[split].iter(batch_size=10_000):
            writers[split].write_lines(
                row.removesuffix("\n") if row.strip() else WIKITEXT_BLANK_LINE
                for row in batch["text"]
            )
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


def _read_lines(path: Path, sha: Any = None) -> Iterator[tuple[int, str]]:
    """Yield (byte length, line without its line ending) for each line of a UTF-8 file.

    ``sha``, a ``hashlib`` object, is updated with every byte read.
    """
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if sha is not None:
                sha.update(raw)
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


def _input_stats(path: Path, sha: Any) -> dict[str, Any]:
    return {"file": path.name, "sha256": sha.hexdigest(), "bytes": path.stat().st_size}


def _write_local_dir(
    writers: dict[str, _SplitWriter], files: dict[str, Path]
) -> tuple[str, Inputs]:
    inputs: dict[str, dict[str, Any]] = {}
    for split, path in files.items():
        sha = hashlib.sha256()
        writers[split].write_lines(line for _, line in _read_lines(path, sha))
        inputs[split] = _input_stats(path, sha)
    names = ", ".join(f"{split}={path.name}" for split, path in files.items())
    return f"local directory {files['train'].parent} ({names})", inputs


def _write_local_file(
    writers: dict[str, _SplitWriter], path: Path, fractions: tuple[float, ...]
) -> tuple[str, Inputs]:
    total = path.stat().st_size
    bounds = [sum(fractions[: i + 1]) * total for i in range(len(SPLITS))]
    index, offset = 0, 0
    sha = hashlib.sha256()
    for size, line in _read_lines(path, sha):
        # A line belongs to the block in which it starts: contiguous blocks at line boundaries.
        while index < len(SPLITS) - 1 and offset >= bounds[index]:
            index += 1
        writers[SPLITS[index]].write_lines([line])
        offset += size
    origin = f"local file {path}, cut into contiguous blocks by data.split_fractions"
    return origin, {"corpus": _input_stats(path, sha)}


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
    if manifest["dataset"]:
        print(f"  dataset: {manifest['dataset']} (every split's SHA-256 matches)")
    for split, s in manifest["splits"].items():
        print(
            f"  {split:<10} {s['lines']:>9} lines {s['bytes']:>11} bytes -> {args.out}/{split}.txt"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
