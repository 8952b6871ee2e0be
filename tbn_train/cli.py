"""What tbn-train, tbn-eval and tbn-synth share on the command line: argument errors as one
line, -v/-q, messages through `logging`, and progress bars that messages do not break.

Imports only the standard library (tqdm when a bar is made): every command answers --help
before torch is imported.
"""

import argparse
import contextlib
import logging
import sys
from typing import Iterator, Optional

LOGGER = "tbn_train"  # the package's loggers (tbn_train.train, tbn_train.engine...) are below it


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes raise ValueError (one line, exit 2 in the command's
    main) instead of printing the usage and calling sys.exit."""

    def error(self, message):
        raise ValueError(f"{message} (see {self.prog} --help)")


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
    """Send the package's messages to stderr as `prog: ...` lines; callable again (after the
    flags are parsed, after the process group is joined). Other ranks than 0 report warnings
    and errors only, as `prog[rank N]: ...`."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prog if rank == 0 else f"{prog}[rank {rank}]"))
    logger.addHandler(handler)
    level = logging.DEBUG if verbose else logging.INFO
    if quiet or rank != 0:
        level = logging.WARNING
    logger.setLevel(level)
    logger.propagate = False
    return logger


def show_progress(quiet: bool) -> bool:
    """Progress bars go to stderr when it is a terminal and -q is not given."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0,
                 leave: bool = True) -> Iterator[Optional[object]]:
    """A tqdm bar on stderr (a disabled one when not `enabled`), with the package's log
    messages printed above it instead of through it."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=leave,
              dynamic_ncols=True, file=sys.stderr) as bar:
        with logging_redirect_tqdm([logging.getLogger(LOGGER)]):
            yield bar
