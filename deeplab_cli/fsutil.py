"""Crash-safe file output: write to a temporary name beside the target, then rename.

A process killed mid-write (SIGKILL, power loss) cannot remove its temporary file, so each
temporary name says who wrote it (`temp_prefix`), and the first write into a folder sweeps
that folder for temporaries whose writer, on this host and in this pid namespace, is gone
(`sweep_stale_temps`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO, Iterator

TEMP_SUFFIX = ".part"

# `.{target name}.dl-{writer pid, hex}-{host tag}-{mkstemp's random part}.part`; the random
# part is drawn from [a-z0-9_] and never holds a dot, so the tail parses back unambiguously
# whatever the target name holds.
TEMP_NAME_RE = re.compile(
    r"\.(?P<name>.+)\.dl-(?P<pid>[0-9a-f]{1,8})-(?P<host>[0-9a-f]{8})-[a-z0-9_]+" + re.escape(TEMP_SUFFIX),
    re.DOTALL,
)

# Linux: this process's pid namespace; its inode number tells namespaces apart (namespaces(7)).
PID_NAMESPACE_LINK = "/proc/self/ns/pid"

_NAME_MAX = 255  # bytes in one file name on the common file systems
_RANDOM_LEN = 8  # characters mkstemp inserts

_swept_folders: set[Path] = set()  # folders already swept by this process
_swept_lock = threading.Lock()  # writer threads call atomic_path concurrently


def _pid_namespace() -> int | None:
    """The inode number of this process's pid namespace, or None where it cannot be read
    (no /proc, as on macOS and Windows, or /proc not readable)."""
    try:
        return os.stat(PID_NAMESPACE_LINK).st_ino
    except (OSError, ValueError):
        return None


@functools.cache
def host_tag() -> str:
    """8 hex digits of a hash of this machine's host name and, on Linux, this process's pid
    namespace, as written into temporary names (just the host name where there is no /proc).

    A pid names a process only within its pid namespace: two containers that share a volume
    and a host name but not their pids must not take each other's live writers for dead.
    """
    ident = socket.gethostname()
    namespace = _pid_namespace()
    if namespace is not None:
        ident += f"\0pid:{namespace}"  # NUL: no host name holds one
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def temp_prefix(target_name: str) -> str:
    """The start of a temporary name for `target_name` written by this process on this host
    and pid namespace (mkstemp appends its random part, then `TEMP_SUFFIX`).

    A long target name is shortened here so that the whole temporary name still fits the
    255 bytes a file name may have; only the rename gives the target its full name.
    """
    tag = f".dl-{os.getpid():x}-{host_tag()}-"
    room = _NAME_MAX - 1 - len(tag) - _RANDOM_LEN - len(TEMP_SUFFIX)
    name = target_name
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{name}{tag}"


def parse_temp_name(filename: str) -> tuple[int, str] | None:
    """(writer pid, host tag) of a temporary name made by `temp_prefix`, or None if
    `filename` is not exactly such a name."""
    match = TEMP_NAME_RE.fullmatch(filename)
    if match is None:
        return None
    return int(match["pid"], 16), match["host"]


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host may still be running (True when unsure)."""
    if pid == os.getpid():
        return True
    if not 0 < pid <= 0x7FFFFFFF:  # not a pid we could have written; never signal groups
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists under another user
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in `folder` (not its subfolders) left by dead writers of this
    host and pid namespace.

    A file is removed only when its name parses with `parse_temp_name`, its host tag is
    ours (`host_tag`), it is a regular file (not a directory, not a symlink) and no process
    with its pid exists. That is safe: a live writer's pid exists until it has renamed or
    removed its temporary, and temporaries of other hosts (a shared network folder may have
    a live writer elsewhere) or of other pid namespaces (containers sharing a volume, whose
    pids we cannot see), older formats and anything else are left alone. Errors
    (races with other sweepers, permissions) are ignored. Returns the paths removed.
    """
    if os.name != "posix":  # on Windows os.kill(pid, 0) sends CTRL_C_EVENT instead of probing
        return []
    removed = []
    try:
        ours = host_tag()
        with os.scandir(folder) as entries:
            for entry in entries:
                parsed = parse_temp_name(entry.name)
                if parsed is None or parsed[1] != ours:
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and not _pid_alive(parsed[0]):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    except OSError:
        pass
    return removed


def _sweep_once(folder: Path) -> None:
    """Sweep `folder` if no write of this process has gone there yet; never raises."""
    try:
        key = folder.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return
    with _swept_lock:
        if key in _swept_folders:
            return
        _swept_folders.add(key)
    sweep_stale_temps(key)  # outside the lock: writers to other folders need not wait


def _reset_after_fork() -> None:
    # A child forked while another thread held the lock would deadlock on it.
    global _swept_lock
    _swept_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


_umask_lock = threading.Lock()


def _umask() -> int:
    """This process's umask: read from /proc on Linux, else set and put back at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _output_mode(target: Path) -> int:
    """The permissions a finished output gets: those of the file it replaces, else what a
    plain open() would give a new file (0o666 less the umask). mkstemp creates its files 0o600,
    which would leave every output unreadable to other users whatever the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` on success.

    The temporary name starts with '.' and ends with '.part', so a reader that lists the
    folder mid-run never mistakes it for a finished output; in between it names this
    process and host (see `temp_prefix`). On any exception the temporary file is removed
    and `target` is left as it was. The finished file gets the permissions of the file it
    replaces, or of any newly created file (`_output_mode`). The first call of a process for
    a folder also removes the temporaries that killed writers of this host (and pid
    namespace) left there (`sweep_stale_temps`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(OSError):  # file systems without Unix permissions
            os.chmod(tmp_path, _output_mode(target))
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


def check_writable_folder(folder: str | os.PathLike, label: str) -> None:
    """Raise a one-line DeeplabError ("{label}: cannot write in DIR (reason)") unless a file
    can be created in `folder`, or, where it does not exist yet, in the nearest folder above
    it that does (where `atomic_path` would make the missing ones). Tried for real, as
    `atomic_path` writes (a temporary beside the targets, removed at once), so it holds for
    root, read-only mounts and ACLs alike, where os.access would guess."""
    from deeplab_cli.errors import DeeplabError

    existing = Path(folder) if str(folder) else Path(".")
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise DeeplabError(f"{label}: cannot write ({existing} is a broken link)")
        existing = existing.parent
    if not existing.is_dir():
        raise DeeplabError(f"{label}: cannot write ({existing} is a file, not a folder)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix("write-check"), suffix=TEMP_SUFFIX, dir=existing)
    except OSError as exc:
        raise DeeplabError(f"{label}: cannot write in {existing} ({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


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


UTF8_BOM = b"\xef\xbb\xbf"


def text_lines(data: bytes, *, label: str, expected: str, null: bool = False,
               file_names: bool = False) -> list[str]:
    """The lines of a text file's content, without their line ends: every line, blank ones
    included, so that callers can number them.

    - A UTF-8 byte-order mark at the start (Windows Notepad writes one) is dropped.
    - Lines end at '\\n', '\\r\\n' or a lone '\\r' (lists made on Unix, Windows, old Macs).
      With `null`, entries end at NUL instead (`find -print0`) and may hold anything else.
    - The text is UTF-8. With `file_names`, bytes that are not UTF-8 are kept as
      `os.fsdecode` keeps them, so any path the system allows comes back unchanged;
      otherwise they raise a one-line DeeplabError: "{label}: not a UTF-8 text file
      (byte 0x.. at offset N); expected {expected}".
    """
    from deeplab_cli.errors import DeeplabError

    start = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    body = data[start:]
    if file_names:
        text = os.fsdecode(body)
    else:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DeeplabError(f"{label}: not a UTF-8 text file (byte 0x{body[exc.start]:02x} at "
                               f"offset {start + exc.start}); expected {expected}") from None
    if null:
        return text.split("\0")
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
