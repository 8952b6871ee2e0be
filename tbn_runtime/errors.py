"""The one base of every error a user of tbn-vit can cause or fix, and how commands exit.

Each package's errors derive from TbnError (tbn_runtime's SourceError, ManifestError,
BackendError, ...; tbn_train.errors; tbn_export.errors), whose message is one line naming the
problem and its fix. `tbn_runtime.console.run_command` prints it as `prog: error: message` and
exits with its `exit_code`. Imports nothing: every module may use it.
"""

#: exit codes of every command
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class TbnError(Exception):
    """A user-facing error: one line (problem + fix); the command exits with `exit_code`
    (2: a mistake in the request or its inputs, found before any work; 1: work that failed)."""
    exit_code = EXIT_USAGE


class UsageError(TbnError, ValueError):
    """A flag or argument that cannot be used (argparse's mistakes, flags that conflict)."""


class BackendError(TbnError, RuntimeError):
    """A backend that cannot run here (not installed, wrong GPU, bad engine); one-line message."""


class Stopped(BaseException):
    """SIGTERM (kill, timeout, Slurm, Kubernetes): stop like Ctrl-C (exit 143)."""
