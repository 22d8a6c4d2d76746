"""The progress of each long phase (training, evaluation, the IW-NLL, the prior, rendering,
caching), shown by rank 0 alone (tqdm's `disable` elsewhere): on a terminal, tqdm's bar.

Off a terminal (a log file, a pipe) tqdm redraws its one line with carriage returns too, which
a log cannot show. `Lines` keeps tqdm's counting, clock, iteration and rate limit (its
`mininterval`) and replaces only the drawing, with what tqdm cannot do: a few plain lines,
the plan before any work (with `announce`), an estimate of the time left once the phase has
run QUIET_S, a line every tenth of a long phase, and how the phase ended, done or stopped
(tqdm closes alike on both); phases shorter than QUIET_S print nothing."""
import sys

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
        return Lines(iterable, total=total, desc=desc, unit=unit, initial=initial, what=what,
                     announce=announce)
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not distributed.DIST.main)


class Discard:
    """Where tqdm's own drawing goes off a terminal: nowhere (Lines prints the lines)."""

    def write(self, text):
        pass

    def flush(self):
        pass


class Lines(tqdm):
    """tqdm, drawn as plain lines for a log (see the module's docstring)."""
    QUIET_S = 2.0                       # phases shorter than this stay silent
    LINE_EVERY_S = 30.0                 # at most one progress line per tenth, this far apart
    monitor_interval = 0                # no tqdm monitor thread: lines come from the caller's

    def __init__(self, iterable=None, what=None, announce=False, initial=0, **kwargs):
        self.what, self.first, self.values = what, initial, {}
        self.announced, self.estimated, self.tenth, self.ended = False, False, 0, False
        super().__init__(iterable, initial=initial, file=Discard(), leave=False,
                         mininterval=self.QUIET_S, **kwargs)
        self.last = self.start_t
        if announce:
            self._announce("")

    def _plan(self):
        left = None if self.total is None else self.total - self.first
        work = None if left is None else f"{left:,} {plural(self.unit, left)}"
        return ", ".join(t for t in (work, self.what) if t)

    def _say(self, text):
        print(f"{self.desc}: {text}", flush=True)

    def _announce(self, estimate):
        self.announced = True
        self._say(", ".join(t for t in (self._plan(), estimate) if t) or "started")

    def display(self, msg=None, pos=None):
        """Called by tqdm at most every `mininterval` seconds: a line, when one is due."""
        if self.ended or self.n == self.first:
            return
        now = self._time()
        if self.total is None or self.total <= self.first:
            if not self.announced and now - self.start_t >= self.QUIET_S:
                self._announce("")
            return
        done = (self.n - self.first) / (self.total - self.first)
        left = (now - self.start_t) * (1 - done) / max(done, 1e-12)
        if not self.estimated and done < 1 and now - self.start_t >= self.QUIET_S:
            self.estimated, self.last = True, now
            estimate = f"about {format_seconds(left)} left"
            self._say(estimate) if self.announced else self._announce(estimate)
            return
        tenth = int(done * 10)
        if tenth > self.tenth and now - self.last >= self.LINE_EVERY_S and done < 1:
            self.tenth, self.last = tenth, now
            self._say(f"{self.n:,}/{self.total:,} {plural(self.unit)}{self._postfix_text()}, "
                      f"about {format_seconds(left)} left")

    def __iter__(self):
        # tqdm's own closes in a `finally`: a loop cut short would end on a "done" line
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __exit__(self, exc_type, *exc):
        self.close(stopped=exc_type is not None)

    def __del__(self):
        self.ended = True               # collected unfinished: no line
        super().__del__()

    def set_postfix(self, **values):
        self.values = values

    def _postfix_text(self):
        return (" (" + ", ".join(f"{k} {v}" for k, v in self.values.items()) + ")"
                if self.values else "")

    def write(self, text):
        print(text, flush=True)

    def close(self, stopped=False):
        if not self.ended:
            self.ended = True
            took = self._time() - self.start_t
            if self.announced or took >= self.QUIET_S:
                self._say(f"{'stopped after' if stopped else 'done:'} {self.n - self.first:,} "
                          f"{plural(self.unit, self.n - self.first)} in {format_seconds(took)}"
                          f"{self._postfix_text()}")
        super().close()


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
