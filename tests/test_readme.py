"""The README's command chain runs as typed: each command's default input is the previous
command's default output, in a folder that holds nothing but the repository's benchmarks.

The block is found by its marker comment, so the test runs whatever the README says. Only the
sizes are made smaller, by flags appended to three commands (fewer and shorter videos, 20
training steps, 3 timed frames); the paths, defaults and hand-offs are the README's. A command
that is not in SMALLER runs exactly as written.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-chain"

# appended to a command that starts with the key (the README's own flags stay first)
SMALLER = {
    "tbn-synth": ["--videos-train", "2", "--videos-val", "1", "--videos-test", "1",
                  "--frames", "12"],
    "tbn-train": ["--iters", "20", "--eval-interval", "20", "--warmup-iters", "2"],
    "python benchmarks/latency.py": ["--frames", "3", "--warmup", "1"],
}


def chain(readme: str) -> list:
    """The lines of the first ``` block after the marker."""
    assert MARKER in readme, f"README.md has no {MARKER} block"
    after = readme.split(MARKER, 1)[1]
    start = after.index("```")
    body = after[after.index("\n", start) + 1:]
    return [line.strip() for line in body[:body.index("```")].splitlines() if line.strip()]


def test_the_chain_block_is_found():
    lines = chain((ROOT / "README.md").read_text())
    assert lines and all(not line.startswith("#") for line in lines)
    assert chain("x\n<!-- readme-chain -->\n```\na b\n\nc\n```\n```\nd\n```") == ["a b", "c"]


@pytest.mark.timeout(900)
def test_readme_chain_runs_as_typed(tmp_path):
    lines = chain((ROOT / "README.md").read_text())
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONUNBUFFERED="1")
    outputs = {}
    for line in lines:
        argv = shlex.split(line)
        for prefix, extra in SMALLER.items():
            if line.startswith(prefix):
                argv += extra
        if argv[0] == "python":
            argv[0] = sys.executable  # the venv's python, as `source .venv/bin/activate` gives
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"`{line}` exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr, f"`{line}`:\n{r.stderr}"
        outputs[argv[0].split("/")[-1] if argv[0] != sys.executable else argv[1]] = r

    # what the chain made, each command from the one before it
    assert (tmp_path / "runs/tbn/best.safetensors").is_file()
    assert (tmp_path / "runs/tbn/export-fp16/manifest.json").is_file()
    val = (tmp_path / "data/synth/val.txt").read_text().split()
    assert val
    for video in val:
        truth = sorted((tmp_path / "data/synth/data" / video / "mask").glob("*.png"))
        masks = sorted((tmp_path / "runs/tbn/masks" / video).glob("*.png"))
        assert [m.name for m in masks] == [t.name for t in truth]
        assert np.asarray(Image.open(masks[0])).shape == np.asarray(Image.open(truth[0])).shape
    assert "mIoU" in outputs["tbn-eval"].stdout + outputs["tbn-eval"].stderr
    # tbn-run took what the chain's tbn-export made, and said so first
    assert "runs/tbn/export-fp16" in outputs["tbn-run"].stderr.splitlines()[0]
    latency = outputs["benchmarks/latency.py"]
    assert "runs/tbn/export-fp16" in latency.stderr  # it found the export tbn-export wrote
    assert "(trained weights)" in latency.stdout
    assert "ONNX Runtime fp16" in latency.stdout and "tbn-run end to end" in latency.stdout
