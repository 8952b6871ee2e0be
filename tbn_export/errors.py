"""Why tbn-export stops: each error is one line naming the cause and the fix, a TbnError that
tbn_runtime.console.run_command reports as `tbn-export: error: ...` (exit 2). Imports neither
torch nor onnx, so the command line can name them before either is loaded."""

from tbn_runtime.errors import TbnError, UsageError

__all__ = ["TbnError", "UsageError", "ExportError", "VerifyError", "Int8Error",
           "EngineBuildError"]


class ExportError(TbnError, ValueError):
    """An export that cannot be made as asked; the message says why and what to change."""


class VerifyError(TbnError, ValueError):
    """Frames that cannot be read or an export that cannot be run; one line for the user."""


class Int8Error(TbnError, ValueError):
    """Calibration frames that cannot be read, or a graph that cannot be quantized."""


class EngineBuildError(TbnError, RuntimeError):
    """A TensorRT parse or build failure; the message names the failing node or layer."""
