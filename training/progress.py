"""The progress of each long phase (training, evaluation, the IW-NLL, the prior, rendering,
caching), shown by rank 0 alone: a tqdm bar on a terminal; off a terminal (a log file, a pipe)
a few plain lines, which tqdm cannot write (it redraws one line with carriage returns there
too), so `Lines` writes them by hand."""
import sys
import time

from tqdm import tqdm

from training import distributed


def bar(iterable=None, total=None, desc="", unit="it", initial=0, what=None, announce=False,
        tty=None):
    """The progress of one phase, shown by rank 0 alone: on a terminal (`tty`, default: stderr
    is one) a tqdm bar with its size and ETA, else `Lines`; `what` (the work, "8 images") and
    `announce` (a first line before any work) apply to the lines. Either has update(n),
    set_postfix(**values), write(text) (rank 0 calls it), close(), and is a context manager;
    iterating it iterates `iterable`.

        for x in progress.bar(batches, total=len(batches), desc="evaluation", unit="batch"): ...
    """
    tty = sys.stderr.isatty() if tty is None else tty
    if distributed.DIST.main and not tty:
        return Lines(iterable, total, desc, unit, initial, what, announce)
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not distributed.DIST.main)


class Lines:
    """Progress as plain lines for a log: what will be done, with an estimate of the time once
    the first steps are timed; a line every tenth of the way when the phase is long; one at the
    end (or where it was stopped). Phases under QUIET_S seconds print nothing, unless
    `announce`: then the first line comes before any work."""
    QUIET_S = 2.0                       # phases shorter than this stay silent
    LINE_EVERY_S = 30.0                 # at most one progress line per tenth, this far apart

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0, what=None,
                 announce=False):
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc, self.unit, self.n, self.first = desc, unit, initial, initial
        left = None if self.total is None else self.total - initial
        self.plan = ", ".join(t for t in (None if left is None else
                                          f"{left:,} {plural(unit, left)}", what) if t)
        self.postfix = {}
        self.t0 = self.last = time.perf_counter()
        self.announced, self.estimated, self.tenth, self.closed = False, False, 0, False
        if announce:
            self._announce("")

    def _say(self, text):
        print(f"{self.desc}: {text}", flush=True)

    def _announce(self, estimate):
        self.announced = True
        self._say(", ".join(t for t in (self.plan, estimate) if t) or "started")

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(stopped=exc_type is not None)

    def update(self, n=1):
        self.n += n
        now = time.perf_counter()
        if self.total is None or self.total <= self.first:
            if not self.announced and now - self.t0 >= self.QUIET_S:
                self._announce("")
            return
        done = (self.n - self.first) / (self.total - self.first)
        left = (now - self.t0) * (1 - done) / max(done, 1e-12)
        if not self.estimated and done < 1 and now - self.t0 >= self.QUIET_S:
            self.estimated, self.last = True, now
            estimate = f"about {format_seconds(left)} left"
            self._say(estimate) if self.announced else self._announce(estimate)
            return
        tenth = int(done * 10)
        if tenth > self.tenth and now - self.last >= self.LINE_EVERY_S and done < 1:
            self.tenth, self.last = tenth, now
            self._say(f"{self.n:,}/{self.total:,} {plural(self.unit)}{self._postfix_text()}, "
                      f"about {format_seconds(left)} left")

    def set_postfix(self, **values):
        self.postfix = values

    def _postfix_text(self):
        return (" (" + ", ".join(f"{k} {v}" for k, v in self.postfix.items()) + ")"
                if self.postfix else "")

    def write(self, text):
        print(text, flush=True)

    def close(self, stopped=False):
        if self.closed:
            return
        self.closed = True
        took = time.perf_counter() - self.t0
        if self.announced or took >= self.QUIET_S:
            self._say(f"{'stopped after' if stopped else 'done:'} {self.n - self.first:,} "
                      f"{plural(self.unit, self.n - self.first)} in {format_seconds(took)}"
                      f"{self._postfix_text()}")


def plural(noun, n=2):
    if n == 1:
        return noun
    return noun + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")


def format_seconds(s):
    """12 s, 3 min 05 s, 1 h 02 min."""
    s = round(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
