"""Stop training cleanly on a signal, the way schedulers and users stop jobs.

SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`, Slurm at the time limit or on scancel, Kubernetes
when it deletes a pod, torchrun passing on its own) and SIGUSR1 (Slurm's `--signal=USR1@SECS`
warning) only set a flag. The training loop reads it once per step at a point every process
reaches (tbn_train.engine.halt_if_asked), so all ranks stop at the same step, rank 0 saves, and
`--resume` continues as if nothing had happened. A second Ctrl-C in a single process stops at
once, between two updates (never inside one), keeping the last completed step; under torchrun a
repeated signal is normal (the launcher forwards the terminal's Ctrl-C), so it only sets the
flag again.

Launchers kill after a grace period (Slurm's KillWait, Kubernetes'
terminationGracePeriodSeconds, torchrun's 30 s after forwarding): one step and one save must fit
in it. What a SIGKILL can still lose is bounded by the time-based save (`save_minutes`).
"""

import contextlib
import signal
import threading
from typing import Dict, Iterator, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Within `with StopRequest():` the stop signals set `requested` instead of ending the
    process (installed from the main thread only; elsewhere signals keep their handlers)."""

    def __init__(self, force_on_second_sigint: bool = True) -> None:
        self.signum: Optional[int] = None
        self._force = force_on_second_sigint
        self._critical = 0
        self._forced_late = False
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT and self._force:
            if self._critical:
                self._forced_late = True  # raised when the update is complete
                return
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Hold a forced stop (second Ctrl-C) until the block is done: an optimizer update or a
        save is never cut in half."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            if not self._critical and self._forced_late:
                self._forced_late = False
                raise KeyboardInterrupt


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: workers ignore the stop signals (a terminal's Ctrl-C reaches
    the whole process group) and end when the training process ends them."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
