"""The exceptions users see (one line that says what to do), and the one a stopping signal raises."""

import signal


class QroarError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class UsageProblem(QroarError):
    """Options that contradict each other, found by a rule outside the command line's parser: the command
    line reports it as a usage error (exit status 2), like the contradictions it finds itself."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived. Raised like Ctrl-C's KeyboardInterrupt, so the same clean-up runs
    (temporary files removed, the quantizer's process killed) before the command exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)


def stop_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into `Stopped` in the main thread (Python's default would exit at once,
    skipping every `finally` and leaving temporaries behind)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stopped)
