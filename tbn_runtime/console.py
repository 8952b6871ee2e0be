"""What the tbn commands share on the command line: argument errors as one line, -v/-q,
messages through `logging` as `prog: message` lines on stderr, and progress bars that messages
do not break.

Imports only the standard library (tqdm when a bar is made): every command answers --help
before torch, OpenCV or ONNX Runtime is imported.
"""

import argparse
import contextlib
import logging
import sys
from typing import Iterator, Optional

#: the packages' loggers (tbn_train.train, tbn_runtime, ...) are these or below them
LOGGERS = ("tbn_runtime", "tbn_train", "tbn_export")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes raise ValueError (one line, exit 2 in the command's
    main) instead of printing the usage and calling sys.exit."""

    def error(self, message):
        raise ValueError(f"{message} (see {self.prog} --help)")


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
