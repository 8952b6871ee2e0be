"""tbn_runtime.files: temporaries that no other program's files match, a sweep that removes
only its own dead ones, and atomic writes that say a full disk as such, naming the file."""

from __future__ import annotations

import errno
import os

import pytest

from runtime_helpers import dead_pid
from tbn_runtime.files import (OWN_TEMPORARY, TEMPORARY_MARK, DiskFullError, atomic_write,
                               atomic_write_text, backup_name, make_temporary_dir, sweep_stale,
                               temporary_name)


def test_temporary_names_are_ours_and_never_repeat(tmp_path):
    names = {temporary_name(str(tmp_path / "f.png")) for _ in range(50)}
    assert len(names) == 50  # two writers of one target never share a temporary
    for name in names | {temporary_name(str(tmp_path / "v.mp4"), ".mp4"),
                         backup_name(str(tmp_path / "export"))}:
        base = os.path.basename(name)
        assert base.startswith(".tbn-") and OWN_TEMPORARY.match(base), base
        assert int(OWN_TEMPORARY.match(base).group(1)) == os.getpid()


def _entry(kind):
    """(make(dir, pid) -> path, removed by the sweep when its pid is dead)"""
    def own_file(d, pid):
        p = d / f".tbn-00000003.png.tmp-{pid}-0123abcd"
        p.write_bytes(b"half a png")
        return p

    def own_backup_dir(d, pid):
        p = d / f".tbn-export.old-{pid}-0123abcd"
        p.mkdir()
        (p / TEMPORARY_MARK).write_text("1\n")
        return p

    def own_name_unmarked_dir(d, pid):  # a folder that only looks like ours: not removed
        p = d / f".tbn-export.tmp-{pid}-0123abcd"
        p.mkdir()
        (p / "theirs").write_text("x")
        return p

    def own_name_symlink(d, pid):  # a link: not followed, not removed
        target = d / "target"
        target.write_text("precious")
        p = d / f".tbn-x.tmp-{pid}-0123abcd"
        p.symlink_to(target)
        return p

    def other_programs_file(d, pid):  # the old pattern, another program's name
        p = d / f".notes.txt.tmp-{pid}"
        p.write_text("theirs")
        return p

    def other_programs_dir(d, pid):
        p = d / f".cache.old-{pid}"
        p.mkdir()
        return p

    return {"own file": (own_file, True), "own marked folder": (own_backup_dir, True),
            "unmarked folder": (own_name_unmarked_dir, False),
            "symlink": (own_name_symlink, False),
            "another program's file": (other_programs_file, False),
            "another program's folder": (other_programs_dir, False)}[kind]


KINDS = ["own file", "own marked folder", "unmarked folder", "symlink",
         "another program's file", "another program's folder"]


@pytest.mark.parametrize("alive", [False, True], ids=["dead", "alive"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_sweep_removes_only_its_own_dead_temporaries(tmp_path, kind, alive):
    make, ours = _entry(kind)
    path = make(tmp_path, os.getppid() if alive else dead_pid())
    removed = sweep_stale(str(tmp_path))
    gone = ours and not alive
    assert removed == ([str(path)] if gone else [])
    assert os.path.lexists(path) != gone
    if kind == "symlink":
        assert (tmp_path / "target").read_text() == "precious"


def test_a_temporary_folder_is_swept_until_unmarked(tmp_path):
    tmp = make_temporary_dir(str(tmp_path / "export"))
    assert os.path.isfile(os.path.join(tmp, TEMPORARY_MARK))
    assert sweep_stale(str(tmp_path)) == []  # this process is alive


def _enospc(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half")
    raise OSError(errno.ENOSPC, "No space left on device")


def _short_write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half")
    raise OSError("174080 requested and 155520 written")  # numpy's tofile


def _safetensors(tmp):
    raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                       "message: \"No space left on device\" })")


@pytest.mark.parametrize("write", [_enospc, _short_write, _safetensors])
def test_a_full_disk_is_said_naming_the_file_and_the_old_file_stays(tmp_path, write):
    path = tmp_path / "m.npy"
    atomic_write_text(str(path), "old")
    with pytest.raises(DiskFullError) as e:
        atomic_write(str(path), write)
    text = str(e.value)
    assert text.startswith(f"{path}: the disk is full") and "\n" not in text, text
    assert "free space" in text
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["m.npy"]  # no temporary left


def test_other_errors_pass_through(tmp_path):
    def broken(tmp):
        raise ValueError("not a disk problem")
    with pytest.raises(ValueError, match="not a disk problem"):
        atomic_write(str(tmp_path / "x"), broken)
    assert os.listdir(tmp_path) == []
