"""Stopping a run without losing its work: SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it
preempts a job) ask the trainer to finish the step it is in, write a checkpoint and stop.

    with StopSignals() as stop:
        while training:
            step()
            if stop.requested: save(); raise TrainingInterrupted(...)

The first signal only sets a flag, read between steps, so the checkpoint holds a whole step and a resumed run
continues exactly. A second Ctrl-C while the step finishes aborts at once (KeyboardInterrupt, nothing saved), for a
step that hangs. The handlers are installed in the main thread only (Python delivers signals there) and the previous
ones are restored on exit.
"""
from __future__ import annotations

import signal
import threading

# exit statuses of a process stopped by a signal, as a shell reports them: 128 + the signal number
EXIT_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(Exception):
    """The run stopped on a signal after checkpointing the step it finished. `checkpoint` is the file or DCP
    directory to resume from; `exit_status` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name} at step {step}; checkpoint {checkpoint}")

    @property
    def exit_status(self) -> int:
        return EXIT_FOR_SIGNAL.get(self.signum, 128 + self.signum)


class StopSignals:
    """Context manager: SIGINT / SIGTERM set `requested` (the first signal's number) instead of killing the process."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if self.requested is None:
            self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
