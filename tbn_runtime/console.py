"""What the tbn commands share on the command line: one wrapper around every command's body
(`run_command`: one error format, one set of exit codes), argument errors as one line, -v/-q,
messages through `logging` as `prog: message` lines on stderr, and progress bars, on a terminal
only, that messages do not break.

Exit codes of every command (tbn_runtime.errors): 0 done; 1 some of the work failed (each
failure said as it happened); 2 a mistake in the request or its inputs (one `prog: error:`
line, found before any work); 130 Ctrl-C; 143 SIGTERM. tbn-train adds its own (see its --help).

Imports only the standard library (tqdm when a bar is made): every command answers --help
before torch, OpenCV or ONNX Runtime is imported.
"""

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import Callable, Iterator, Optional, Tuple, Type

from .errors import (EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, Stopped, TbnError,
                     UsageError)

#: where tbn-train and tbn-export put their outputs by default (tbn-run and tbn-export read it)
DEFAULT_RUN = "runs/tbn"
#: the packages' loggers (tbn_train.train, tbn_runtime, ...) are these or below them
LOGGERS = ("tbn_runtime", "tbn_train", "tbn_export")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes raise UsageError (one line, exit 2 through
    run_command) instead of printing the usage and calling sys.exit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows an option's default where it says something: not for flags (False),
    options without one (None), or help that states its default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="more messages (debug level, worker tracebacks of data errors)")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="warnings and errors only, no progress bar")


class _Formatter(logging.Formatter):
    """`prog: message`, `prog: warning: message`, `prog: error: message`."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        kind = ("error: " if record.levelno >= logging.ERROR else
                "warning: " if record.levelno >= logging.WARNING else "")
        return f"{self.prog}: {kind}{record.getMessage()}"


def setup_logging(prog: str, verbose: bool = False, quiet: bool = False,
                  rank: int = 0) -> logging.Logger:
    """Send the packages' messages to stderr as `prog: ...` lines; callable again (after the
    flags are parsed, after the process group is joined). Other ranks than 0 report warnings
    and errors only, as `prog[rank N]: ...`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prog if rank == 0 else f"{prog}[rank {rank}]"))
    level = logging.DEBUG if verbose else logging.INFO
    if quiet or rank != 0:
        level = logging.WARNING
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return logging.getLogger(LOGGERS[0])


def show_progress(quiet: bool) -> bool:
    """Progress bars go to stderr when it is a terminal and -q is not given."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(total: Optional[int], desc: str, enabled: bool, initial: int = 0,
                 leave: bool = True, unit: str = "it") -> Iterator[Optional[object]]:
    """A tqdm bar on stderr (a disabled one when not `enabled`), with the package's log
    messages printed above it instead of through it."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=leave,
              unit=unit, dynamic_ncols=True, smoothing=0.1, file=sys.stderr) as bar:
        with logging_redirect_tqdm([logging.getLogger(name) for name in LOGGERS]):
            yield bar


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Stopped()


def run_command(prog: str, body: Callable[[], int], *, sigterm: bool = True,
                user_errors: Tuple[Type[BaseException], ...] = (),
                interrupted: str = "interrupted", stopped: str = "stopped (SIGTERM)") -> int:
    """Run a command's body and return its exit code, the same way for every command.

    A TbnError (and any of `user_errors`, exit 2) becomes one `prog: error: message` line and
    its exit_code; an OSError one line naming the file, exit 2; Ctrl-C `prog: warning:
    <interrupted>`, 130; SIGTERM (turned into Stopped while the body runs, when `sigterm` and on
    the main thread) `<stopped>`, 143; SystemExit (--help) its code. Never a traceback for
    these. Logging is set up for `prog` first, so the body may call setup_logging again with
    its flags.
    """
    setup_logging(prog)
    log = logging.getLogger(LOGGERS[0])
    install = sigterm and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if install else None
    try:
        return body()
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except TbnError as e:
        log.log(getattr(e, "level", logging.ERROR), "%s", first_line(e))
        return e.exit_code
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        log.error("%s%s", where, e.strerror or first_line(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.warning("%s", interrupted)
        return EXIT_INTERRUPTED
    except Stopped:
        log.warning("%s", stopped)
        return EXIT_TERMINATED
    except user_errors as e:
        log.error("%s", first_line(e))
        return EXIT_USAGE
    finally:
        if install:
            signal.signal(signal.SIGTERM, previous)
