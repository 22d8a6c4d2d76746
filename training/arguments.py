"""Arguments: one command-line contract for the training scripts, numbers checked as they are
parsed, and a parser that records which flags were typed (what a resumed run may replace)."""
import argparse
import math
from pathlib import Path

from training.devices import PRECISIONS
from training.errors import UserError

# --data-on: where a training split's batches come from (utils.training_batches chooses on auto)
PLACEMENTS = ("auto", "device", "host")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not for flags whose help already says it or whose default is
    None or False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False \
                or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def number(kind, accept, what):
    """An argparse `type=` that parses `kind` and accepts only finite values with `accept(v)`:
    a bad value is refused as the flag is parsed, with one line, before anything runs."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = what
    return parse


positive_int = number(int, lambda v: v > 0, "a positive integer")
nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: v > 0, "a positive number")
nonneg_float = number(float, lambda v: v >= 0, "a number >= 0")


def decoder_sigma(text):
    """--sigma: 'learned' or a positive number, kept as typed (the model parses it)."""
    if text != "learned":
        positive_float(text)
    return text


def add_data_args(p, datasets, dataset="dsprites"):
    """The data flags; `datasets` are the names --dataset accepts (utils.DATASETS)."""
    p.add_argument("--dataset", default=dataset, choices=datasets,
                   help="training data (dsprites is rendered locally and works offline)")
    p.add_argument("--data-root", default="data",
                   help="where datasets live; with --dataset folder, the folder of your images")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N training images (default: all)")
    p.add_argument("--image-size", type=positive_int, default=64,
                   help="CelebA and folder: side of the resized centre crop (32, 64, 128, 256)")
    p.add_argument("--crop", type=positive_int, default=148,
                   help="CelebA: side of the centre crop before resizing")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="folder: attributes per image, a CSV (header: path, then attribute "
                        "names; values 1/0 or 1/-1) or CelebA's list_attr_celeba.txt layout")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="folder: 1 (grey) or 3 (RGB) (default: 1 when every image is grey)")
    p.add_argument("--val-fraction", type=number(float, lambda v: 0 < v < 1,
                                                 "a number between 0 and 1"), default=0.1,
                   help="folder without train/ and val/: the share of images held out, fixed "
                        "by their paths")
    p.add_argument("--cache-dir", default=None,
                   help="folder: where its decoded cache goes (default: $XDG_CACHE_HOME/"
                        "pytorch-vae or ~/.cache/pytorch-vae; never inside the image folder)")
    p.add_argument("--data-on", default="auto", choices=PLACEMENTS,
                   help="where training batches come from: device (the split copied there "
                        "once), host (each batch copied from host memory or the memory-mapped "
                        "cache, one step ahead), auto: device when the split takes at most "
                        "half the device's free memory")


def add_common_args(p, datasets, latent=10, lr=1e-3, batch_size=64, epochs=10,
                    dataset="dsprites", latent_help="latent dimensions",
                    lr_help="Adam learning rate"):
    """The command-line contract shared by the training scripts; `datasets` are the names
    --dataset accepts (utils.DATASETS)."""
    add_data_args(p, datasets, dataset)
    p.add_argument("--epochs", type=positive_int, default=epochs, help="epochs")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="images per step")
    p.add_argument("--lr", type=positive_float, default=lr, help=lr_help)
    p.add_argument("--latent", type=positive_int, default=latent, help=latent_help)
    p.add_argument("--out", default=None, help="run folder (default: runs/<script>_<dataset>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue the run in --out from its checkpoint.pt (or from PATH, "
                        "e.g. checkpoint.prev.pt); typed flags such as --epochs or --lr "
                        "replace the saved ones; flags that shape the model or data cannot "
                        "change")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out that holds one, deleting its "
                        "checkpoints and records first (without it, such a folder is refused)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="device (auto = cuda, then mps, then cpu)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed")
    p.add_argument("--eval-limit", type=positive_int, default=None,
                   help="held-out images scored at every epoch end and after training "
                        "(default: 10,000, or one epoch of training if that is fewer, at "
                        "least 1,000)")
    p.add_argument("--log-every", type=positive_int, default=100,
                   help="steps between reads of the running loss terms (the training log, "
                        "the progress bar and TensorBoard's training scalars)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="steps between held-out evaluations and checkpoints, besides every "
                        "epoch end (default: epoch ends only)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                   help="write TensorBoard logs into the run folder (`tensorboard --logdir "
                        "runs` shows every run): the loss terms every --log-every steps, the "
                        "held-out scores, reconstructions and samples at every evaluation; "
                        "needs `pip install tensorboard`; a resumed run keeps its setting "
                        "(default: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="forward passes in bf16 or fp16 autocast (fp16 with loss scaling) or "
                        "fp32; losses are always fp32. auto: bf16 on a GPU of compute "
                        "capability 8.0 or higher or a CPU with AMX or AVX-512 BF16, fp16 on "
                        "an older GPU, else fp32")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (cuDNN's autotuner off): on CUDA a resumed "
                        "run repeats the uninterrupted one; slower")


def check_common_args(args, script):
    """What the flags' types cannot check alone (each number is checked as it is parsed)."""
    if args.resume and getattr(args, "overwrite", False):
        raise UserError("--overwrite starts a fresh run and --resume continues one: pass one")
    if args.dataset not in ("celeba", "folder") and (args.image_size, args.crop) != (64, 148):
        raise UserError("--image-size and --crop apply to celeba (and --image-size to folder) "
                        "only; the other datasets keep their native size")
    if args.dataset == "folder" and args.crop != 148:
        raise UserError("--crop applies to celeba; a folder's images are cropped to their "
                        "centre square")
    own = [f"--{k.replace('_', '-')}" for k in ("labels", "channels", "cache_dir")
           if getattr(args, k, None) is not None] + \
        (["--val-fraction"] if "val_fraction" in getattr(args, "given", ()) else [])
    if args.dataset != "folder" and own:
        raise UserError(f"{', '.join(own)} appl{'ies' if len(own) == 1 else 'y'} to "
                        "--dataset folder only")
    if args.out is None:
        args.out = str(Path("runs") / f"{script}_{args.dataset}")
    return args


class ArgumentParser(argparse.ArgumentParser):
    """argparse with our help style that also records, in `args.given`, the flags the user
    typed: a resumed run replaces its saved settings only with those (`resume_args`).

    One parse: every flag starts as None in the namespace handed to argparse, so argparse
    leaves it None unless typed (no typed flag parses to None); the defaults are filled in
    after. Defaults are given as values, not as strings for `type` to convert."""

    def __init__(self, description=None):
        self.defaults = {}                        # dest -> default, as the flags are added
        super().__init__(description=description, formatter_class=HelpFormatter)

    def add_argument(self, *names, **kwargs):
        action = super().add_argument(*names, **kwargs)
        if action.default is not argparse.SUPPRESS:
            self.defaults[action.dest] = action.default
        return action

    def parse_args(self, args=None):
        args = super().parse_args(args, argparse.Namespace(**dict.fromkeys(self.defaults)))
        given = sorted(k for k, v in vars(args).items() if v is not None)
        for k, default in self.defaults.items():
            if getattr(args, k) is None:
                setattr(args, k, default)
        args.given = given
        return args
