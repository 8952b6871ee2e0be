"""Fixtures shared by the runtime tests."""

import pytest

from runtime_helpers import get_export


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """A tbn_tiny export (random weights, BatchNorm statistics randomised) at 64 x 96."""
    return get_export(tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def _openvino_cache(tmp_path_factory):
    """The openvino backend caches compiled models per user; the tests keep theirs apart."""
    import os

    old = os.environ.get("TBN_OPENVINO_CACHE")
    os.environ["TBN_OPENVINO_CACHE"] = str(tmp_path_factory.mktemp("openvino-cache"))
    yield
    if old is None:
        os.environ.pop("TBN_OPENVINO_CACHE", None)
    else:
        os.environ["TBN_OPENVINO_CACHE"] = old
