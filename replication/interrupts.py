"""Turn Ctrl-C (a Jupyter kernel interrupt) and SIGTERM into a stop at the next safe point.

Why: long jobs (a 9-seed family, an activation cache) save their progress between steps. A
signal that raises in the middle of a step would leave half-updated weights, so nothing could be
saved; deferred to the end of the step, the job saves its resume state and then stops, losing
seconds instead of the minutes since the last periodic save. A second signal stops at once
(nothing is saved then: the state may be torn mid-step).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType


class Interrupted(KeyboardInterrupt):
    """Raised at a safe point after SIGINT/SIGTERM; `forced` when a second signal could not wait."""

    def __init__(self, signum: int, forced: bool = False):
        self.signum, self.forced = int(signum), bool(forced)
        name = signal.Signals(signum).name
        super().__init__(f"{name} received{' twice: stopped at once, nothing saved' if forced else ''}")


class DeferredInterrupts:
    """Context manager: SIGINT/SIGTERM set a flag; `check()` raises `Interrupted` where that is safe.

    Only the main thread can own signal handlers; elsewhere this is a no-op and signals behave as
    usual. Handlers in force before entering are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is not None:
            raise Interrupted(signum, forced=True)
        self.pending = signum

    def __enter__(self) -> "DeferredInterrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def check(self) -> None:
        """Raise `Interrupted` if a signal arrived since entering (call between steps)."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


__all__ = ["DeferredInterrupts", "Interrupted"]
