"""One way to write a file: to a temporary name beside it, then rename, so readers (and a run
killed half-way) see the old file or the new one, never half of one. The result gets the mode a
plain `open()` would give (0666 less the process umask), not `mkstemp`'s private 0600: others on a
shared server read a run's results as they read its run.log."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ted_fl.errors import TedFlError


def umask() -> int:
    """The process umask: from /proc where Linux shows it (thread-safe), else by setting it and
    setting it straight back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file in `path`'s folder, flush it to disk, rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_creatable(folder: str | Path, key: str) -> None:
    """Refuse, in one line naming the folder and `key`, an output folder that cannot be created or
    written (a path under a regular file, /proc/x, no permission). Checked by creating what is missing
    and removing it again: --check writes nothing, and only the file system knows (root passes every
    permission bit, /proc refuses a mkdir whatever they say)."""
    path = Path(folder).expanduser()
    fix = f"choose another folder ({key})"
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            raise TedFlError(f"output folder '{path}' cannot be created: '{part}' is a file, not a folder; {fix}")
    created: list[Path] = []
    try:
        for part in [*reversed(path.parents), path]:
            if not part.exists():
                part.mkdir()
                created.append(part)
        if not os.access(path, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        with tempfile.TemporaryFile(dir=path):  # the folder takes a file: what a run does first
            pass
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise TedFlError(f"output folder '{path}' cannot be created or written ({why}); {fix}") from None
    finally:
        for part in reversed(created):
            with contextlib.suppress(OSError):
                part.rmdir()
