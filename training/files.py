"""Files: every write is whole or absent, and every run folder has one writer.

`replacing` and `atomic_write` give whole-or-nothing writes (a temporary file renamed over the
target); `building` serialises the building of a data cache; `prepare_out` takes the run
folder's lock and checks the folder before anything is loaded or trained."""
import contextlib
import errno
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from training.errors import UserError


def nofollow():
    """os.O_NOFOLLOW where the platform has it (POSIX), else 0 (Windows has no such flag)."""
    return getattr(os, "O_NOFOLLOW", 0)


@contextlib.contextmanager
def replacing(path, suffix=".tmp"):
    """A new temporary file beside `path`, yielded as a Path, that replaces `path` when the block
    ends normally and is removed when it does not (an error, Ctrl-C).

    The name is unique (pid and random) and the file is created with O_CREAT | O_EXCL (and
    O_NOFOLLOW where the platform has it; Windows does not), so a file or symlink planted
    beside `path` is never followed, and two writers never share one. Permissions follow the umask, as for any new file. A failed write (a full
    disk, say) is one line naming `path`, which is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow(), 0o666))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):   # torch.save reports a short write so
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
            raise UserError(f"cannot write {path}: {reason}; {path} is left as it was and no "
                            "partial file remains (free some disk space, or write elsewhere)"
                            ) from None
        raise


def atomic_write(path, write, keep_previous=False):
    """Write a file whole or not at all: `write(f)` fills a fresh temporary file (see
    `replacing`), which is fsynced, then renamed over `path`. With `keep_previous` the file it
    replaces stays as <stem>.prev<suffix>, hard-linked first so that `path` exists throughout."""
    path = Path(path)
    with replacing(path) as tmp:
        with open(tmp, "r+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            prev = path.with_name(path.stem + ".prev" + path.suffix)
            with replacing(prev) as prev_tmp:
                os.unlink(prev_tmp)                 # os.link wants a free name: reuse this one
                os.link(path, prev_tmp)


def write_json(path, obj):
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _flock(path, wait, what):
    """An open file on which this process holds fcntl.flock(LOCK_EX), with our pid written in it.
    Held by another process: wait for it, or a one-line error naming the holder. The kernel
    releases the lock when the file is closed or the process ends, however it ends. Where
    there is no fcntl (Windows), the same lock from the filelock package (`_portable_lock`)."""
    try:
        import fcntl
    except ImportError:
        return _portable_lock(path, wait, what)
    try:
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | nofollow(), 0o644), "r+")
    except OSError as e:
        raise UserError(f"cannot lock {what} with {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "another process"
        if not wait:
            f.close()
            raise UserError(f"{what} is in use by {holder}; wait for it to end, or choose "
                            "another --out") from None
        print(f"waiting for {holder}, which holds {what}", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(_holder())
    f.flush()
    return f


def _holder():
    return f"pid {os.getpid()} ({' '.join(Path(sys.argv[0]).name.split() + sys.argv[1:])})"


class _portable_lock:
    """`_flock` where there is no fcntl: filelock's FileLock (LockFileEx on Windows) on `path`,
    with this process described in `path`.holder, since Windows keeps a locked file from being
    read. Closed, or at the process's end, the lock is released."""

    def __init__(self, path, wait, what):
        import filelock                # a dependency of torch
        self.lock, holder = filelock.FileLock(str(path)), Path(f"{path}.holder")
        try:
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            held_by = _read(holder) or "another process"
            if not wait:
                raise UserError(f"{what} is in use by {held_by}; wait for it to end, or choose "
                                "another --out") from None
            print(f"waiting for {held_by}, which holds {what}", file=sys.stderr, flush=True)
            self.lock.acquire()
        except OSError as e:
            raise UserError(f"cannot lock {what} with {path}: {e.strerror or e}") from None
        with contextlib.suppress(OSError):      # a description only: the lock is what counts
            holder.write_text(_holder())

    def close(self):
        self.lock.release()


def _read(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def building(folder, what):
    """Hold `folder`/.build.lock while building a data cache there: a second process that
    needs the same cache waits, then finds it built."""
    f = _flock(Path(folder) / ".build.lock", True, what)
    try:
        yield
    finally:
        f.close()


_RUN_LOCKS = {}            # run folder -> its lock file, held until this process ends


# What a training run writes into its folder and would mix with another run's
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.replaced.pt", "prior.pt",
             "prior.prev.pt", "history.json", "prior_history.json", "metrics.json")


def prepare_out(out, fresh=False, overwrite=False):
    """Create the run folder and check it, before anything is loaded or trained.

    - This process holds an exclusive lock on `out`/.lock until it ends: a second process
      writing into the same folder is refused with its pid, never interleaved.
    - `fresh` (a training run without --resume) refuses a folder that already holds a run;
      `overwrite` deletes that run's checkpoints and records instead.
    - A run file that is not a regular file (a folder named checkpoint.pt) is refused.
    - The folder must be writable.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
    key = out.resolve()
    if key not in _RUN_LOCKS:
        _RUN_LOCKS[key] = _flock(out / ".lock", False, f"the run folder {out}")
    present = [n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()]
    for name in present:
        if not (out / name).is_file():
            raise UserError(f"{out / name} is not a regular file; move it away, or choose "
                            "another --out")
    if fresh and present and not overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(present)}); continue it with "
                        "--resume, start a new one with another --out, or replace it with "
                        "--overwrite")
    if fresh and overwrite:
        for name in present:
            (out / name).unlink()
    return out


def reserve_space(folder, nbytes):
    """Prove that `nbytes` can be written to `folder` (one checkpoint's worth) by allocating
    them in a temporary file, removed at once: a full disk is reported before training, not
    after an epoch's work."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".space-check.")
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except (OSError, AttributeError) as e:       # AttributeError: Windows has no fallocate
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            zeros = bytes(2**20)                     # a file system without fallocate: write
            for _ in range(0, nbytes, len(zeros)):
                os.write(fd, zeros)
            os.fsync(fd)
    except OSError as e:
        raise UserError(f"no room for a checkpoint ({nbytes / 2**20:.0f} MB) in {folder}: "
                        f"{e.strerror or e}; free some space, or choose another --out; nothing "
                        "was trained") from None
    finally:
        os.close(fd)
        os.unlink(tmp)
