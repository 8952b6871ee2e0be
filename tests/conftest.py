"""Fixtures shared by the runtime tests."""

import pytest

from runtime_helpers import get_export


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """A tbn_tiny export (random weights, BatchNorm statistics randomised) at 64 x 96."""
    return get_export(tmp_path_factory)
