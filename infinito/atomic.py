"""Atomic file output: every file INFINITO writes appears whole or not at all.

Writers go to a temporary name in the destination's directory, flush and fsync, then
``os.replace`` onto the final name, so a crash (even ``kill -9``) never leaves half a file.
Temporary names carry the writer's PID (``.NAME.PID.RANDOM.tmp``): a writer first removes the
temporaries that dead processes left for its destination, so a killed run's leftovers go at the
next start. A full disk raises ``DiskFull``, whose message names the file and the fix; the
partial temporary is removed and the previous output stays. No torch here: the data stages use
it too.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """An output could not be written for lack of space; nothing was overwritten."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(
            f"no space left on the device holding {path.parent} "
            f"({os.strerror(cause.errno or errno.ENOSPC)}): writing {path} failed, nothing was "
            f"overwritten and the partial file was removed; free space and rerun (an output "
            f"DVC removed before the run comes back with `dvc checkout`)"
        )
        self.errno = cause.errno
        self.path = path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries that processes no longer running left for ``path``; return them.

    A name without a PID (written before names carried one) counts as stale too.
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        removed.append(tmp)
    return removed


def remove_own_temporaries(directory: str | Path) -> None:
    """Remove this process's temporaries in ``directory`` (a run that is abandoning its saves)."""
    for tmp in Path(directory).glob(f".*.{os.getpid()}.*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, DiskFull) and e.errno in NO_SPACE:
            raise DiskFull(path, e) from e
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order) atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` when the block succeeds.

    The old directory, if any, is moved aside first and removed only after the new one is in
    place, so at every instant either the old or the new directory exists whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0700 would make outputs private
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:  # named after the output, not tmp
            raise DiskFull(path, e) from e
        raise
