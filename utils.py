"""Shared plumbing for the training scripts: data, devices, checkpoints, image grids, plots.

No model or loss lives here; each algorithm is told top to bottom in its own script.
The sections, in the order a reader needs them:
- run plumbing: arguments; devices and seeding; the training loop (`start_run`, `train`);
  checkpoints; files; commands and signals; progress; torchrun;
- images and plots;
- data loading: `load_dataset`, `DeviceBatches`, then MNIST, CIFAR-10, CelebA and dSprites;
- dataset synthesis: the dSprites renderer and the CelebA decoding cache.
"""
import argparse
import contextlib
import copy
import errno
import gzip
import json
import math
import os
import pickle
import random
import secrets
import statistics
import struct
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision


DATASETS = ("mnist", "cifar10", "celeba", "dsprites")


class UserError(ValueError):
    """A mistake in the input (flags, files). An ordinary exception, so a notebook or a caller
    can catch it; a command (`run_command`) prints it as one line, exit status 1, no
    traceback."""


class DatasetNotFound(UserError):
    pass


class CheckpointError(UserError):
    pass


# ==============================================================================================
# RUN PLUMBING: what every training script calls
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Arguments: one command-line contract, numbers checked as they are parsed
# ----------------------------------------------------------------------------------------------
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


def add_data_args(p, dataset="dsprites"):
    p.add_argument("--dataset", default=dataset, choices=DATASETS,
                   help="training data (dsprites is rendered locally and works offline)")
    p.add_argument("--data-root", default="data", help="where datasets live")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N training images (default: all)")
    p.add_argument("--image-size", type=positive_int, default=64,
                   help="CelebA: side of the resized centre crop")
    p.add_argument("--crop", type=positive_int, default=148,
                   help="CelebA: side of the centre crop before resizing")


def add_common_args(p, latent=10, lr=1e-3, batch_size=64, epochs=10, dataset="dsprites",
                    latent_help="latent dimensions"):
    """The command-line contract shared by the training scripts."""
    add_data_args(p, dataset)
    p.add_argument("--epochs", type=positive_int, default=epochs, help="epochs")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="images per step")
    p.add_argument("--lr", type=positive_float, default=lr, help="Adam learning rate")
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
                   help="steps between reads of the running loss")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="steps between held-out evaluations and checkpoints, besides every "
                        "epoch end (default: epoch ends only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="forward passes in bf16 autocast or fp32 (losses are always fp32); "
                        "auto: bf16 where the device runs it natively and a start-up probe "
                        "finds it faster")


def check_common_args(args, script):
    """What the flags' types cannot check alone (each number is checked as it is parsed)."""
    if args.resume and getattr(args, "overwrite", False):
        raise UserError("--overwrite starts a fresh run and --resume continues one: pass one")
    if args.dataset != "celeba" and (args.image_size, args.crop) != (64, 148):
        raise UserError("--image-size and --crop apply to celeba only; the other datasets "
                        "keep their native size")
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


# ----------------------------------------------------------------------------------------------
# Devices, seeding and the GPU fast paths
# ----------------------------------------------------------------------------------------------
def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


# Device types that take the GPU fast paths: channels-last tensors and fused Adam. The CPU
# test suite adds "cpu" to run those paths on a machine without a GPU.
FAST_PATHS = {"cuda"}
PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")      # /proc/cpuinfo: bf16 in hardware


def fast_paths(device):
    return torch.device(device).type in FAST_PATHS


def autocast(device, bf16=True):
    """bf16 autocast of the forward pass on `device` (CUDA or CPU) when `bf16`; else a no-op
    (an enclosing autocast region stays in force). Losses and sums are computed in fp32
    outside it, or from outputs cast to fp32 first."""
    kind = torch.device(device).type
    if not (bf16 and kind in ("cuda", "cpu")):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=torch.bfloat16)


def cpu_flags():
    """The CPU's feature flags (Linux /proc/cpuinfo), or an empty set where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device):
    """(runs bf16 natively, why): CUDA with bf16 support, or a CPU with AMX or AVX-512 BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(), "CUDA"
    if device.type != "cpu":
        return False, f"no bf16 autocast on {device.type}"
    have = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    if have:
        return True, "CPU has " + " and ".join(f.upper().replace("_BF16", " BF16") if
                                               f.startswith("amx") else "AVX-512 BF16"
                                               for f in have)
    return False, "CPU has no native bf16 (no AMX or AVX-512 BF16): bf16 would be emulated"


def time_precisions(step, device, rounds=3):
    """Median seconds of `step(bf16)` in fp32 and in bf16, interleaved (one warm-up each).
    `step` must act on scratch copies; the global RNGs are restored afterwards."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {False: [], True: []}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for r in range(rounds + 1):
            for bf16 in (False, True):
                sync()
                t = time.perf_counter()
                step(bf16)
                sync()
                if r > 0:
                    times[bf16].append(time.perf_counter() - t)
    return statistics.median(times[False]), statistics.median(times[True])


def choose_precision(requested, device, model, lr, step, rounds=3):
    """Resolve --precision to (bf16: bool, the line that says why), the same on every rank.

    auto: bf16 autocast only where the device runs it natively (CUDA, or a CPU with AMX or
    AVX-512 BF16) and a probe of a few training steps, `step(model, opt, bf16)` on a copy of
    `model` with its own Adam at `lr`, shows it at least 5% faster than fp32; else fp32. bf16
    typed on a CPU without native bf16 is obeyed, with a warning giving the probe's measured
    slowdown."""
    bf16, why = _choose_precision(requested, device, model, lr, step, rounds)
    if DIST.active:                                 # rank 0's measurement decides for all
        bf16 = bool(broadcast(torch.tensor([float(bf16)], device=device)).item())
        why = gather_objects(why)[0]
    return bf16, why


def _choose_precision(requested, device, model, lr, step, rounds):
    native, why = native_bf16(device)
    if requested == "fp32":
        return False, "precision: fp32 (--precision fp32)"
    if not native and requested == "auto":
        return False, f"precision: fp32 ({why})"
    if torch.device(device).type not in ("cuda", "cpu"):
        return False, f"precision: fp32 ({why})"
    if native and requested == "bf16":
        return True, f"precision: bf16 (--precision bf16; {why})"
    scratch = copy.deepcopy(model)
    opt = adam(scratch.parameters(), lr, device)
    fp32_s, bf16_s = time_precisions(lambda bf16: step(scratch, opt, bf16), device, rounds)
    speedup = fp32_s / bf16_s
    probe = f"probe {speedup:.2f}x fp32"
    if requested == "bf16":                         # typed, on a CPU that emulates bf16
        return True, (f"warning: precision bf16 as asked, but {why}; the probe ran "
                      f"{1 / speedup:.1f}x slower than fp32 (--precision auto picks fp32)")
    if speedup >= 1.05:
        return True, f"precision: bf16 ({why}; {probe})"
    return False, f"precision: fp32 ({why}, but bf16 was not faster here: {probe})"


def adam(params, lr, device):
    """Adam with the fused kernel on CUDA (FAST_PATHS) and the foreach path elsewhere."""
    fast = fast_paths(device)
    return torch.optim.Adam(params, lr=lr, fused=fast or None, foreach=None if fast else True)


# ----------------------------------------------------------------------------------------------
# The training loop: one for every phase (the VAEs, the VQ-VAE, the PixelCNN prior)
# ----------------------------------------------------------------------------------------------
def start_run(args, kind, flags, keys=None, check_image_size=None):
    """What every training run does before its model exists: join torchrun (if launched by
    it), prepare the run folder (rank 0), load and check the checkpoint that --resume names
    and take its settings into `args` in place (typed `flags` replace them), seed (the same
    initial weights on every rank), refuse a bad CelebA --image-size with
    `check_image_size(size)` before anything is decoded, then load the training split and the
    held-out split sized to the run (rank 0 first: it builds any data cache alone).
    Returns (dist, device, out, state or None, train, test)."""
    dist, device = setup_distributed(args.device)
    out = prepare_out(args.out, not args.resume, args.overwrite) if dist.main else Path(args.out)
    state = None
    if args.resume:
        state = resume_state(args.resume, out, kind, keys or RESUME_KEYS)
        vars(args).update(vars(resume_args(args, state, flags)))
    seed_everything(args.seed)
    if args.dataset == "celeba" and check_image_size is not None:
        check_image_size(args.image_size)
    with main_first():
        train = load_dataset(args.dataset, args.data_root, "train", args.limit, args.image_size,
                             args.crop)
        test = load_held_out(args, len(train), dist)
    return dist, device, out, state, train, test


def run_images(args, train_size, world=1):
    """(images the whole run trains on, images per epoch), from the flags and the data size."""
    per_epoch = train_size // world // args.batch_size
    steps = per_epoch * args.epochs
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    return steps * args.batch_size * world, per_epoch * args.batch_size * world


def held_out_size(limit, train_images, epoch_images, default=10_000, floor=1_000):
    """How many held-out images a run scores: --eval-limit if given; else the default, cut to
    one epoch of training (the scores run every epoch) and to the images the whole run trains
    on, but at least `floor`. A 10-step run is not followed by minutes of evaluation."""
    if limit is not None:
        return limit
    return max(floor, min(default, epoch_images, train_images))


def load_held_out(args, train_size, dist):
    """The held-out split, `--eval-limit` images of it, the limit sized to the run when not
    given (`held_out_size`, written back into `args` so the checkpoint keeps it), and said."""
    given = args.eval_limit
    args.eval_limit = held_out_size(given, *run_images(args, train_size, dist.world))
    test = load_dataset(args.dataset, args.data_root, "test", args.eval_limit, args.image_size,
                        args.crop)
    if dist.main and given is None:
        print(f"held-out evaluation: {len(test):,} images at every epoch end and after "
              "training (sized to the run; --eval-limit sets it)")
    return test


def train(model, opt, step_fn, batches, steps_per_epoch, total, out, *, kind, args, lr,
          state=None, evaluate=None, describe=None, saved=None, name="checkpoint.pt",
          history_name="history.json", set_aside=None, compile=False, log_every=100,
          eval_every=None, postfix=None, desc=None, what=None, reserve=()):
    """Train `model` with `opt` for `total` steps and return the run's step, log, history and
    training time. Each script writes its own step; this is the plumbing around it:

    - `step_fn(fwd, batch, step)` takes one optimiser step and returns the named loss terms
      (device tensors). `fwd` is the model, wrapped in DistributedDataParallel under torchrun
      and compiled with `compile`. `batches(epoch, start)` yields the `steps_per_epoch`
      batches of an epoch from batch `start` (DeviceBatches.epoch, say).
    - Resume: `state`, a checked checkpoint, restores model, optimiser (with `lr`, the typed
      or saved rate), step, log, history and every rank's RNG, so the run continues exactly;
      then `set_aside_current(set_aside, out)` when `set_aside` is given.
    - Logging: the terms are summed on the device and read every `log_every` steps (the one
      host-device sync), which also stops the run on a non-finite term.
    - Evaluation: at every epoch end, every `eval_every` steps (if given) and at the last
      step, `evaluate(last_log)` returns the
      held-out scores; they join the history (out/`history_name`), and `describe(entry)`, if
      given, the line printed.
    - Checkpoints: out/`name` after every evaluation and on a stop, written atomically, holding
      `saved` besides the states, log, history, args and RNGs. Space for it and the modules
      in `reserve` is reserved first, so a full disk is found now, not after an epoch.
    - Signals: the first SIGINT/SIGTERM saves the current step and raises Stopped.
    """
    dist = DIST
    device = next(model.parameters()).device
    path = Path(out) / name
    step, log, history = 0, [], []
    if state is not None:
        load_state(model, state["model"], kind, path)
        load_state(opt, state["optimizer"], f"{kind} optimiser", path)
        for group in opt.param_groups:              # a typed learning rate applies from here on
            group["lr"] = lr
        step, log, history = state["step"], state["log"], state["history"]
        restore_rng(state)
        if set_aside is not None:
            set_aside_current(set_aside, out)
    if dist.main:
        reserve_space(out, checkpoint_bytes(model, *reserve))
    fwd = data_parallel(model, device)
    fwd = torch.compile(fwd) if compile else fwd

    def checkpoint():
        rngs = gather_objects(rng_state())              # every rank's, for an exact resume
        if dist.main:
            save_checkpoint(path, {
                "kind": kind, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "args": vars(args), "step": step, "epoch": step // steps_per_epoch, "log": log,
                "history": history, "rng": rngs[0], "rng_ranks": rngs if dist.active else None,
                **(saved or {})})

    def read_running():
        r = running.read(step, out)
        if r is not None:
            log.append(r)
        return r

    running = RunningMean()
    first_step, train_time, t0 = step, 0.0, time.perf_counter()
    bar = Progress(total=total, initial=step, desc=desc or kind, unit="step", what=what,
                   announce=True)
    with StopSignal() as stop:
        stopping = False
        while step < total and not stopping:
            epoch, start = divmod(step, steps_per_epoch)
            for batch in batches(epoch, start):
                running.add(step_fn(fwd, batch, step))
                step += 1
                bar.update(1)
                if step % log_every == 0:
                    r = read_running()
                    if postfix is not None:
                        bar.set_postfix(**postfix(r))
                stopping = should_stop(stop, step, log_every, device)
                if step >= total or stopping or (eval_every and step % eval_every == 0):
                    break
            read_running()
            train_time += time.perf_counter() - t0
            due = step % steps_per_epoch == 0 or (eval_every and step % eval_every == 0)
            if evaluate is not None and (due or step >= total):
                history.append({"epoch": step // steps_per_epoch, "step": step,
                                **evaluate(log[-1])})
                if dist.main:
                    write_json(Path(out) / history_name, history)
                    if describe is not None:
                        bar.write(describe(history[-1]))
            checkpoint()
            stopping = stopping or should_stop(stop, step, log_every, device)
            t0 = time.perf_counter()
    bar.close()
    if stopping:
        if dist.main:
            print(f"stopped at {'' if desc is None else desc + ' '}step {step}; checkpoint "
                  f"saved to {path}; continue with --resume")
        cleanup_distributed()
        raise Stopped(stop.requested)
    return argparse.Namespace(step=step, log=log, history=history, train_time=train_time,
                              epochs=step / steps_per_epoch,
                              steps_timed=step - first_step)


class RunningMean:
    """Sums named loss terms (scalars or vectors) on the device, with no host-device sync.

    `read()` is the one sync per log interval: it returns the means since the last read as
    Python numbers (vectors as lists) and stops the run if a scalar term is not finite.
    """

    def __init__(self):
        self.sums, self.shapes, self.count = None, None, 0

    def add(self, terms):
        flat = torch.cat([t.detach().float().reshape(-1) for t in terms.values()])
        if self.sums is None:
            self.sums = torch.zeros_like(flat)
            self.shapes = {k: t.numel() if t.dim() else 0 for k, t in terms.items()}
        self.sums += flat
        self.count += 1

    def read(self, step, out):
        if self.count == 0:
            return None
        sums = all_reduce_sum(self.sums.clone())          # the mean over ranks too
        values, i, result = (sums / (self.count * DIST.world)).tolist(), 0, {"step": step}
        for k, n in self.shapes.items():
            result[k] = values[i] if n == 0 else values[i:i + n]
            i += max(n, 1)
        check_finite({k: v for k, v in result.items() if isinstance(v, float)}, step, out)
        self.sums.zero_()
        self.count = 0
        return result


def check_finite(terms, step, out):
    """Stop the run when a loss term is NaN or infinite; the last checkpoint is left untouched."""
    if not all(math.isfinite(v) for v in terms.values()):
        named = ", ".join(f"{k}={v}" for k, v in terms.items())
        ckpt = Path(out) / "checkpoint.pt"
        last = f"the last good checkpoint {ckpt} is untouched" if ckpt.exists() \
            else "no checkpoint had been written yet"
        raise UserError(f"non-finite loss at step {step} ({named}); stopping. {last}; "
                        "try a lower --lr")


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, the previous one kept, safe loads, exact resumes
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path, state):
    """Write `state` atomically to `path`; the checkpoint it replaces becomes *.prev.pt."""
    atomic_write(path, lambda f: torch.save(state, f), keep_previous=True)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True; a damaged file names its fallback."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError) as e:
        prev = path.with_name(path.stem + ".prev.pt")
        hint = (f"; the previous good checkpoint is {prev}: continue from it with "
                f"--resume {prev}" if prev.exists() and prev != path else "")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint "
                              f"({first[:200]}){hint}") from None
    if not isinstance(state, dict) or "model" not in state or "args" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by these scripts")
    return state


def check_checkpoint_kind(state, path, kind):
    found = state.get("kind")
    if found != kind:
        raise CheckpointError(f"{path} holds a {found or 'unknown'} model, not a {kind} model")


def checkpoint_bytes(*modules):
    """About the size of a checkpoint of `modules` and their Adam state (3 copies), plus 1 MB."""
    n = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    return 3 * n + 2**20


def resume_args(args, state, flags):
    """The saved run's args; of `flags`, those typed on this command line replace them.
    --out, --resume, --overwrite and --device always come from the command line. Any other
    typed flag that differs from the saved run (--latent, --dataset: what the checkpoint was
    built from) is refused, not silently ignored."""
    saved = dict(state["args"])
    typed = set(getattr(args, "given", ())) | {"out", "resume", "device", "overwrite"}
    fixed = [k for k in sorted(typed - set(flags) - {"out", "resume", "device", "overwrite"})
             if k in saved and hasattr(args, k) and getattr(args, k) != saved[k]]
    if fixed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in fixed)
        raise UserError(f"{' '.join('--' + k.replace('_', '-') for k in fixed)} cannot change "
                        f"on --resume: the checkpoint was trained with {was}; drop the flag to "
                        "continue that run, or start a new run with another --out")
    for k, v in vars(args).items():               # a flag newer than the checkpoint: its value
        saved.setdefault(k, v)
    saved.update({k: getattr(args, k) for k in flags if k in typed and hasattr(args, k)})
    saved["given"] = getattr(args, "given", [])
    return argparse.Namespace(**saved)


# What --resume needs in a checkpoint, with the type each entry must have
RESUME_KEYS = {"model": dict, "optimizer": dict, "args": dict, "step": int, "log": list,
               "history": list, "rng": dict}


def check_resumable(state, path, keys=RESUME_KEYS):
    """Every entry that resuming reads is there, of the right type, and the weights are finite;
    else one line naming `path`, what is wrong and what to do."""
    prev = path.with_name(path.stem + ".prev.pt")
    fallback = (f"; continue from {prev} with --resume {prev}" if prev.is_file() and prev != path
                else "; start a new run with another --out")
    for key, kind in keys.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            got = "missing" if key not in state else f"a {type(value).__name__}: {value!r:.60}"
            raise CheckpointError(f"{path} cannot be resumed: its {key!r} is {got}, expected "
                                  f"{'a step >= 0' if kind is int else 'a ' + kind.__name__}"
                                  f"{fallback}")
    rng = state["rng"]
    if set(rng) != {"torch", "cuda", "numpy", "python"} or not isinstance(rng["torch"],
                                                                          torch.Tensor):
        raise CheckpointError(f"{path} cannot be resumed: its random-number state is malformed, "
                              f"so the run could not continue exactly{fallback}")
    tensors = [(f"model {k}", v) for k, v in state["model"].items()]
    tensors += [(f"optimizer {k}", v) for k, v in state["optimizer"].get("state", {}).items()]
    for name, value in tensors:
        for t in (value.values() if isinstance(value, dict) else [value]):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.isfinite().all():
                raise CheckpointError(f"{path} holds non-finite weights ({name} has NaN or "
                                      f"inf): this checkpoint itself is bad{fallback}")


def resume_state(resume, out, kind, keys=RESUME_KEYS):
    """Load and check the checkpoint that `--resume [PATH]` names (default: out/checkpoint.pt).
    Nothing is moved or written here: see `set_aside_current` once the states have loaded."""
    current = Path(out) / "checkpoint.pt"
    path = current if resume is True else Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path}; start without --resume, or "
                              "point --out at the run to continue")
    state = load_checkpoint(path)
    check_checkpoint_kind(state, path, kind)
    check_resumable(state, path, keys)
    return state


def set_aside_current(resume, out):
    """When a run resumed from another file (say checkpoint.prev.pt after checkpoint.pt was
    damaged) has loaded it, move out/checkpoint.pt to checkpoint.replaced.pt, so that the next
    save does not rotate it over the good previous one. Called only after every state has
    loaded: a --resume that fails moves nothing."""
    current = Path(out) / "checkpoint.pt"
    if DIST.main and resume is not True and current.exists() \
            and Path(resume).resolve() != current.resolve():
        os.replace(current, current.with_name("checkpoint.replaced.pt"))


def load_state(module, state_dict, what, path):
    """load_state_dict with one clear sentence instead of a key dump on a mismatch."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path} does not fit this {what} (different model or "
                              f"incompatible args): {first}") from None


# ----------------------------------------------------------------------------------------------
# Files: every write is whole or absent, every run folder has one writer
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def replacing(path, suffix=".tmp"):
    """A new temporary file beside `path`, yielded as a Path, that replaces `path` when the block
    ends normally and is removed when it does not (an error, Ctrl-C).

    The name is unique (pid and random) and the file is created with O_CREAT | O_EXCL |
    O_NOFOLLOW, so a file or symlink planted beside `path` is never followed, and two writers
    never share one. Permissions follow the umask, as for any new file. A failed write (a full
    disk, say) is one line naming `path`, which is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
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
    releases the lock when the file is closed or the process ends, however it ends."""
    import fcntl
    try:
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
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
    f.write(f"pid {os.getpid()} ({' '.join(Path(sys.argv[0]).name.split() + sys.argv[1:])})")
    f.flush()
    return f


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
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
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


# ----------------------------------------------------------------------------------------------
# Commands and signals: one line per error, a clean stop on SIGINT/SIGTERM
# ----------------------------------------------------------------------------------------------
class Timer:
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


# ----------------------------------------------------------------------------------------------
# Progress and device-side sums
# ----------------------------------------------------------------------------------------------
class Progress:
    """The progress of one phase (training, evaluation, IW-NLL, the prior, metrics...), shown
    by rank 0 alone. On a terminal: a tqdm bar with its size and ETA. Elsewhere (a log file, a
    pipe) plain lines instead of a bar redrawn with carriage returns: what will be done, with
    an estimate of the time once the first steps are timed; a line every tenth of the way when
    the phase is long; one at the end. Phases under 2 s print nothing, unless `announce`: then
    the first line comes before any work.

        for x in Progress(batches, total=len(batches), desc="evaluation", unit="batch"): ...
    """
    QUIET_S = 2.0                       # plain lines: phases shorter than this stay silent
    LINE_EVERY_S = 30.0                 # at most one progress line per tenth, this far apart

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0, what=None,
                 announce=False, tty=None):
        from tqdm import tqdm
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc, self.unit, self.n, self.first = desc, unit, initial, initial
        tty = sys.stderr.isatty() if tty is None else tty
        self.lines = DIST.main and not tty
        self.bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit,
                        dynamic_ncols=True, disable=not DIST.main or self.lines)
        left = None if self.total is None else self.total - initial
        self.plan = ", ".join(t for t in (None if left is None else
                                          f"{left:,} {plural(unit, left)}", what) if t)
        self.t0 = self.last = time.perf_counter()
        self.announced, self.estimated, self.tenth, self.closed = False, False, 0, False
        if self.lines and announce:
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
        self.bar.update(n)
        if not self.lines:
            return
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
        self.bar.set_postfix(**values)

    def _postfix_text(self):
        values = getattr(self, "postfix", {})
        return " (" + ", ".join(f"{k} {v}" for k, v in values.items()) + ")" if values else ""

    def write(self, text):
        """A line that does not break the bar (rank 0 only)."""
        if DIST.main:
            self.bar.write(text) if not self.lines else print(text, flush=True)

    def close(self, stopped=False):
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        took = time.perf_counter() - self.t0
        if self.lines and (self.announced or took >= self.QUIET_S):
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


class Sums:
    """Running sums of a vector of `n` values kept on the device, read once at the end.

    float32 with Kahan compensation (each addition's rounding error is carried into the next),
    not float64, which Apple's MPS does not have: the sum of many batches keeps about float64
    accuracy for values computed in float32. `read()` adds the sums over ranks under torchrun and
    returns a float64 numpy array on the host.
    """

    def __init__(self, n, device):
        self.total = torch.zeros(n, dtype=torch.float32, device=device)
        self.error = torch.zeros_like(self.total)     # what the last additions lost, negated

    def add(self, values):
        y = values.float() - self.error
        t = self.total + y
        self.error = (t - self.total) - y
        self.total = t

    def read(self):
        both = all_reduce_sum(torch.stack([self.total, self.error])).cpu().numpy()
        return both[0].astype(np.float64) - both[1].astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Distributed data parallel (torchrun)
# ----------------------------------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world > 1


DIST = Distributed()           # this process's place; set by setup_distributed


def setup_distributed(device_name="auto"):
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set).

    NCCL with one GPU per local rank on CUDA, gloo on CPU. Without torchrun nothing changes.
    Returns (Distributed, device).
    """
    global DIST
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DIST, get_device(device_name)
    import torch.distributed as dist
    DIST = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                       int(os.environ.get("LOCAL_RANK", 0)))
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", DIST.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DIST, device


def cleanup_distributed():
    """Tear the process group down on every rank together: a rank that destroys it while rank 0
    is still writing outputs can abort at exit ("terminate called without an active
    exception", seen with gloo under torchrun)."""
    if DIST.active:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def data_parallel(module, device):
    """`module` wrapped in DistributedDataParallel under torchrun (gradients averaged over
    ranks), else itself. Buffers are not re-broadcast from rank 0 every step: the models keep
    theirs identical on every rank (the VQ-VAE's quantiser with its own collectives)."""
    if not DIST.active:
        return module
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    # the flag's name since torch 2.13; before, broadcast_buffers (now deprecated)
    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else "broadcast_buffers")
    return DDP(module, device_ids=[device] if device.type == "cuda" else None, **{flag: False})


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks, in place (a no-op in a single process)."""
    if DIST.active:
        import torch.distributed as dist
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag, device):
    """True on every rank if `flag` is true on any rank (one small all-reduce)."""
    if not DIST.active:
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(bool(flag))], device=device)).item())


def broadcast(tensor, src=0):
    """Rank `src`'s `tensor` on every rank, in place (a no-op in a single process)."""
    if DIST.active:
        import torch.distributed as dist
        dist.broadcast(tensor, src)
    return tensor


def should_stop(stop, step, log_every, device):
    """Whether to stop after this step on a SIGINT/SIGTERM. Under torchrun the ranks agree at
    log steps only (one small all-reduce), so that all of them save the same step."""
    if not DIST.active:
        return stop.requested is not None
    return step % log_every == 0 and any_rank(stop.requested, device)


def restore_rng(state):
    """This rank's RNG state from a checkpoint (`rng_ranks` under torchrun, else `rng`)."""
    rngs = state.get("rng_ranks") or [state["rng"]]
    try:
        set_rng_state(rngs[DIST.rank] if len(rngs) == DIST.world else rngs[0])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's random-number state is malformed "
                              f"({type(e).__name__}: {str(e)[:100]}); it cannot be resumed "
                              "exactly: start a new run with another --out") from None


def barrier():
    if DIST.active:
        import torch.distributed as dist
        dist.barrier()


def gather_objects(obj):
    """A list of `obj` from every rank (just [obj] in a single process)."""
    if not DIST.active:
        return [obj]
    import torch.distributed as dist
    out = [None] * DIST.world
    dist.all_gather_object(out, obj)
    return out


class main_first:
    """Let rank 0 run a block first (building a data cache, say), then the other ranks."""

    def __enter__(self):
        if not DIST.main:
            barrier()

    def __exit__(self, *exc):
        if DIST.main and exc[0] is None:
            barrier()
        return False


# ==============================================================================================
# IMAGES AND PLOTS
# ==============================================================================================
def save_grid(images, path, nrow=8, padding=2):
    """Save a (N, C, H, W) float batch in [0, 1] as one PNG grid."""
    atomic_write(path, lambda f: torchvision.utils.save_image(
        images.detach().float().clamp(0, 1).cpu(), f, format="png", nrow=nrow, padding=padding,
        pad_value=0.5))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_figure(rows=1, cols=1, panel=(6, 4)):
    """A figure of rows x cols panels, each `panel` inches; returns (fig, 2-D array of axes)."""
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows),
                             squeeze=False)
    return fig, axes


def save_figure(fig, path):
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    _pyplot().close(fig)


def plot_curves(curves, path=None, xlabel="step", title=None, logy=False, styles=None, ax=None,
                legend="best"):
    """Plot named series {name: (xs, ys)} on one axis: saved to `path`, or drawn into `ax`.

    `styles` maps a name to extra matplotlib line options (colour, width, dashes); a style with
    label=None keeps that series out of the legend. `legend` is its location; more than eight
    entries go in two columns.
    """
    fig = None
    if ax is None:
        fig, axes = plot_figure()
        ax = axes[0, 0]
    styles = styles or {}
    for name, (xs, ys) in curves.items():
        style = {"label": name, "marker": "o" if len(xs) < 30 else None, "markersize": 3,
                 **styles.get(name, {})}
        ax.plot(xs, ys, **style)
    ax.set_xlabel(xlabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    entries = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize="small", loc=legend, ncol=2 if entries > 8 else 1)
    if fig is not None:
        save_figure(fig, path)


def plot_bars(values, path=None, xlabel="latent dimension", ylabel="KL (nats)", title=None,
              labels=None, ax=None):
    """Bar chart of `values` (tick `labels` default to the indices): saved to `path` or drawn
    into `ax`."""
    values = [float(v) for v in values]
    fig = None
    if ax is None:
        fig, axes = plot_figure(panel=(max(4, 0.3 * len(values) + 2), 3.5))
        ax = axes[0, 0]
    ax.bar(range(len(values)), values)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if labels is not None:
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize="small")
    elif len(values) <= 32:
        ax.set_xticks(range(len(values)))
    if fig is not None:
        save_figure(fig, path)


def labelled_rows_figure(images, labels, gap_every=None):
    """A matplotlib figure of a (rows, cols, C, H, W) float batch in [0, 1] as a grid with one
    text label per row, one output pixel per image pixel. `gap_every` puts a wider gap after
    every that many columns (to separate seed images)."""
    plt = _pyplot()
    rows, cols = images.shape[:2]
    grid = torchvision.utils.make_grid(images.flatten(0, 1).detach().float().clamp(0, 1).cpu(),
                                       nrow=cols, padding=2, pad_value=1.0)   # (3, H', W')
    pixels = grid.permute(1, 2, 0).numpy()
    if gap_every:
        w = images.shape[-1] + 2
        blocks = [pixels[:, i * w:(i + gap_every) * w] for i in range(0, cols, gap_every)]
        sep = np.ones((pixels.shape[0], 6, 3), pixels.dtype)
        pixels = np.concatenate(sum(([b, sep] for b in blocks), [])[:-1], axis=1)
    height, width = pixels.shape[:2]
    dpi = 100
    label_w = max(110, 8 * max(map(len, labels), default=0) + 12)   # monospace 9 pt: ~7.5 px
    fig = plt.figure(figsize=((width + label_w) / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes([label_w / (width + label_w), 0, width / (width + label_w), 1])
    ax.imshow(pixels, interpolation="nearest")
    ax.axis("off")
    row_h = height / rows
    for r, text in enumerate(labels):
        fig.text(label_w / (width + label_w) - 0.005, 1 - (r + 0.5) * row_h / height, text,
                 ha="right", va="center", fontsize=9, family="monospace")
    return fig


def save_labelled_rows(images, labels, path, gap_every=None):
    """Save a (rows, cols, C, H, W) float batch in [0, 1] as a PNG grid with one text label per
    row (`labelled_rows_figure`)."""
    fig = labelled_rows_figure(images, labels, gap_every)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))
    _pyplot().close(fig)


def save_labelled_gif(frames, labels, path, frame_ms=150):
    """An animated GIF of (frames, rows, cols, C, H, W) floats in [0, 1], each frame a labelled
    grid (`labelled_rows_figure`), played forwards then backwards, looping."""
    from PIL import Image
    plt = _pyplot()
    pictures = []
    for grid in frames:
        fig = labelled_rows_figure(grid, labels)
        fig.canvas.draw()
        pictures.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
        plt.close(fig)
    loop = pictures + pictures[-2:0:-1]                # there and back again
    atomic_write(path, lambda f: loop[0].save(f, format="GIF", save_all=True,
                                              append_images=loop[1:], duration=frame_ms,
                                              loop=0))


# ==============================================================================================
# DATA LOADING: every dataset becomes a uint8 (N, C, H, W) tensor plus its labels
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Splits in memory and their batches
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """A whole split in memory. `images` is uint8 (N, C, H, W), 255 = white."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor | None = None          # (N,) class or (N, F) factor classes
    label_names: list = field(default_factory=list)
    binary: bool = False                        # pixels are exactly 0 or 255
    files: list = field(default_factory=list)   # file names, where the images have them
    value_names: dict = field(default_factory=dict)   # {label: names of its classes}

    def __len__(self):
        return self.images.shape[0]

    @property
    def image_size(self):
        return self.images.shape[-1]

    @property
    def channels(self):
        return self.images.shape[1]


def load_dataset(name, root, split, limit=None, image_size=64, crop=148):
    """Load `split` ('train', 'test'; CelebA also 'valid') of a dataset as an ImageSet."""
    if split not in ("train", "valid", "test"):
        raise UserError(f"unknown split {split!r}; use 'train', 'valid' or 'test'")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    if name == "celeba":
        data = load_celeba(Path(root), split, limit, image_size, crop)
    elif name in ("mnist", "cifar10", "dsprites"):
        if split == "valid":
            raise UserError(f"{name} has no validation split; use 'train' or 'test'")
        loader = {"mnist": load_mnist, "cifar10": load_cifar10, "dsprites": load_dsprites}[name]
        data = loader(Path(root), split, limit)
    else:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if len(data) == 0:
        raise UserError(f"the {split} split of {name} in {root} is empty")
    return data


def _limit(data, limit):
    if limit is None or limit >= len(data):
        return data
    data.images = data.images[:limit]
    data.labels = None if data.labels is None else data.labels[:limit]
    return data


def epoch_order(n, seed, epoch, rank=0, world=1):
    """This rank's shard of the epoch's permutation of n items: a pure function of
    (seed, epoch), so a resumed run replays exactly; ranks take interleaved, disjoint shares."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[rank:n - n % world:world]


class DeviceBatches:
    """Mini-batches sliced from a tensor that lives on the training device: uint8 images, or
    any items (the prior's code grids) through `indices`.

    The items move to the device once; each epoch is a permutation drawn from a generator
    seeded by (seed, epoch), so the order is a pure function of the epoch and a resumed run
    sees exactly the batches it would have seen. Floats are made on the device. Every batch
    is full; an epoch's remainder is left out. With `world > 1` each rank takes its own shard
    of the same permutation.
    """

    def __init__(self, images, batch_size, device, seed=0, binarize=False, rank=0, world=1,
                 channels_last=False):
        if batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.images = images.to(device)
        self.batch_size, self.device, self.seed = batch_size, torch.device(device), seed
        self.binarize, self.rank, self.world = binarize, rank, world
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        n = len(images) // world
        self.steps_per_epoch = n // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(images)} images are fewer than one batch of {batch_size}"
                            f"{f' on each of {world} ranks' if world > 1 else ''}")

    def __len__(self):
        return self.steps_per_epoch

    def to_float(self, x):
        x = x.float().div_(255).contiguous(memory_format=self.memory_format)
        return torch.bernoulli(x) if self.binarize else x

    def indices(self, epoch, start=0):
        """Yield the index batches (on the device) of `epoch`, beginning at batch `start`."""
        perm = epoch_order(len(self.images), self.seed, epoch, self.rank, self.world)
        perm = perm.to(self.device)
        for i in range(start, self.steps_per_epoch):
            yield perm[i * self.batch_size:(i + 1) * self.batch_size]

    def epoch(self, epoch, start=0):
        """Yield the float image batches of `epoch`, beginning at batch `start`."""
        for idx in self.indices(epoch, start):
            yield self.to_float(self.images[idx])


def iterate(images, batch_size, device):
    """Yield float batches of a uint8 tensor in order (evaluation)."""
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size].to(device, non_blocking=True).float().div_(255)


# ----------------------------------------------------------------------------------------------
# MNIST: IDX files
# ----------------------------------------------------------------------------------------------
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST_GET = ("get them with `python -c \"import torchvision; torchvision.datasets.MNIST('{root}', "
             "download=True)\"` on a machine with internet")


def read_idx(path, shape):
    """A uint8 IDX file (magic 0 0 0x08 ndim, big-endian sizes, then the bytes, optionally
    gzipped), checked against `shape` (None: any size)."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    ndim = len(shape)
    if raw[:4] != bytes([0, 0, 8, ndim]):
        raise ValueError(f"its magic number is {raw[:4].hex() or 'missing'}, not "
                         f"{bytes([0, 0, 8, ndim]).hex()} (uint8, {ndim} dimensions)")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError("its header is cut short")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if any(want is not None and d != want for d, want in zip(dims, shape)):
        want = ["N" if w is None else w for w in shape]
        raise ValueError(f"it holds {list(dims)}, expected {want}")
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ValueError(f"it holds {len(body)} bytes of data where its header promises "
                         f"{math.prod(dims)} (cut short?)")
    return np.frombuffer(body, np.uint8).reshape(dims)


def load_mnist(root, split, limit=None):
    """MNIST from its IDX files (or .gz) in `root`/MNIST/raw; a download is tried only when a
    file is missing, and a damaged file is named, never taken for a missing one."""
    raw = root / "MNIST" / "raw"
    names = MNIST_FILES[split]

    def find():
        return [next((p for p in (raw / n, raw / f"{n}.gz") if p.is_file()), None) for n in names]

    if None in find():
        try:                # not on disk: try the download once, quietly
            torchvision.datasets.MNIST(str(root), train=split == "train", download=True)
        except (RuntimeError, OSError) as e:
            missing = [n for n, p in zip(names, find()) if p is None]
            raise DatasetNotFound(
                f"MNIST not found: {raw} lacks {', '.join(missing)} and the download failed "
                f"({type(e).__name__}). Expected train-images-idx3-ubyte, "
                "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
                f"(optionally .gz) there; {MNIST_GET.format(root=root)}. "
                "`--dataset dsprites` works offline.") from None
    arrays = []
    for path, shape in zip(find(), ((None, 28, 28), (None,))):
        try:
            arrays.append(read_idx(path, shape))
        except (OSError, ValueError, EOFError) as e:       # gzip errors are OSError/EOFError
            raise UserError(f"{path} is not a valid MNIST IDX file: {e}; delete it and "
                            f"{MNIST_GET.format(root=root)}") from None
    images, labels = arrays
    if len(images) != len(labels) or (labels > 9).any():
        raise UserError(f"{raw}: {len(images)} images but {len(labels)} labels (or a label "
                        f"above 9) in the {split} files; replace them with fresh copies: "
                        f"{MNIST_GET.format(root=root)}")
    return _limit(ImageSet("mnist", torch.from_numpy(images.copy()).unsqueeze(1),
                           torch.from_numpy(labels.astype(np.int64)), label_names=["digit"]),
                  limit)


# ----------------------------------------------------------------------------------------------
# CIFAR-10: pickled batches
# ----------------------------------------------------------------------------------------------
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else. A batch is a dict of strings, lists and
    numbers with numpy arrays in it; those need only the names below. Any other global
    (os.system, builtins.eval, ...) is refused, so a crafted file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
               ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which no CIFAR-10 "
                                         "batch holds (refused, not run)")
        return super().find_class(module, name)


def read_cifar_batch(path):
    """(data (N, 3072) uint8, labels (N,) int64) of one CIFAR-10 batch file, checked."""
    try:
        with open(path, "rb") as f:
            batch = BatchUnpickler(f, encoding="latin1").load()
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"its data is {data.dtype} {list(data.shape)}, expected uint8 "
                             "[N, 3072]")
        if labels.shape != (len(data),) or not ((labels >= 0) & (labels < 10)).all():
            raise ValueError(f"it has {labels.size} labels for {len(data)} images, or a label "
                             "outside 0-9")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, TypeError,
            AttributeError, IndexError) as e:
        raise UserError(f"{path} is not a valid CIFAR-10 batch: {str(e)[:200]}; delete it and "
                        f"extract a fresh copy of {CIFAR_URL}") from None
    return data, labels


def load_cifar10(root, split, limit=None):
    """CIFAR-10 from the standard `cifar-10-batches-py` pickle batches (read directly, no md5)."""
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((folder / n).exists() for n in names):
        try:
            torchvision.datasets.utils.download_and_extract_archive(CIFAR_URL, str(root),
                                                                    md5=CIFAR_MD5)
        except (RuntimeError, OSError) as e:
            missing = [n for n in names if not (folder / n).exists()]
            raise DatasetNotFound(
                f"CIFAR-10 not found: {folder} lacks {', '.join(missing)} and the download "
                f"failed ({type(e).__name__}). Download cifar-10-python.tar.gz from "
                f"{CIFAR_URL} and extract it into {root}. "
                "`--dataset dsprites` works offline.") from None
    images, labels = [], []
    for n in names:
        data, classes = read_cifar_batch(folder / n)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(classes)
    return _limit(ImageSet("cifar10", torch.from_numpy(np.concatenate(images)),
                           torch.from_numpy(np.concatenate(labels)), label_names=["class"],
                           value_names={"class": list(CIFAR_CLASSES)}), limit)


# ----------------------------------------------------------------------------------------------
# CelebA: JPEGs with attribute and partition files (decoded once into a cache, below)
# ----------------------------------------------------------------------------------------------
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
CELEBA_HELP = (
    "Get CelebA's aligned images (img_align_celeba.zip) and list_attr_celeba.txt, "
    "list_eval_partition.txt from the authors' page (mmlab.ie.cuhk.edu.hk/projects/CelebA.html) "
    "or a mirror with the CSV layout (img_align_celeba/img_align_celeba/, list_attr_celeba.csv, "
    "list_eval_partition.csv), and put them in {folder}. torchvision's CelebA(download=True) "
    "often fails with a Google Drive 'quota exceeded' page, so download by hand. "
    "`--dataset dsprites` works offline.")


def celeba_files(root):
    """Find CelebA under `root`/celeba or `root`, in the official or the mirror (CSV) layout.

    Returns (image folder, attribute file, partition file)."""
    candidates = [root / "celeba", root]
    for folder in candidates:
        official = (folder / "img_align_celeba", folder / "list_attr_celeba.txt",
                    folder / "list_eval_partition.txt")
        mirror = (folder / "img_align_celeba" / "img_align_celeba",
                  folder / "list_attr_celeba.csv", folder / "list_eval_partition.csv")
        for layout in (mirror, official):            # the mirror nests its images one deeper
            if all(p.exists() for p in layout):
                return layout
    for folder in candidates:                         # say precisely what is missing
        for layout in ((folder / "img_align_celeba" / "img_align_celeba",
                        folder / "list_attr_celeba.csv", folder / "list_eval_partition.csv"),
                       (folder / "img_align_celeba", folder / "list_attr_celeba.txt",
                        folder / "list_eval_partition.txt")):
            present = [p for p in layout if p.exists()]
            if present and len(present) < 3:
                missing = ", ".join(str(p) for p in layout if not p.exists())
                raise DatasetNotFound(f"CelebA in {folder} is incomplete: missing {missing}. "
                                      + CELEBA_HELP.format(folder=folder))
    raise DatasetNotFound(f"CelebA not found: looked for {root / 'celeba' / 'img_align_celeba'} "
                          "with list_attr_celeba.txt and list_eval_partition.txt (or the .csv "
                          "mirror layout) in " + f"{root / 'celeba'} and {root}. "
                          + CELEBA_HELP.format(folder=root / "celeba"))


def read_celeba_attributes(path):
    """(file names, attribute names, (N, 40) int8 in {0, 1}) from the .txt or .csv format."""
    try:
        lines = path.read_text().splitlines()
        if path.suffix == ".csv":
            names = lines[0].strip().split(",")[1:]
            rows = [line.strip().split(",") for line in lines[1:] if line.strip()]
        else:       # line 1: count; line 2: the names; then 'file  -1  1 ...', spacing varies
            count, names = int(lines[0].split()[0]), lines[1].split()
            rows = [line.split() for line in lines[2:] if line.strip()]
            if len(rows) != count:
                raise ValueError(f"header says {count} rows, found {len(rows)}")
        files = [r[0] for r in rows]
        values = np.array([[int(v) for v in r[1:]] for r in rows], np.int8)
        if values.shape[1:] != (len(names),) or not np.isin(values, (-1, 1)).all():
            raise ValueError("expected one -1/1 value per attribute on every row")
    except (OSError, ValueError, IndexError) as e:
        raise UserError(f"{path} is not a CelebA attribute file: {e}") from None
    return files, names, (values > 0).astype(np.int8)


def read_celeba_partition(path):
    """{file name: 0 train / 1 valid / 2 test} from the .txt or .csv format."""
    try:
        lines = path.read_text().splitlines()
        if path.suffix == ".csv":
            lines = [line.replace(",", " ") for line in lines[1:]]
        part = {f: int(p) for f, p in (line.split() for line in lines if line.strip())}
        if not set(part.values()) <= {0, 1, 2}:
            raise ValueError("partitions must be 0, 1 or 2")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a CelebA partition file: {e}") from None
    return part


def open_cache(path, shape, remedy):
    """Memory-map a cache .npy after checking that it is one: uint8 of `shape`, every byte
    present. Else one line naming the file, what is wrong and what to do (`remedy`)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        problem = None if isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and \
            arr.shape == tuple(shape) else \
            f"holds {getattr(arr, 'dtype', 'no')} {list(getattr(arr, 'shape', []))}, expected " \
            f"uint8 {list(shape)}"
    except (OSError, ValueError, EOFError) as e:
        problem = f"is not a complete .npy file ({str(e).strip()[:120] or type(e).__name__})"
    if problem:
        raise UserError(f"the cache {path} {problem}: it is damaged or was not written by this "
                        f"version; {remedy}")
    return arr


def load_celeba(root, split, limit=None, image_size=64, crop=148):
    """CelebA: official splits, the 40 attributes by name, centre crop `crop` -> `image_size`."""
    if crop <= 0 or image_size <= 0 or image_size > crop:
        raise UserError(f"--image-size {image_size} and --crop {crop} must be positive with "
                        "the size at most the crop")
    folder, attr_file, part_file = celeba_files(root)
    files, names, attrs = read_celeba_attributes(attr_file)
    partition = read_celeba_partition(part_file)
    missing = [f for f in files if f not in partition]
    if missing:
        raise UserError(f"{part_file} lacks {len(missing)} images of {attr_file}, "
                        f"e.g. {missing[0]}")
    # cache named by crop and size, so changing either never reuses a stale cache
    cache = attr_file.parent / f"celeba_cache_crop{crop}_{image_size}px.npy"
    stamp = {"files": len(files), "first": files[0], "last": files[-1], "crop": crop,
             "size": image_size}

    def current():
        try:
            return cache.exists() and json.loads(cache.with_suffix(".json").read_text()) == stamp
        except (OSError, ValueError):
            return False

    if not current():
        with building(attr_file.parent, f"the CelebA cache {cache}"):
            if not current():                        # not built by another process meanwhile
                cache.unlink(missing_ok=True)        # made from other files: rebuild
                try:
                    build_celeba_cache(folder, files, crop, image_size, cache, stamp)
                except OSError as e:
                    raise UserError(f"cannot write the CelebA cache {cache}: {e}") from None
    rows = np.array([i for i, f in enumerate(files) if partition[f] == CELEBA_SPLITS[split]],
                    np.int64)
    if limit is not None:
        rows = rows[:limit]
    images = open_cache(cache, (len(files), 3, image_size, image_size),
                        f"delete it and rerun to decode {folder} again")[rows]
    data = ImageSet("celeba", torch.from_numpy(images), torch.from_numpy(attrs[rows]),
                    label_names=names)
    data.files = [files[i] for i in rows]
    return data


# ----------------------------------------------------------------------------------------------
# dSprites: the official factor grid (rendered once into a cache, below)
# ----------------------------------------------------------------------------------------------
# The official grid (Higgins et al. 2017, REFERENCE.md): every combination of these factor values,
# the flat index being the class indices dotted with DSPRITES_STRIDES (posY varies fastest).
DSPRITES_FACTORS = ("color", "shape", "scale", "orientation", "posX", "posY")
DSPRITES_SIZES = (1, 3, 6, 40, 32, 32)
DSPRITES_STRIDES = (737280, 245760, 40960, 1024, 32, 1)
DSPRITES_SHAPES = ("square", "ellipse", "heart")
DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_CACHE = "dsprites_rendered_64x64.npy"
DSPRITES_OFFICIAL_CACHE = "dsprites_official_64x64.npy"
DSPRITES_TEST_FRACTION = 0.1
DSPRITES_SPLIT_SEED = 20170101     # fixed: the hold-out never depends on --seed


def dsprites_factor_values():
    """The values of each factor, as listed in REFERENCE.md."""
    return [torch.ones(1), torch.arange(1.0, 4.0), torch.linspace(0.5, 1.0, 6),
            torch.linspace(0, 2 * math.pi, 40, dtype=torch.float64).float(),
            torch.linspace(0, 1, 32), torch.linspace(0, 1, 32)]


def dsprites_classes(index=None):
    """Factor classes (N, 6) of flat indices (default: all 737,280 in official order)."""
    if index is None:
        index = torch.arange(DSPRITES_STRIDES[0])
    strides = torch.tensor(DSPRITES_STRIDES)
    sizes = torch.tensor(DSPRITES_SIZES)
    return (index[:, None] // strides) % sizes


def dsprites_values(classes):
    """Factor values (N, 6) of factor classes (N, 6)."""
    return torch.stack([v[classes[:, i]] for i, v in enumerate(dsprites_factor_values())], 1)


def dsprites_split(split):
    """Flat indices of the fixed, seeded 90/10 train/test hold-out, in a shuffled order."""
    g = torch.Generator().manual_seed(DSPRITES_SPLIT_SEED)
    perm = torch.randperm(DSPRITES_STRIDES[0], generator=g)
    n_test = int(DSPRITES_STRIDES[0] * DSPRITES_TEST_FRACTION)
    return perm[:n_test] if split == "test" else perm[n_test:]


def dsprites_cache(root, build=True):
    """The whole grid as a (737280, 64, 64) uint8 .npy under `root`/dsprites, memory-mappable.

    If the official npz is present (in `root` or `root`/dsprites) it is converted once;
    otherwise the project renders the grid once, if `build` (else None when absent).
    """
    root = Path(root)
    folder = root / "dsprites"
    official = [p for p in (root / DSPRITES_FILE, folder / DSPRITES_FILE) if p.exists()]
    cache = folder / (DSPRITES_OFFICIAL_CACHE if official else DSPRITES_CACHE)
    if cache.exists() or not (build or official):
        return cache if cache.exists() else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the dSprites cache folder {folder}: {e}") from None
    with building(folder, f"the dSprites cache {cache}"):
        if not cache.exists():                 # not built by another process meanwhile
            for stale in folder.glob(f".{cache.name}.*"):     # left by a killed build
                stale.unlink()
            if official:
                _convert_official_dsprites(official[0], cache)
            else:
                _render_all_dsprites(cache)
    return cache


def dsprites_images(root, index):
    """Images (N, 1, 64, 64) uint8 {0, 255} at flat `index`.

    They come from the cache (official or rendered); without the official file, a request of up
    to 100,000 images with no cache yet is rendered directly and builds no 3 GB cache.
    """
    cache = dsprites_cache(root, build=len(index) > 100_000)
    if cache is None:
        return render_dsprites(dsprites_classes(index))
    imgs = open_cache(cache, (DSPRITES_STRIDES[0], 64, 64), "delete it and rerun to build it "
                      "again (from the official file if present, else rendered)")
    order = np.argsort(index.numpy())          # read the memory map in order, then un-sort
    out = np.empty((len(index), 64, 64), np.uint8)
    out[order] = imgs[index.numpy()[order]]
    return torch.from_numpy(out).unsqueeze(1)


def load_dsprites(root, split, limit=None):
    """dSprites: official file if present, else the project's own rendering of the same grid."""
    index = dsprites_split(split)
    if limit is not None:
        index = index[:limit]
    classes = dsprites_classes(index)
    return ImageSet("dsprites", dsprites_images(root, index), classes, list(DSPRITES_FACTORS),
                    binary=True, value_names={"shape": list(DSPRITES_SHAPES)})


# ==============================================================================================
# DATASET SYNTHESIS: the dSprites renderer and the CelebA decoding cache
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# dSprites rendered from the factor grid, or converted from the official file
# ----------------------------------------------------------------------------------------------
# Shape geometry in pixels at scale 1, measured against official images (shared/ masks):
SQUARE_HALF_SIDE = 10.0                 # 20x20 px
ELLIPSE_SEMI_AXES = (13.0, 7.5)         # 26x14 px, long axis horizontal at orientation 0


# Heart: two lobe disks at (+-a, b) of radius r and a pointed bottom at (0, -t) (y up), the
# outline closed by the outer tangents from the tip to the lobes; fitted to the official masks.
HEART = dict(a=4.5, b=4.0, r=5.25, t=8.75)


def _inside_heart(u, v):
    a, b, r, t = HEART["a"], HEART["b"], HEART["r"], HEART["t"]
    lobes = ((u - a) ** 2 + (v - b) ** 2 <= r * r) | ((u + a) ** 2 + (v - b) ** 2 <= r * r)
    # outer tangent point on the right lobe, seen from the tip (0, -t)
    dx, dy = a, b + t
    dist = math.hypot(dx, dy)
    angle = math.atan2(dy, dx) - math.asin(r / dist)
    reach = math.sqrt(dist * dist - r * r)
    tx, ty = reach * math.cos(angle), -t + reach * math.sin(angle)
    polygon = [(0.0, -t), (tx, ty), (a, b), (-a, b), (-tx, ty)]      # convex, counter-clockwise
    inside = torch.ones_like(lobes)
    for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1]):
        inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
    return lobes | inside


def _inside_square(u, v):
    return torch.maximum(u.abs(), v.abs()) <= SQUARE_HALF_SIDE


def _inside_ellipse(u, v):
    return (u / ELLIPSE_SEMI_AXES[0]) ** 2 + (v / ELLIPSE_SEMI_AXES[1]) ** 2 <= 1


def render_dsprites(classes, chunk=8192):
    """Render dSprites images (N, 1, 64, 64) uint8 in {0, 255} for factor classes (N, 6).

    Binary pixels, no anti-aliasing: a pixel is on when its centre lies inside the shape.
    The sprite centre is 16 + 32*pos pixels; rotation is counter-clockwise as displayed.
    """
    values = dsprites_values(classes)
    out = torch.zeros(len(classes), 1, 64, 64, dtype=torch.uint8)
    win = torch.arange(32)                               # a 32-px window holds any sprite
    for start in range(0, len(classes), chunk):
        val, shape = values[start:start + chunk], classes[start:start + chunk, 1]
        n = len(val)
        cx, cy = 16 + 32 * val[:, 4], 16 + 32 * val[:, 5]
        col0, row0 = cx.floor().long() - 16, cy.floor().long() - 16   # window origin
        px = (col0[:, None] + win + 0.5 - cx[:, None])[:, None, :]   # (n, 1, 32), x right
        py = (cy[:, None] - (row0[:, None] + win + 0.5))[:, :, None]   # (n, 32, 1), y up
        theta, scale = val[:, 3, None, None], val[:, 2, None, None]
        cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
        mask = torch.empty(n, 32, 32, dtype=torch.bool)
        for s, inside in enumerate((_inside_square, _inside_ellipse, _inside_heart)):
            sel = (shape == s).nonzero()[:, 0]
            if len(sel):
                # rotate each pixel back into the sprite's own frame and undo the scale
                u = cos[sel] * px[sel] + sin[sel] * py[sel]           # (m, 32, 32)
                v = cos[sel] * py[sel] - sin[sel] * px[sel]
                mask[sel] = inside(u, v)
        rows = (row0[:, None] + win)[:, :, None]                        # (n, 32, 1)
        cols = (col0[:, None] + win)[:, None, :]                        # (n, 1, 32)
        out[start:start + n, 0][torch.arange(n)[:, None, None], rows, cols] = mask.to(torch.uint8) * 255
    return out


def _render_all_dsprites(path, part=8192):
    """Render the full grid into `path` (.npy, (737280, 64, 64) uint8), in parallel threads.
    An interrupted render (Ctrl-C, an error) leaves no partial file: the parts under way
    finish, the rest are dropped and the temporary file is removed."""
    from concurrent.futures import ThreadPoolExecutor
    n = DSPRITES_STRIDES[0]

    def work(i):
        idx = torch.arange(i, min(i + part, n))
        arr[i:i + len(idx)] = render_dsprites(dsprites_classes(idx))[:, 0].numpy()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1))
    try:
        with replacing(path, ".partial.npy") as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 64, 64))
            list(Progress(pool.map(work, range(0, n, part)), total=math.ceil(n / part),
                          desc=f"rendering dSprites into {path}", unit="part",
                          what=f"{n:,} images"))
            arr.flush()
            del arr
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


def _convert_official_dsprites(npz, cache):
    """Stream `imgs` (0/1) of the official npz into the cache (0/255) without 3 GB in memory."""
    n = DSPRITES_STRIDES[0]
    with replacing(cache, ".partial.npy") as tmp:
        try:
            with zipfile.ZipFile(npz) as zf:
                with zf.open("latents_classes.npy") as f:
                    classes = np.lib.format.read_array(f)
                if classes.shape != (n, 6) or not np.array_equal(classes,
                                                                 dsprites_classes().numpy()):
                    raise ValueError("latents_classes is not the official 737280x6 grid in "
                                     "order")
                with zf.open("imgs.npy") as f:
                    version = np.lib.format.read_magic(f)
                    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f)
                                             if version == (1, 0)
                                             else np.lib.format.read_array_header_2_0(f))
                    if shape != (n, 64, 64) or fortran or dtype != np.uint8:
                        raise ValueError(f"imgs is {dtype}{list(shape)}, expected "
                                         f"uint8[{n}, 64, 64]")
                    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                    chunk = 16384
                    for i in Progress(range(0, n, chunk), desc=f"converting {npz.name}",
                                      unit="chunk"):
                        m = min(chunk, n - i)
                        block = np.frombuffer(f.read(m * 4096), np.uint8)
                        if block.size != m * 4096:
                            raise ValueError("imgs ends early")
                        arr[i:i + m] = block.reshape(m, 64, 64) * np.uint8(255)
                    arr.flush()
                    del arr
        except UserError:               # a ValueError too (a full disk, say): already clear
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"{npz} is not a readable official dSprites file: {e}") from None


# ----------------------------------------------------------------------------------------------
# CelebA decoded once (crop, resize) into a uint8 cache, in parallel and resumable
# ----------------------------------------------------------------------------------------------
def _decode_celeba(job):
    """Worker: decode, centre-crop and resize some JPEGs -> (n, 3, S, S) uint8, or an error."""
    from PIL import Image, UnidentifiedImageError
    paths, crop, size = job
    out = np.empty((len(paths), 3, size, size), np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                if min(w, h) < crop:
                    return f"{path} is {w}x{h}, smaller than the {crop}x{crop} centre crop"
                left, top = (w - crop) // 2, (h - crop) // 2
                img = img.crop((left, top, left + crop, top + crop))
                img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
                out[i] = np.asarray(img).transpose(2, 0, 1)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return f"cannot read image {path}: {e}"
    return out


class _InProcess:
    """The executor interface, run in this process (one chunk needs no worker pool)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs):
        return map(fn, jobs)

    def shutdown(self, **options):
        pass


def _ignore_sigint():
    """Worker processes leave Ctrl-C to the main process, which stops them (no tracebacks)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_celeba_cache(folder, files, crop, size, cache, stamp, chunk=1000, workers=None):
    """Decode every JPEG once into `cache` (N, 3, S, S) uint8 .npy, in parallel, resumably.

    Finished chunks are recorded beside the partial file, so an interrupted build continues;
    `stamp` (what the cache was made from) is written to cache.json before the cache appears.
    The caller holds the folder's build lock, so one process at a time writes the partial file.
    """
    from concurrent.futures import ProcessPoolExecutor
    n = len(files)
    shape = (n, 3, size, size)
    partial = cache.with_name(cache.stem + ".partial.npy")
    progress = cache.with_name(cache.stem + ".progress.json")
    done = set()
    if partial.exists() and progress.exists():
        try:
            meta = json.loads(progress.read_text())
            arr = np.load(partial, mmap_mode="r+")
            if meta["files"] == n and arr.shape == shape and arr.dtype == np.uint8:
                done = set(meta["done"])
        except (OSError, ValueError, EOFError, KeyError, TypeError):
            done = set()             # unreadable: start over
    if not done:
        partial.unlink(missing_ok=True)
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))   # no symlink
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
    todo = [i for i in range(0, n, chunk) if i not in done]
    workers = min(workers or os.cpu_count() or 1, len(todo))
    jobs = [([str(folder / f) for f in files[i:i + chunk]], crop, size) for i in todo]
    pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint) if workers > 1 \
        else _InProcess()
    try:
        with Progress(total=n, initial=n - sum(min(chunk, n - i) for i in todo),
                      desc=f"decoding CelebA into {cache.name}", unit="image") as bar:
            for i, block in zip(todo, pool.map(_decode_celeba, jobs)):
                if isinstance(block, str):
                    raise UserError(block)
                arr[i:i + len(block)] = block
                arr.flush()
                done.add(i)
                write_json(progress, {"files": n, "done": sorted(done)})
                bar.update(len(block))
    finally:
        pool.shutdown(cancel_futures=True)     # on Ctrl-C, the chunks not started are dropped
    del arr
    write_json(cache.with_suffix(".json"), stamp)
    os.replace(partial, cache)
    progress.unlink()
