"""The command lines a newcomer meets first: --help at once (torch is not imported for it),
every training flag explained with its default, messages through logging that progress bars
do not break, -q."""

import logging
import re
import subprocess
import sys
import time

import pytest

from tbn_runtime import console as cli
from tbn_train.config import FIELD_HELP, FIELDS
from tbn_train.data import synth
from tbn_train.train import build_parser


@pytest.mark.parametrize("module", ["tbn_train.train", "tbn_train.evaluate",
                                    "tbn_train.data.synth"])
def test_help_answers_without_importing_torch(module):
    code = (f"import sys\nfrom {module} import main\nassert main(['--help']) == 0\n"
            f"heavy = sorted(m for m in ('torch', 'timm', 'safetensors') if m in sys.modules)\n"
            f"assert not heavy, heavy\n")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    seconds = time.perf_counter() - start
    print(f"{module} --help: {seconds:.2f} s")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout
    assert seconds < 5, f"{module} --help took {seconds:.1f} s"  # generous: ~0.5 s measured


def test_every_config_field_has_an_explained_flag_with_its_default():
    assert set(FIELD_HELP) == set(FIELDS)
    parser = build_parser([])
    flags = {a.dest: a for a in parser._actions}
    for name in FIELDS:
        if name == "model_kwargs":  # a mapping: YAML or --set
            continue
        assert name in flags, name
        assert FIELD_HELP[name] in flags[name].help and "(default: " in flags[name].help, name
    assert "(default: 0.002)" in flags["lr"].help  # the paper's recipe
    demo = {a.dest: a for a in build_parser(["--preset", "demo"])._actions}
    assert "(default: 0.05)" in demo["lr"].help and "(default: tbn_tiny)" in demo["model"].help


def test_log_lines_stay_whole_above_a_progress_bar(capsys):
    cli.setup_logging("tbn-train")
    with cli.progress_bar(3, "stage 1", enabled=True) as bar:
        bar.update(1)
        logging.getLogger("tbn_train.stage").info("stage 1 step 1/3: val mIoU 1.00")
        bar.update(1)
    segments = [s.strip() for s in re.split(r"[\r\n]", capsys.readouterr().err)]
    assert "tbn-train: stage 1 step 1/3: val mIoU 1.00" in segments, segments


def test_synth_says_what_it_wrote_and_nothing_with_q(tmp_path, capsys):
    small = ["--videos-train", "1", "--videos-val", "0", "--videos-test", "0", "--frames", "2",
             "--height", "16", "--width", "16"]
    assert synth.main(["--out", str(tmp_path / "a"), *small]) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("tbn-synth: wrote 1 videos") and not captured.err
    assert synth.main(["--out", str(tmp_path / "b"), "-q", *small]) == 0
    assert capsys.readouterr() == ("", "")
    assert synth.main(["--out", str(tmp_path / "b"), *small]) == 0  # the same: nothing to do
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to do" in err[0] and err[0].startswith("tbn-synth: ")
    other = [*small[:-1], "24"]  # another width: a different dataset, refused
    assert synth.main(["--out", str(tmp_path / "b"), *other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and err[0].startswith("tbn-synth: error")


@pytest.mark.parametrize("module", ["tbn_runtime.cli", "tbn_train.evaluate"])
def test_help_states_each_default_once_and_only_a_real_one(module):
    import importlib

    text = importlib.import_module(module).build_parser().format_help()
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert "(default: auto)" in flat  # a real default is still shown
    for option in re.split(r"\s(?=--?[a-z])", flat):
        assert option.count("(default") <= 1, option


# -- one command wrapper, one error format, one set of exit codes ---------------------------------
@pytest.mark.parametrize("module, prog", [("tbn_runtime.cli", "tbn-run"),
                                          ("tbn_train.train", "tbn-train"),
                                          ("tbn_train.evaluate", "tbn-eval"),
                                          ("tbn_train.data.synth", "tbn-synth"),
                                          ("tbn_export.cli", "tbn-export")])
def test_every_command_says_a_mistake_in_one_error_line(module, prog, capsys):
    import importlib

    assert importlib.import_module(module).main(["--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert f"see {prog} --help" in err[0]


def test_run_command_exit_codes_and_lines(capsys, tmp_path):
    from tbn_runtime.errors import Stopped, TbnError

    class WorkFailed(TbnError):
        exit_code = 1

    def raising(e):
        def body():
            raise e
        return body

    cases = [(raising(TbnError("bad input: fix it\nsecond line")), 2,
              "x: error: bad input: fix it"),
             (raising(WorkFailed("a video failed")), 1, "x: error: a video failed"),
             (raising(FileNotFoundError(2, "No such file or directory", str(tmp_path / "f"))),
              2, f"x: error: {tmp_path / 'f'}: No such file or directory"),
             (raising(KeyboardInterrupt()), 130, "x: warning: interrupted"),
             (raising(Stopped()), 143, "x: warning: stopped (SIGTERM)"),
             (lambda: 1, 1, None), (lambda: 0, 0, None)]
    for body, code, line in cases:
        assert cli.run_command("x", body) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ([line] if line else []), (code, err)
    with pytest.raises(ValueError):   # not a user's mistake unless the command says so
        cli.run_command("x", raising(ValueError("a bug")))
    assert cli.run_command("x", raising(ValueError("n > 0")), user_errors=(ValueError,)) == 2


def test_every_user_facing_error_is_a_tbn_error():
    from tbn_export.errors import EngineBuildError, ExportError, Int8Error, VerifyError
    from tbn_runtime.backends import BackendError
    from tbn_runtime.cluster import ClusterError
    from tbn_runtime.cuda import CudaError
    from tbn_runtime.errors import TbnError, UsageError
    from tbn_runtime.files import LockError
    from tbn_runtime.manifest import ManifestError
    from tbn_runtime.overlay import OverlayError
    from tbn_runtime.sources import SourceError
    from tbn_runtime.stream import StreamError
    from tbn_train.errors import (CheckpointError, ConfigError, DatasetError, NonFiniteLoss,
                                  TrainingStopped)

    for cls in (EngineBuildError, ExportError, Int8Error, VerifyError, BackendError,
                ClusterError, CudaError, UsageError, LockError, ManifestError, OverlayError,
                SourceError, StreamError, CheckpointError, ConfigError, DatasetError,
                NonFiniteLoss, TrainingStopped):
        assert issubclass(cls, TbnError), cls
