"""Crash-safe file output: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` on success.

    The temporary name starts with '.' and ends with '.part', so a reader that lists the
    folder mid-run never mistakes it for a finished output. On any exception the
    temporary file is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing that replaces `target` only once closed cleanly."""
    with atomic_path(target) as tmp, open(tmp, mode) as fh:
        yield fh


def read_input(path: str | os.PathLike, *, label: str | None = None, expected: str = "a file") -> bytes:
    """The whole content of an input file, or a one-line DeeplabError naming it.

    `label` is how the file is named in the message (default: the path); `expected` says
    what should have been there, for the directory case ('an image', 'a .npy file').
    """
    from deeplab_cli.errors import DeeplabError

    label = label or str(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DeeplabError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise DeeplabError(f"{label}: is a directory, expected {expected}") from None
    except PermissionError:
        raise DeeplabError(f"{label}: permission denied") from None
    except OSError as exc:
        raise DeeplabError(f"{label}: cannot read ({exc.strerror or exc})") from None
