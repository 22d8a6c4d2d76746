"""TensorBoard, an optional dependency. With --tensorboard, rank 0 writes a phase's event files
into its folder (the run folder; the VQ-VAE's prior into its prior/ subfolder), so that
`tensorboard --logdir runs` shows every run:

- train/<term>: the running loss terms of the training log, every --log-every steps, and the
  values the script's `schedule(step)` adds (beta-VAE: beta or the capacity C); a vector term
  such as the KL per latent becomes train/<term>/<index>;
- eval/<key>: the numbers of each held-out evaluation, named as in history.json;
- images/<name>: at every evaluation, the PNGs the script's `pictures(entry, folder)` draws
  (the same functions that draw the run's final reconstructions, samples and traversals).

A resumed run appends to the same log: events past the checkpoint's step, written before the
run was stopped or killed, are purged (TensorBoard's SessionLog.START at the first new step). A
fresh run deletes the event files an earlier run left in its folder. Without the flag nothing
here imports tensorboard; with it but without the package, the run stops at its start with one
line that names the package."""
import math
import tempfile
from pathlib import Path

import numpy as np

from training.errors import UserError

EVENTS = "events.out.tfevents.*"         # the event files' names (TensorBoard's)


def require():
    """torch.utils.tensorboard's SummaryWriter; without the package, one line saying how to
    install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError(f"--tensorboard needs the tensorboard package ({e}): "
                        "pip install tensorboard") from None
    return SummaryWriter


def board(folder, step, pictures=None, schedule=None):
    """The board of a phase that goes on from `step` (0: a fresh phase), or one that does
    nothing when `folder` is None (no --tensorboard, or not rank 0). Use it in a `with`: it
    closes, flushing its events, when the phase ends, stops on a signal or fails."""
    return Off() if folder is None else Board(Path(folder), step, pictures, schedule)


class Off:
    """No TensorBoard: every call does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def scalars(self, entry):
        pass

    def evaluation(self, entry):
        pass


class Board(Off):
    """A phase's event files in `folder`. `scalars(entry)` logs an entry of the training log
    ({"step", term: value}) and `evaluation(entry)` one of the history, with its pictures."""

    def __init__(self, folder, step, pictures=None, schedule=None):
        summary_writer = require()
        folder.mkdir(parents=True, exist_ok=True)
        if step == 0:                    # a fresh phase: the log of a run it replaces goes
            for old in folder.glob(EVENTS):
                old.unlink()
        # Events up to the checkpoint's step were on disk before it was saved (an evaluation
        # flushes, a stop closes), so they stay; TensorBoard hides the earlier files' events
        # from `purge_step` on.
        self.writer = summary_writer(folder, purge_step=step + 1 if step else None)
        self.pictures, self.schedule = pictures, schedule

    def __exit__(self, *exc):
        self.writer.close()
        return False

    def scalars(self, entry):
        more = {} if self.schedule is None else self.schedule(entry["step"])
        self.add(entry["step"], "train", {**entry, **more})

    def evaluation(self, entry):
        step = entry["step"]
        self.add(step, "eval", {k: v for k, v in entry.items() if k != "epoch"})
        if self.pictures is not None:
            with tempfile.TemporaryDirectory() as tmp:
                self.pictures(entry, Path(tmp))
                for png in sorted(Path(tmp).glob("*.png")):
                    self.writer.add_image(f"images/{png.stem}", read_rgb(png), step,
                                          dataformats="HWC")
        self.writer.flush()              # on disk before the checkpoint that follows

    def add(self, step, group, values):
        """One scalar per number of `values` (but the step), one per element of a list of
        numbers (zero-padded indices, so that TensorBoard sorts them); the rest is skipped."""
        for name, value in values.items():
            if name == "step":
                continue
            if isinstance(value, list) and all(map(number, value)):
                width = len(str(len(value) - 1))
                for i, v in enumerate(value):
                    self.writer.add_scalar(f"{group}/{name}/{i:0{width}d}", v, step)
            elif number(value):
                self.writer.add_scalar(f"{group}/{name}", value, step)


def number(value):
    """A finite int or float (not a bool): what a scalar plot can show."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def read_rgb(path):
    """A PNG as an (H, W, 3) uint8 array (add_image's dataformats="HWC")."""
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
