"""tbn-train when things go wrong, as a table: each bad input or fault must give its exit
code and one error line naming the cause and the fix, no traceback, and lose nothing saved.

Data faults are placed in masks that the check before the first step does not sample (middle
frames) and that training reads at a known step (the sampler's order is a function of the
seed), so they exercise the per-item checks, with a DataLoader worker where it matters."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from tbn_runtime.classes import PALETTE
from tbn_runtime.files import FolderLock
from tbn_train import train
from tbn_train.checkpoint import read_metadata
from tbn_train.data.vspw import index_split
from tbn_train.preemption import StopRequest
from tbn_train.sampling import GlobalBatchSampler

from train_helpers import logged_steps, train_args, trained_run
from train_helpers import synth_root  # noqa: F401 (a fixture)

RUN = ("--iters", "2", "--batch-size", "2")  # the finished run the run-dir cases start from


@pytest.fixture(scope="module")
def finished_run(synth_root, tmp_path_factory):
    return trained_run(tmp_path_factory, "finished", synth_root, *RUN)


def _mask_read_at(data: Path, first_step: int, middle: bool = True) -> Tuple[Path, int]:
    """A training mask (of a middle frame: one the check before training does not sample) and
    the step (>= first_step) that reads it: batch 2, seed 0, as in the cases below."""
    videos = index_split(data, "train")
    frames = len(videos[0])
    sampler = GlobalBatchSampler(sum(len(v) for v in videos), 2, seed=0)
    for step, batch in enumerate(sampler, start=1):
        for index, _ in batch:
            v, t = divmod(index, frames)
            if step >= first_step and (0 < t < frames - 1 or not middle):
                return videos[v].masks[t], step
    raise AssertionError("no middle-frame mask in the first epoch")


def _write_raw(path: Path, value: int) -> None:
    shape = np.array(Image.open(path)).shape
    img = Image.fromarray(np.full(shape, value, np.uint8))
    img.putpalette(PALETTE.tobytes())
    img.save(path)


def _corrupt_train_mask(data: Path) -> Tuple[Path, int]:
    mask, step = _mask_read_at(data, 3)
    mask.write_bytes(b"not a png")
    return mask, step - 1


def _corrupt_first_mask(data: Path) -> Tuple[Path, int]:
    mask, _ = _mask_read_at(data, 1, middle=False)
    mask.write_bytes(b"")
    return mask, 0


def _label_beyond_classes(data: Path) -> Tuple[Path, int]:
    mask, step = _mask_read_at(data, 3)
    _write_raw(mask, 110)  # train id 109: VSPW's, but beyond --num-classes 100
    return mask, step - 1


def _corrupt_val_mask(data: Path) -> Tuple[Path, int]:
    mask = data / "data" / "val_000" / "mask" / "00000005.png"
    mask.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return mask, 2  # the first evaluation, at step 2


def _garbage_state(run: Path) -> None:
    (run / "stage1" / "last.state.pt").write_bytes(b"PK\x03\x04 a damaged zip")


class Evil:  # what a pickle could make torch.load construct, if it were allowed to
    pass


def _pickled_state(run: Path) -> None:
    torch.save({"step": 2, "payload": Evil()}, run / "stage1" / "last.state.pt")


@dataclass
class Fault:
    id: str
    extra: Tuple[str, ...]             # tbn-train flags after train_args(data, out)
    code: int
    words: Tuple[str, ...]             # in the error line; {file}: the broken file
    from_run: bool = False             # OUT starts as a copy of the finished run
    break_run: Optional[Callable[[Path], None]] = None
    break_data: Optional[Callable[[Path], Tuple[Path, int]]] = None  # -> file, step saved
    absent: Tuple[str, ...] = ("Traceback", "weights_only")
    held: bool = False                 # OUT is locked by another run the whole time


FAULTS = [
    Fault("run exists, other settings", ("--iters", "3", "--batch-size", "2"), 2,
          ("already holds", "--resume", "--overwrite"), from_run=True),
    Fault("resume, nothing to resume", ("--resume",), 2, ("nothing to resume",)),
    Fault("resume and overwrite", (*RUN, "--resume", "--overwrite"), 2, ("not both",),
          from_run=True),
    Fault("resume with another lr", (*RUN, "--resume", "--lr", "0.1"), 2,
          ("change how", "lr 0.05 -> 0.1", "--overwrite"), from_run=True),
    Fault("resume, corrupt state", (*RUN, "--resume"), 2, ("last.state.pt", "corrupt"),
          from_run=True, break_run=_garbage_state),
    Fault("resume, pickled state", (*RUN, "--resume"), 2,
          ("last.state.pt", "pickled Python objects", "not be unpickled"), from_run=True,
          break_run=_pickled_state),
    Fault("fewer classes than the data", ("--num-classes", "10", *RUN), 2,
          ("mask/00000000.png", "10 classes", "--num-classes")),
    Fault("corrupt training mask, in a worker", ("--iters", "8", "--batch-size", "2",
                                                 "--workers", "1"), 2,
          ("{file}", "cannot read the mask", "is saved", "--resume"),
          break_data=_corrupt_train_mask),
    Fault("corrupt mask in the first step", ("--iters", "8", "--batch-size", "2"), 2,
          ("{file}", "before its first step (nothing to save)", "run the command again"),
          break_data=_corrupt_first_mask),
    Fault("label beyond --num-classes, unsampled mask", ("--iters", "8", "--batch-size", "2",
                                                          "--num-classes", "100"), 2,
          ("{file}", "train ids [109]", "--num-classes", "--resume"),
          break_data=_label_beyond_classes),
    Fault("corrupt val mask at the first evaluation", ("--iters", "4", "--batch-size", "2",
                                                       "--eval-interval", "2"), 2,
          ("{file}", "cannot read the mask", "step 2/4 is saved", "--resume"),
          break_data=_corrupt_val_mask),
    Fault("another tbn-train holds OUT", RUN, 2,
          ("in use by", f"pid {os.getpid()}", "tbn-train --other", "another output folder"),
          held=True),
    Fault("another tbn-train holds a finished OUT", RUN, 2, ("in use by",), from_run=True,
          held=True),
    Fault("--data is a file", ("--data", __file__, *RUN), 2,
          (__file__, "is a file, not a folder", "dataset root")),
]


def _contents(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != FolderLock.NAME}


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault(fault, synth_root, finished_run, tmp_path, capsys):
    data, out, broken, saved_step = synth_root, tmp_path / "run", None, None
    if fault.break_data:
        data = tmp_path / "data"
        shutil.copytree(synth_root, data)
        broken, saved_step = fault.break_data(data)
    if fault.from_run:
        shutil.copytree(finished_run, out)
        if fault.break_run:
            fault.break_run(out)
    before = _contents(out) if out.exists() else {}
    capsys.readouterr()

    if fault.held:
        with FolderLock(str(out), "tbn-train --other"):
            before = _contents(out)
            code = train.main(train_args(data, out, *fault.extra))
    else:
        code = train.main(train_args(data, out, *fault.extra))

    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("tbn-train: error: ")]
    assert code == fault.code and len(errors) == 1, err
    for word in fault.words:
        assert word.replace("{file}", str(broken)) in errors[0], errors[0]
    for word in fault.absent:
        assert word not in err, err
    if not saved_step:  # refused or stopped before the first step: what was there is as it was
        after = _contents(out) if out.exists() else {}
        assert {k: after.get(k) for k in before} == before
        assert set(after) - set(before) <= {"config.json"}
    else:  # stopped in training: the last completed step is saved, and its log matches
        state = torch.load(out / "stage1" / "last.state.pt", weights_only=True)
        assert state["step"] == saved_step
        assert read_metadata(str(out / "stage1" / "last.safetensors"))["extra"]["step"] == \
            saved_step
        assert logged_steps(out) == list(range(1, saved_step + 1))


def test_worker_death_during_evaluation(synth_root, tmp_path, capsys, monkeypatch):
    """A training worker that dies while rank 0 evaluates (torch raises it from its SIGCHLD
    handler, inside evaluation) gives the loader's one line, after last.* is saved."""
    from tbn_train import engine

    def worker_killed(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is "
                           "possible that dataloader's workers are out of shared memory.")

    monkeypatch.setattr(engine, "evaluate_model", worker_killed)
    out = tmp_path / "run"
    code = train.main(train_args(synth_root, out, "--iters", "4", "--batch-size", "2",
                                 "--eval-interval", "2"))
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("tbn-train: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for word in ("DataLoader worker failed", "Bus error", "/dev/shm", "step 2/4 is saved",
                 "--resume"):
        assert word in errors[0], errors[0]
    state = torch.load(out / "stage1" / "last.state.pt", weights_only=True)
    assert state["step"] == 2 and logged_steps(out) == [1, 2]


# -- I/O faults, real ones: RLIMIT_FSIZE makes writes past the limit fail (EFBIG), as a full disk
# does, for safetensors' writer and for the shared memory a DataLoader worker hands batches in
@dataclass
class IOFault:
    id: str
    extra: Tuple[str, ...]
    fsize: int                       # bytes a file of the training process may grow to
    code: int
    words: Tuple[str, ...]


IO_FAULTS = [
    IOFault("full disk at the first checkpoint", ("--iters", "2", "--batch-size", "2"),
            200_000, 1, ("stage1/best.safetensors: the disk is full", "saved before in",
                         "--resume")),
    IOFault("worker's shared memory refused", ("--iters", "2", "--batch-size", "2",
                                               "--workers", "1"),
            200_000, 2, ("DataLoader worker failed", "/dev/shm", "--workers 0",
                         "nothing to save")),
]


@pytest.mark.parametrize("fault", IO_FAULTS, ids=[f.id for f in IO_FAULTS])
def test_io_fault(fault, synth_root, tmp_path):
    out = tmp_path / "run"

    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (fault.fsize, fault.fsize))

    r = subprocess.run([sys.executable, "-m", "tbn_train.train",
                        *train_args(synth_root, out, *fault.extra)], capture_output=True,
                       text=True, timeout=600, preexec_fn=limit)
    errors = [x for x in r.stderr.splitlines() if x.startswith("tbn-train: error: ")]
    assert r.returncode == fault.code and len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for word in fault.words:
        assert word in errors[0], errors[0]
    left = [p.name for p in out.rglob("*")]
    assert not [n for n in left if ".tmp-" in n], left  # no half-written temporary
    assert not (out / "stage1" / "last.safetensors").exists()  # nothing half-saved in place
    assert not (out / FolderLock.NAME).exists()  # the run's lock went with it


def test_resume_may_extend_the_schedule(finished_run, synth_root, tmp_path, capsys):
    """A longer --iters continues a finished stage; the change is listed, not refused. The
    log loses what a kill -9 left in it after the last save, instead of repeating it."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with open(out / "stage1" / "metrics.jsonl", "a") as f:
        f.write('{"stage": 1, "step": 3, "loss": 9.5, "lr": 0.01, "it_s": 1.0}\n')
    assert train.main(train_args(synth_root, out, "--iters", "3", "--batch-size", "2",
                                 "--resume")) == 0
    err = capsys.readouterr().err
    assert "changed settings" in err and "iters 2 -> 3" in err, err
    assert logged_steps(out) == [1, 2, 3]
    assert torch.load(out / "stage1" / "last.state.pt", weights_only=True)["step"] == 3


def test_the_same_command_after_a_finished_run_does_nothing(finished_run, synth_root, tmp_path,
                                                             capsys):
    """make demo, then the README's tbn-train --preset demo: the run is there, finished with
    these settings; nothing is trained, deleted or rewritten."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert train.main(train_args(synth_root, out, *RUN, "--workers", "0")) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_overwrite_starts_again(finished_run, synth_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "stage1" / "metrics.jsonl").write_text('{"stage": 1, "step": 99, "loss": 1.0}\n')
    assert train.main(train_args(synth_root, out, *RUN, "--overwrite")) == 0
    assert logged_steps(out) == [1, 2]  # the old log is gone, not appended to


# -- the signals themselves (the end-to-end SIGTERM runs are in test_train.py) ------------------
def test_stop_request_turns_signals_into_a_flag():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's --signal=USR1@SECONDS
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal keeps the first one's name
        assert stop.requested and stop.name == "SIGUSR1" and stop.exit_code == 138
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with stop.critical():  # a second Ctrl-C waits until the update is complete
                os.kill(os.getpid(), signal.SIGINT)
                reached.append(True)
        assert reached == [True]
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_second_ctrl_c_forces_outside_critical_sections_only():
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and stop.exit_code == 130
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # not reached: the second Ctrl-C raises at once
    assert signal.getsignal(signal.SIGINT) == previous
    with StopRequest(force_on_second_sigint=False) as stop:  # torchrun forwards Ctrl-C again
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.name == "SIGINT"
