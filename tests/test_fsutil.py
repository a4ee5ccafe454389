"""Atomic writes: temporary names say who wrote them, and killed writers' leftovers are swept."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deeplab_cli import fsutil
from deeplab_cli.errors import DeeplabError
from deeplab_cli.fsutil import TEMP_NAME_RE, atomic_open, atomic_path, parse_temp_name
from helpers import HOST, OTHER_HOST, dead_pid, host_tag_for, temp_name

@pytest.fixture(autouse=True)
def fresh_sweeps(monkeypatch):
    """Each test starts as a process that has written nowhere yet."""
    monkeypatch.setattr(fsutil, "_swept_folders", set())


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- atomic_path ---------------------------------------------------------------------------


def test_interrupted_first_write_leaves_no_target_and_no_temp(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(KeyboardInterrupt):  # BaseException, as on Ctrl-C
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert names(tmp_path) == set()


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="Unix permissions")
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_outputs_get_the_umask_permissions_not_mkstemps(tmp_path, umask, mask, mode):
    umask(mask)
    with atomic_open(tmp_path / "mask.png") as fh:
        fh.write(b"png")
    assert (tmp_path / "mask.png").stat().st_mode & 0o777 == mode


@pytest.mark.skipif(os.name != "posix", reason="Unix permissions")
def test_replacing_an_output_keeps_its_permissions(tmp_path, umask):
    target = tmp_path / "mask.png"
    target.write_bytes(b"old")
    target.chmod(0o640)
    with atomic_open(target) as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(os.name != "posix", reason="Unix permissions")
def test_umask_without_proc_is_read_and_put_back(monkeypatch, umask):
    umask(0o027)
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert fsutil._umask() == 0o027
    assert os.umask(0o027) == 0o027  # left as it was


def test_temp_name_says_which_process_and_host_wrote_it(tmp_path):
    with atomic_path(tmp_path / "cat.v2.png") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".cat.v2.png.dl-") and tmp.name.endswith(".part")
        assert TEMP_NAME_RE.fullmatch(tmp.name)["name"] == "cat.v2.png"
        assert parse_temp_name(tmp.name) == (os.getpid(), HOST)
        tmp.write_bytes(b"x")
    assert names(tmp_path) == {"cat.v2.png"}


def test_a_long_target_name_still_gets_a_temp_that_fits(tmp_path):
    target = tmp_path / ("é" * 100 + "a" * 50 + ".png")  # 254 bytes: at the 255-byte limit
    with atomic_path(target) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255
        assert parse_temp_name(tmp.name) == (os.getpid(), HOST)
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"


@pytest.mark.parametrize("name", [
    ".x.png.abcd1234.part",  # the old format: no writer tag
    ".x.png.dl-1a2b-0123abcd-ab_cd123.part.bak",
    "x.png.dl-1a2b-0123abcd-ab_cd123.part",  # not hidden
    ".x.png.dl-1A2B-0123abcd-ab_cd123.part",  # upper-case pid
    ".x.png.dl-1a2b-0123abc-ab_cd123.part",  # 7-digit host tag
    ".x.png.dl--0123abcd-ab_cd123.part",  # no pid
    ".x.png.dl-1a2b-0123abcd-.part",  # no random part
    ".x.png.dl-1a2b-0123abcd-ab.cd.part",  # a dot in the random part
    ".dl-1a2b-0123abcd-q.ab_cd123.part",  # old format for a target named 'dl-1a2b-0123abcd-q'
    ".dl-1a2b-0123abcd-ab_cd123.part",  # no target name
])
def test_near_miss_names_do_not_parse(name):
    assert parse_temp_name(name) is None


# --- the sweep -----------------------------------------------------------------------------


def test_first_write_removes_only_dead_writers_temps_of_this_host(tmp_path):
    dead = dead_pid()
    stale = temp_name("a.png", dead)
    kept_files = [
        temp_name("b.png", os.getppid()),  # live (maybe another user's: PermissionError)
        temp_name("c.png", os.getpid()),  # ours, e.g. another writer thread's
        temp_name("d.png", dead, OTHER_HOST),  # a shared folder: that pid is not ours to judge
        temp_name("h.png", 0),  # would probe our own process group
        temp_name("i.png", 0xFFFFFFFF),  # beyond any pid (os.kill would overflow)
        ".x.png.abcd1234.part",  # old format
        temp_name("e.png", dead) + ".bak",
        "notes.txt",
    ]
    for name in [stale, *kept_files]:
        (tmp_path / name).write_bytes(b"leftover")
    as_dir = tmp_path / temp_name("f.png", dead)
    as_dir.mkdir()
    (as_dir / "inside").write_bytes(b"1")
    pointee = tmp_path / "pointee"
    pointee.write_bytes(b"1")
    as_link = tmp_path / temp_name("g.png", dead)
    as_link.symlink_to(pointee)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / stale).write_bytes(b"leftover")

    with atomic_open(tmp_path / "out.png") as fh:
        fh.write(b"new")

    assert names(tmp_path) == {*kept_files, as_dir.name, "pointee", as_link.name, "sub", "out.png"}
    assert (as_dir / "inside").exists() and as_link.is_symlink() and pointee.exists()
    assert names(sub) == {stale}


def test_each_folder_is_swept_once_per_process(tmp_path):
    dead = dead_pid()
    one, two = tmp_path / "one", tmp_path / "two"
    with atomic_open(one / "a.png") as fh:
        fh.write(b"1")
    (one / temp_name("b.png", dead)).write_bytes(b"leftover")
    (two / "x").mkdir(parents=True)
    (two / temp_name("b.png", dead)).write_bytes(b"leftover")

    with atomic_open(one / "b.png") as fh:  # already swept, also under another spelling
        fh.write(b"2")
    with atomic_open(two / "x" / ".." / ".." / "one" / "c.png") as fh:
        fh.write(b"3")
    assert temp_name("b.png", dead) in names(one)
    with atomic_open(two / "b.png") as fh:  # a new folder is swept
        fh.write(b"4")
    assert names(two) == {"x", "b.png"}

    fsutil._swept_folders.clear()  # as a new process would: now `one` is swept too
    with atomic_open(one / "d.png") as fh:
        fh.write(b"5")
    assert names(one) == {"a.png", "b.png", "c.png", "d.png"}


def test_a_failing_sweep_never_fails_the_write(tmp_path, monkeypatch):
    stale = {pid: tmp_path / temp_name("a.png", pid) for pid in (dead_pid(), dead_pid())}
    for path in stale.values():
        path.write_bytes(b"leftover")
    real_alive = fsutil._pid_alive
    raced = []

    def another_sweeper_wins(pid):  # the first file goes between the listing and the unlink
        if not raced:
            stale[pid].unlink()
            raced.append(pid)
        return real_alive(pid)

    monkeypatch.setattr(fsutil, "_pid_alive", another_sweeper_wins)
    with atomic_open(tmp_path / "a.png") as fh:
        fh.write(b"1")
    assert names(tmp_path) == {"a.png"}  # the sweep went on past the race

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fsutil.os, "scandir", unreadable)
    with atomic_open(tmp_path / "other" / "b.png") as fh:
        fh.write(b"2")
    assert (tmp_path / "other" / "b.png").read_bytes() == b"2"


def test_another_users_process_counts_as_alive(tmp_path, monkeypatch):
    others, gone = 0x4242, 0x4343
    for pid in (others, gone):
        (tmp_path / temp_name("a.png", pid)).write_bytes(b"leftover")
    sent = []

    def kill(pid, sig):  # what the kernel answers an unprivileged caller
        sent.append(sig)
        if pid == others:
            raise PermissionError(1, "Operation not permitted")
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(fsutil.os, "kill", kill)
    assert fsutil.sweep_stale_temps(tmp_path) == [tmp_path / temp_name("a.png", gone)]
    assert names(tmp_path) == {temp_name("a.png", others)}
    assert sent == [0, 0]  # only probed, never signalled


def test_writer_threads_share_the_sweep(tmp_path):
    stale = tmp_path / temp_name("a.png", dead_pid())
    stale.write_bytes(b"leftover")

    def write(i):
        with atomic_open(tmp_path / f"{i}.png") as fh:
            fh.write(bytes([i]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(32)))
    assert names(tmp_path) == {f"{i}.png" for i in range(32)}
    assert fsutil._swept_folders == {tmp_path.resolve()}



# --- pid namespaces ------------------------------------------------------------------------


@pytest.fixture
def pid_namespace(monkeypatch):
    """Call with a namespace inode (None: no /proc) to become a process there; returns the
    host tag fsutil then writes."""
    def enter(inode):
        monkeypatch.setattr(fsutil, "_pid_namespace", lambda: inode)
        fsutil.host_tag.cache_clear()
        return fsutil.host_tag()

    yield enter
    fsutil.host_tag.cache_clear()  # back to the real namespace's tag


def test_writers_in_another_pid_namespace_are_left_alone(tmp_path, pid_namespace):
    """Two containers on one volume with one host name: the other's pids mean nothing here."""
    dead = dead_pid()
    theirs = pid_namespace(4026532001)
    ours = pid_namespace(4026532002)
    assert theirs != ours and theirs == host_tag_for(socket.gethostname(), 4026532001)
    assert TEMP_NAME_RE.fullmatch(temp_name("a.png", dead, ours))  # the same format and length
    other_writer = temp_name("a.png", dead, theirs)  # maybe alive: its pid is not ours to judge
    (tmp_path / other_writer).write_bytes(b"a write in progress elsewhere")
    (tmp_path / temp_name("b.png", dead, ours)).write_bytes(b"leftover")

    with atomic_path(tmp_path / "c.png") as tmp:
        assert parse_temp_name(tmp.name) == (os.getpid(), ours)
        tmp.write_bytes(b"new")
    assert names(tmp_path) == {other_writer, "c.png"}


def test_without_proc_the_tag_is_the_host_name_alone(tmp_path, pid_namespace, monkeypatch):
    host_only = host_tag_for(socket.gethostname(), None)
    assert pid_namespace(None) == host_only
    stale = tmp_path / temp_name("a.png", dead_pid(), host_only)
    stale.write_bytes(b"leftover")
    assert fsutil.sweep_stale_temps(tmp_path) == [stale]

    monkeypatch.undo()  # the real reader, with /proc missing, then unreadable
    monkeypatch.setattr(fsutil, "PID_NAMESPACE_LINK", str(tmp_path / "no-proc" / "self" / "ns" / "pid"))
    fsutil.host_tag.cache_clear()
    assert fsutil._pid_namespace() is None and fsutil.host_tag() == host_only

    def unreadable(path, *args, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fsutil, "PID_NAMESPACE_LINK", "/proc/self/ns/pid")
    monkeypatch.setattr(fsutil.os, "stat", unreadable)
    fsutil.host_tag.cache_clear()
    assert fsutil._pid_namespace() is None and fsutil.host_tag() == host_only


TAG_OF_A_NEW_PROCESS = "from deeplab_cli.fsutil import host_tag; print(host_tag())"


def test_a_process_in_a_new_pid_namespace_writes_another_tag():
    """For real (Linux, where unshare may make a pid namespace): a child in our namespace
    shares our tag, a child in a new one does not."""
    child = subprocess.run([sys.executable, "-c", TAG_OF_A_NEW_PROCESS], capture_output=True,
                           text=True, check=True)
    assert child.stdout.strip() == fsutil.host_tag() == HOST
    unshare = shutil.which("unshare")
    if unshare is None or not os.path.exists("/proc/self/ns/pid"):
        pytest.skip("no unshare or no /proc here")
    other = subprocess.run([unshare, "--user", "--map-root-user", "--pid", "--fork",
                            sys.executable, "-c", TAG_OF_A_NEW_PROCESS], capture_output=True, text=True)
    if other.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {other.stderr.strip()}")
    assert TEMP_NAME_RE.fullmatch(temp_name("a.png", 1, other.stdout.strip()))
    assert other.stdout.strip() != HOST

# --- through the command -------------------------------------------------------------------


# --- text_lines (split files, --from-list, --labels) -------------------------------------------


@pytest.mark.parametrize("data", [
    b"a\nb c\n\nd\n",
    b"\xef\xbb\xbfa\r\nb c\r\n\r\nd\r\n",  # Windows Notepad: byte-order mark, CRLF
    b"a\rb c\r\rd",  # old Mac line ends, no final one
])
def test_text_lines_any_line_ends_and_a_byte_order_mark(data):
    lines = fsutil.text_lines(data, label="x.txt", expected="names")
    assert [line for line in lines if line] == ["a", "b c", "d"]
    assert lines[2] == ""  # blank lines stay, so callers can number lines


def test_text_lines_nul_separated_keep_everything_else():
    data = b"\xef\xbb\xbfa\nb\0 c\r\0\0"
    assert fsutil.text_lines(data, label="-", expected="paths", null=True) == ["a\nb", " c\r", "", ""]


def test_text_lines_not_utf8():
    data = b"\xef\xbb\xbfok\n\xffname\n"
    with pytest.raises(DeeplabError) as info:
        fsutil.text_lines(data, label="--labels l.txt", expected="one class name per line")
    assert str(info.value) == ("--labels l.txt: not a UTF-8 text file (byte 0xff at offset 6); "
                               "expected one class name per line")
    # File names may hold any bytes: they come back as os.fsdecode gives them.
    lines = fsutil.text_lines(data, label="-", expected="paths", file_names=True)
    assert lines == ["ok", os.fsdecode(b"\xffname"), ""]
