"""Checkpoints: atomic writes with the previous one kept, safe loads, and what an exact resume
needs (the checks, the run's settings, every rank's random-number state).

A checkpoint carries its config: {"kind", "model", "optimizer", "args", "step", "log",
"history", "rng", ...}, written from the uncompiled, unwrapped module."""
import argparse
import os
import pickle
import zipfile
from pathlib import Path

import torch

from training import devices, distributed, files
from training.errors import CheckpointError, UserError


def save(path, state):
    """Write `state` atomically to `path`; the checkpoint it replaces becomes *.prev.pt."""
    files.atomic_write(path, lambda f: torch.save(state, f), keep_previous=True)


def load(path, map_location="cpu"):
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


def check_kind(state, path, kind):
    found = state.get("kind")
    if found != kind:
        raise CheckpointError(f"{path} holds a {found or 'unknown'} model, not a {kind} model")


def nbytes(*modules):
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
    rng = state["rng"]           # "device": the training device's generator ("cuda": older)
    if not {"torch", "numpy", "python"} <= set(rng) <= {"torch", "numpy", "python", "device",
                                                         "device_type", "cuda"} \
            or not isinstance(rng["torch"], torch.Tensor):
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
    state = load(path)
    check_kind(state, path, kind)
    check_resumable(state, path, keys)
    return state


def set_aside_current(resume, out):
    """When a run resumed from another file (say checkpoint.prev.pt after checkpoint.pt was
    damaged) has loaded it, move out/checkpoint.pt to checkpoint.replaced.pt, so that the next
    save does not rotate it over the good previous one. Called only after every state has
    loaded: a --resume that fails moves nothing."""
    current = Path(out) / "checkpoint.pt"
    if distributed.DIST.main and resume is not True and current.exists() \
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


def restore_rng(state, device="cpu"):
    """This rank's RNG state from a checkpoint (`rng_ranks` under torchrun, else `rng`), its
    device generator's onto `device`."""
    rngs = state.get("rng_ranks") or [state["rng"]]
    try:
        devices.set_rng_state(rngs[distributed.DIST.rank] if len(rngs) == distributed.DIST.world
                              else rngs[0], device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's random-number state is malformed "
                              f"({type(e).__name__}: {str(e)[:100]}); it cannot be resumed "
                              "exactly: start a new run with another --out") from None
