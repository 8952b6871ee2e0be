"""Helpers of the training and evaluation tests: a tiny tbn-synth dataset (64 x 96 frames)."""

from pathlib import Path

from tbn_train.data.synth import generate


def make_synth(root: Path) -> Path:
    """2 train videos and 1 val video of 12 frames, 64 x 96, 3 object classes."""
    generate(root, seed=1, height=64, width=96, videos_train=2, videos_val=1, videos_test=0,
             frames=12, classes=3)
    return root
