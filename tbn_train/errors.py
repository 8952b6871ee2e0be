"""Why a tbn_train command ends early: each error carries one line that names the cause and
the fix, and the commands turn it into that line and an exit code, never a traceback.

Each derives from tbn_runtime.errors.TbnError, which tbn_runtime.console.run_command turns into
the `prog: error: ...` line every command writes. Nothing here imports torch, so the command
lines can catch these before torch is loaded.
`DatasetError` is also importable from `tbn_train.data.vspw`, `CheckpointError` from
`tbn_train.checkpoint`.
"""

import logging
from typing import Optional

from tbn_runtime.errors import TbnError, UsageError

__all__ = ["TbnError", "UsageError", "ConfigError", "DatasetError", "CheckpointError",
           "NonFiniteLoss", "TrainingStopped"]


class ConfigError(UsageError):
    """A training config or flag that cannot be used (a ValueError too); names the field."""


class DatasetError(TbnError):
    """A problem with the dataset on disk; the message names the file and the fix.

    A DataLoader worker hands its exception to the main process as a class and a formatted
    traceback, and the main process raises `DatasetError("Caught DatasetError in DataLoader
    worker process 0.\\nOriginal Traceback ...\\n...DatasetError: <message>")`. Such a message
    is cut back to the original line here, so the user sees the same line with workers as
    without; the worker's traceback stays in `worker_traceback` (tbn-train -v logs it).
    """

    def __init__(self, message: object = "") -> None:
        text = str(message)
        self.worker_traceback: Optional[str] = None
        if text.startswith("Caught DatasetError") and "Traceback" in text:
            self.worker_traceback = text
            text = text.rstrip().splitlines()[-1].split("DatasetError: ", 1)[-1]
        super().__init__(text)


class LoaderDied(DatasetError):
    """A DataLoader worker process died or failed outside the dataset's own checks (killed by
    a small /dev/shm, a file size limit, the OOM killer); the message says the fix."""

    def __init__(self, cause: BaseException) -> None:
        lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
        what = lines[-1] if lines else type(cause).__name__
        super().__init__(f"a DataLoader worker failed ({what[:300]}): most often shared memory "
                         f"(/dev/shm) is too small for the batches; give it more (docker run "
                         f"--shm-size 8g) or load in the training process with --workers 0")
        self.worker_traceback = str(cause)


def worker_died(e: BaseException) -> bool:
    """True for the errors torch's DataLoader raises when a worker dies or fails on its own
    (not a DatasetError of the data, which carries its own line)."""
    text = str(e)
    return not isinstance(e, DatasetError) and ("DataLoader worker" in text or
                                                "shared memory" in text)


class CheckpointError(TbnError, ValueError):
    """A checkpoint or training state that cannot be used; the message names the file and the
    fix."""


class NonFiniteLoss(TbnError, RuntimeError):
    """The loss became NaN or infinite; nothing of the bad step is saved (exit 3)."""
    exit_code = 3


class TrainingStopped(TbnError):
    """Training stopped early with its last completed step saved (a signal, a data error).

    `exit_code`: 128 + the signal number (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1), 2 for a data
    error. `level`: the logging level its line is reported at.
    """

    def __init__(self, message: str, exit_code: int, level: int = logging.WARNING) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.level = level
