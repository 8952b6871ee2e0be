"""Messages of the tbn commands: `prog: message` lines on stderr through `logging`, that a
progress bar does not break (tqdm's logging redirect) and -v / -q tune.

    setup_logging("tbn-run", verbose=args.verbose, quiet=args.quiet)
    log = logging.getLogger("tbn_runtime")         # or tbn_train, tbn_export
    log.info("model %s", path)
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("tbn_runtime", "tbn_train", "tbn_export")


def setup_logging(prog: str, verbose: bool = False, quiet: bool = False) -> None:
    """Route the tbn packages' loggers to stderr as `prog: message` (INFO; DEBUG with verbose;
    errors only with quiet)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def add_verbosity_flags(parser) -> None:
    """-v/--verbose and -q/--quiet on an argparse parser (mutually exclusive)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="more messages")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="errors only (and no progress bar)")
