"""File helpers every package uses (standard library only): atomic writes, temporary names and
their clean-up after a crash, content hashes, the lock that keeps two runs out of one folder,
and `inside`, the one check that a name taken from user data stays inside its folder.

Every output of tbn-vit is written whole or not at all: to a hidden temporary name beside the
target (`.tbn-<name>.tmp-<pid>-<random>`), flushed to disk, then renamed over the target. A
process killed mid-write leaves only such a temporary; `sweep_stale` removes those whose process
is gone, and nothing else (no other program names its files so). A full disk or a short write
is said as such, naming the file (`DiskFullError`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from typing import Callable, List, Optional

from .errors import TbnError

#: tbn-vit's own temporaries and move-aside backups (see temporary_name); nothing else matches
OWN_TEMPORARY = re.compile(r"^\.tbn-.+\.(?:tmp|old)-(\d+)-[0-9a-f]{8}(?:\.[A-Za-z0-9]+)?$")
#: inside a temporary folder of ours (make_temporary_dir): what lets sweep_stale remove it
TEMPORARY_MARK = ".tbn-temporary"


class UnsafePathError(TbnError, ValueError):
    """A name from user data (a split list's line, a video or frame name) that leads outside the
    folder it must stay in; the message names the entry and why."""


def inside(root: str, name: str, what: str) -> str:
    """`root/name`, checked: the one place where a name taken from user data (a split list's
    line, a folder entry, a video name used as an output folder) becomes a path.

    Refused with UnsafePathError (the message starts with `what`, e.g. "val.txt line 2"): an
    empty name, a NUL byte, an absolute path, a '..' component, or a path that resolves outside
    `root` once symlinks are followed (a symlinked entry pointing elsewhere), or a symlink whose
    target does not exist (the message names the target). `root` itself may
    be a symlink: containment is checked between the resolved paths. Returns the joined path as
    the user would write it (not the resolved one), so messages stay readable.
    """
    name = os.fspath(name)

    def refuse(why: str) -> UnsafePathError:
        return UnsafePathError(f"{what}: {name!r} {why}")

    if not name or not name.strip():
        raise refuse("is empty")
    if "\x00" in name:
        raise refuse("holds a NUL byte")
    if os.path.isabs(name):
        raise refuse(f"is an absolute path; it must name an entry inside {root}")
    if ".." in name.replace("\\", "/").split("/"):
        raise refuse(f"climbs out with '..'; it must name an entry inside {root}")
    path = os.path.join(root, name)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise refuse(f"leads outside {root} (a symbolic link to {real}); copy it inside, or "
                     f"pass it as a source of its own")
    if os.path.islink(path) and not os.path.exists(path):  # said now, naming what it misses
        raise refuse(f"is a symbolic link to {os.readlink(path)!r}, which does not exist; fix "
                     f"or remove the link")
    return path


def temporary_name(path: str, suffix: str = "") -> str:
    """A fresh hidden temporary beside `path`, owned by this process: `.tbn-<name>.tmp-<pid>-
    <8 random hex>` (`suffix`: e.g. '.mp4', for writers that choose the format by the
    extension). Each call gives another name, so two writers never share one."""
    return _own_name(path, "tmp", suffix)


def backup_name(path: str) -> str:
    """A fresh hidden name beside `path` to move an old output aside to before replacing it."""
    return _own_name(path, "old", "")


def _own_name(path: str, kind: str, suffix: str) -> str:
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), f".tbn-{os.path.basename(path)}.{kind}-"
                                               f"{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def make_temporary_dir(path: str) -> str:
    """Create a fresh temporary folder beside `path` (for outputs that are whole folders),
    marked as ours so that sweep_stale may remove it once this process is gone; call
    `unmark_temporary_dir` before renaming it into place."""
    tmp = temporary_name(path)
    os.makedirs(tmp)
    with open(os.path.join(tmp, TEMPORARY_MARK), "w") as f:
        f.write(f"{os.getpid()}\n")
    return tmp


def unmark_temporary_dir(tmp: str) -> None:
    try:
        os.remove(os.path.join(tmp, TEMPORARY_MARK))
    except FileNotFoundError:
        pass


class DiskFullError(OSError):
    """An output that did not fit: the disk (or a quota, or a file size limit) is full. The
    message names the file; nothing half-written is left under the target's name."""

    def __str__(self) -> str:
        return str(self.strerror)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: the same said by writers that do not raise OSError: numpy's short write ("174080 requested
#: and 155520 written"), safetensors (Rust's "StorageFull", "File too large (os error 27)"),
#: torch.save ("PytorchStreamWriter failed writing file ...", "unexpected pos 704 vs 598")
_SHORT_WRITE = re.compile("|".join([r"\d+ requested and \d+ written", "StorageFull",
                                    "FileTooLarge", "PytorchStreamWriter failed writing",
                                    r"inline_container.cc:\d+\] \. unexpected pos"] +
                                   [re.escape(os.strerror(n)) for n in _FULL]))


def disk_full(e: BaseException) -> bool:
    """True if an error is a full disk, a quota, a file size limit or a short write."""
    return isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in _FULL) or \
        bool(_SHORT_WRITE.search(str(e)))


def disk_full_error(path: str, e: BaseException) -> DiskFullError:
    """The one-line DiskFullError for `path` from the error a writer raised."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno in _FULL else \
        f"a short write: {first}"
    err = DiskFullError(errno.ENOSPC, f"{path}: the disk is full ({why}); free space there or "
                                      f"write elsewhere")
    err.path = path
    return err


def _fsync(path: str, strict: bool = False) -> None:
    """Flush a written file (or a directory entry) to disk; a no-op where unsupported. With
    `strict`, a failure to flush (ENOSPC, EIO: data the disk did not take) is raised."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if strict and e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), flush it to disk, then rename it to path: readers never see half a
    file, and the previous file survives any failure of `write`.

    The temporary sits beside the target (same file system, so the rename is atomic) under a
    hidden name; it is removed if write fails. Parent folders are created. A full disk, a quota,
    a file size limit or a short write (also when only the flush finds it) raises DiskFullError
    naming `path`.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = temporary_name(path)
    try:
        try:
            write(tmp)
            _fsync(tmp, strict=True)
        except Exception as e:
            if disk_full(e):
                raise disk_full_error(path, e) from None
            raise
        os.replace(tmp, path)
        _fsync(directory)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def process_alive(pid: int) -> bool:
    """True if a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale(directory: str) -> List[str]:
    """Remove from `directory` (not recursive) the temporaries tbn-vit left when its process
    was killed; returns what was removed. Only its own: names of the form temporary_name and
    backup_name give, whose pid no longer runs; plain files, or folders made by
    make_temporary_dir (they hold its mark). Symbolic links, other programs' hidden files and
    those of live processes (another run writing right now) are left alone."""
    removed: List[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = OWN_TEMPORARY.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or process_alive(int(m.group(1))):
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                if not os.path.isfile(os.path.join(entry.path, TEMPORARY_MARK)):
                    continue
                shutil.rmtree(entry.path)
            elif entry.is_file(follow_symlinks=False):
                os.remove(entry.path)
            else:
                continue
            removed.append(entry.path)
        except OSError:
            pass
    return removed


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LockError(TbnError, RuntimeError):
    """The folder is in use by another run; the message names the holder."""


class FolderLock:
    """An exclusive lock on an output folder, held while a run writes into it.

    `fcntl.flock` on `<folder>/.tbn.lock`: the kernel releases it when the holder exits, however
    it exits (SIGKILL included), so a lock left by a dead process is simply taken over. The file
    also records who holds it (pid, host, command, start time) for the refusal message.
    Use as a context manager, or acquire()/release().
    """

    NAME = ".tbn.lock"

    def __init__(self, folder: str, what: str = "") -> None:
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, self.NAME)
        self.what = what or " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
        self._fd: Optional[int] = None

    def holder(self) -> str:
        """Who holds (or last held) the lock, from the lock file."""
        try:
            with open(self.path) as f:
                info = json.load(f)
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            return f"pid {info['pid']} on {info['host']} since {started}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def acquire(self) -> "FolderLock":
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise LockError(f"{self.folder} is in use by {self.holder()}; wait for it "
                                    f"to finish or choose another output folder") from None
                raise
            try:  # the holder may have released and removed the file between open and flock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.what,
                "started": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
            try:
                os.remove(self.path)
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
