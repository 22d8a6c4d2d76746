"""Commands and signals: a script's `main` run as a command (one line per error, a clean stop
on SIGINT/SIGTERM with the exit status a shell reports), and the training loop's stop request."""
import sys
import time

from training.errors import UserError


class Timer:
    """Seconds since it was made: `timer()`."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self):
        return time.perf_counter() - self.start


class Stopped(SystemExit):
    """A run stopped by a signal (after saving what it could): exit status 128 + the number of
    the signal that asked for the stop, 130 for SIGINT and 143 for SIGTERM, as shells report a
    process killed by it, so a job scheduler can tell a stop from a finished run (0) and from
    an error (1)."""

    def __init__(self, signame="SIGINT"):
        import signal
        super().__init__(128 + signal.Signals[signame or "SIGINT"].value)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop: handled exactly like Ctrl-C."""


def run_command(main, parse_args):
    """main(parse_args()) as a command. A UserError is one line on stderr and exit status 1.
    A SIGINT or SIGTERM outside the training loop
    (rendering or caching data, the final evaluation, the IW-NLL, the prior, the metrics) stops
    it with one line and Stopped's exit status: every file is written whole or not at all, so
    none is left half-written, and the same command (with --resume for a training run) redoes
    the step. Inside the training loop StopSignal saves a checkpoint first."""
    import signal

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        print(f"\n{name} received: stopped; no file is left half-written; run the same command "
              "again to redo this step (a training run continues with --resume)",
              file=sys.stderr)
        raise Stopped(name) from None


class StopSignal:
    """Turn the first SIGINT/SIGTERM into a request to checkpoint and stop; a second one exits.

    The training loop polls `requested` once per step, saves, and leaves cleanly.
    """

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:       # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        import signal
        if self.requested is not None:
            print(f"\n{signal.Signals(signum).name} again: exiting now without saving",
                  file=sys.stderr)
            raise Stopped(self.requested)
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: saving a checkpoint at the current step, then "
              "stopping (send it again to quit at once)", file=sys.stderr)

    def __exit__(self, *exc):
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
