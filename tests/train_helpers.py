"""Helpers of the training and evaluation tests: a tiny tbn-synth dataset (64 x 96 frames, also
as the module fixture `synth_root`), the tbn-train arguments the tests share, finished runs,
and reading and signalling a training process."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tbn_train.data.synth import generate


def make_synth(root: Path) -> Path:
    """2 train videos and 1 val video of 12 frames, 64 x 96, 3 object classes."""
    generate(root, seed=1, height=64, width=96, videos_train=2, videos_val=1, videos_test=0,
             frames=12, classes=3)
    return root


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """make_synth's dataset, once per test module that imports this fixture."""
    return make_synth(tmp_path_factory.mktemp("data") / "synth")


def train_args(root, out, *extra):
    """tbn-train arguments: the demo preset on `root`, tiny crops, CPU, a log line per step."""
    return ["--preset", "demo", "--data", str(root), "--out", str(out), "--crop-size", "64", "64",
            "--workers", "0", "--eval-interval", "100", "--log-interval", "1", "--device", "cpu",
            *extra]


def trained_run(tmp_path_factory, name, root, *extra):
    """A finished tbn-train run (train_args(root, ...) + extra) in a fresh folder."""
    from tbn_train import train

    out = tmp_path_factory.mktemp(name) / "run"
    assert train.main(train_args(root, out, *extra)) == 0
    return out


def logged_steps(out, stage=1):
    """The steps metrics.jsonl has a loss for."""
    path = Path(out) / f"stage{stage}" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def wait_for_step(proc, out, step, timeout=300.0):
    """Wait until the training subprocess `proc` has logged `step`; fail if it ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(s >= step for s in logged_steps(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before step {step}: "
                                 f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def sigterm_after_step(cmd, out, step, env=None):
    """Start the training command `cmd` (writing to `out`), send it SIGTERM once it has logged
    `step`, and return (its exit code, its stderr)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_step(proc, out, step)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, err
