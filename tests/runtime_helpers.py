"""Shared helpers of the tbn_runtime tests: one small export per session, synthetic videos,
the PyTorch clip reference, and a subprocess runner for tbn-run with torch blocked."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List, Sequence

import cv2
import numpy as np

from tbn_train.data.synth import synthetic_frames  # noqa: F401  (the one synthetic generator)

EXPORT_H, EXPORT_W = 64, 96
_CACHE: Dict[str, str] = {}


def get_export(tmp_path_factory) -> str:
    """Export dir of a random-init tbn_tiny (BN stats perturbed) at 64 x 96, made once."""
    if "dir" in _CACHE:
        return _CACHE["dir"]
    import torch
    from tbn_export.onnx_export import export_onnx
    from tbn_train.checkpoint import save_checkpoint
    from tbn_train.models import build_model, randomize_batchnorm

    torch.manual_seed(0)
    model = build_model("tbn_tiny").eval()
    randomize_batchnorm(model, seed=1)
    out = str(tmp_path_factory.mktemp("export"))
    ckpt = os.path.join(out, "model.safetensors")
    save_checkpoint(ckpt, model)
    export_onnx(model, out, EXPORT_H, EXPORT_W, checkpoint_path=ckpt)
    _CACHE["dir"] = out
    return out


def write_video(path: str, frames: Sequence[np.ndarray], fourcc: str = "mp4v",
                fps: float = 10.0) -> str:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def decode(path: str) -> List[np.ndarray]:
    """Every frame of a video file, read as tbn-run reads it (tbn_runtime.sources)."""
    from tbn_runtime.sources import open_source

    return [frame for _, frame in open_source(path)[0].frames()]


_REFS: Dict[str, List[np.ndarray]] = {}


def reference_labels(export_dir: str, frames: Sequence[np.ndarray],
                     key: str = "") -> List[np.ndarray]:
    """The clip-inference reference (tbn_train.reference) on frames resized as the stream
    resizes them, labels resized back with INTER_NEAREST. Cached under `key` when given."""
    if key and key in _REFS:
        return _REFS[key]
    from tbn_runtime.manifest import load_manifest
    from tbn_runtime.preprocess import resize_frame, resize_labels
    from tbn_train.checkpoint import load_model
    from tbn_train.reference import ClipReference

    man = load_manifest(export_dir)
    ref = ClipReference(load_model(man.checkpoint["path"])[0])
    out = [resize_labels(ref.labels(resize_frame(f, man.height, man.width)), *f.shape[:2])
           for f in frames]
    if key:
        _REFS[key] = out
    return out


NO_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['tbn_train'] = None; "
            "from tbn_runtime.cli import main; sys.exit(main())")


def _file_size_limit(limit: int):
    """preexec_fn: files of the child may not grow past `limit` bytes (RLIMIT_FSIZE): writes
    beyond fail with EFBIG, as on a full disk (Python ignores SIGXFSZ), without root."""
    def apply() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def tbn_run(*args: str, block_torch: bool = True, timeout: float = 120, cwd=None,
            fsize: int = 0):
    """Run tbn-run in a subprocess (torch blocked by default); returns CompletedProcess.
    fsize: a file size limit for the child (a full disk, as far as its writes go)."""
    cmd = [sys.executable, "-c", NO_TORCH] if block_torch else [sys.executable, "-m",
                                                                 "tbn_runtime"]
    env = None
    if cwd is not None:  # the checkout stays importable from another working directory
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run(cmd + ["--no-progress", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env,
                          preexec_fn=_file_size_limit(fsize) if fsize else None)


def dead_pid() -> int:
    """The pid of a process that has ended (for temporaries 'left by a killed run')."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def one_line_error(r, *needles: str) -> str:
    """Assert a tbn-run CompletedProcess failed with one `tbn-run: error:` line holding each of
    needles and no traceback; returns the line."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tbn-run: error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
