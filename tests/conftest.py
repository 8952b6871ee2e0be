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


@pytest.fixture(autouse=True)
def _default_sigchld():
    """torch's DataLoader leaves its SIGCHLD handler installed in the process after a training
    test; a later test that runs OpenVINO and then a subprocess then dies of SIGSEGV when that
    child exits (seen: test_ablation, then test_benchmarks' latency rows). Each test starts with
    the default disposition, as a fresh command would."""
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    yield
