"""What a user installs: `pip install tbn-vit` is the runtime alone (no torch), and it streams
a video through an export made with the full install; every command answers --help fast."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime_helpers import synthetic_frames, tbn_run, write_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def test_runtime_install_without_torch_streams_a_video(export_dir, tmp_path):
    from tbn_runtime.masks import read_label_png

    import shutil

    venv = tmp_path / "runtime-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    # the package from a copy of its sources: pip builds in the tree it is given
    src = tmp_path / "tbn-vit"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".whl", "build", "*.egg-info", "runs", "data", "__pycache__"))
    r = subprocess.run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        str(src)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr  # the runtime alone
    video = write_video(str(tmp_path / "street.mp4"), synthetic_frames(8, 48, 64, seed=21))

    # the command, then the Python API, in the runtime-only environment
    r = subprocess.run([str(venv / "bin" / "tbn-run"), video, "--out", str(tmp_path / "rt"),
                        "--model", export_dir, "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    api = ("from tbn_runtime import Segmenter\n"
           f"with Segmenter({export_dir!r}) as seg:\n"
           f"    print(sum(int(r.labels.max()) >= 0 for r in seg.stream({video!r})), seg.why)\n")
    r = subprocess.run([py, "-c", api], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("8 ort on cpu"), r.stdout + r.stderr
    # the same masks as the full installation's tbn-run
    r = tbn_run(video, "--out", str(tmp_path / "full"), "--model", export_dir)
    assert r.returncode == 0, r.stderr
    for i in range(8):
        name = f"{i:08d}.png"
        assert np.array_equal(read_label_png(tmp_path / "rt" / "street" / name),
                              read_label_png(tmp_path / "full" / "street" / name))
    # the torch backend says what to install
    r = subprocess.run([str(venv / "bin" / "tbn-run"), video, "--out", str(tmp_path / "t"),
                        "--model", export_dir, "--backend", "torch"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pip install 'tbn-vit[train]'" in r.stderr


COMMANDS = {"tbn-run": "tbn_runtime.cli", "tbn-export": "tbn_export.cli"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_fast_and_explains_every_flag(command):
    import importlib

    t0 = time.perf_counter()
    r = subprocess.run([os.path.join(BIN, command), "--help"], capture_output=True, text=True,
                       timeout=60)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {command}")
    # measured ~0.3-0.5 s on an idle 2-core machine; the bound allows a loaded one
    assert seconds < 5, f"{command} --help took {seconds:.1f} s"
    parser = importlib.import_module(COMMANDS[command]).build_parser()
    silent = [a.dest for a in parser._actions if not a.help]
    assert not silent, f"{command}: flags without help: {silent}"
