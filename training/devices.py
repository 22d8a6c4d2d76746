"""Devices and precision: the device, seeding and the random-number state, the GPU fast paths
(channels-last, fused Adam), bf16 autocast and the start-up probe that decides it."""
import contextlib
import copy
import random
import statistics
import time

import numpy as np
import torch

from training import distributed
from training.errors import UserError


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
    if distributed.DIST.active:                     # rank 0's measurement decides for all
        bf16 = bool(distributed.broadcast(torch.tensor([float(bf16)], device=device)).item())
        why = distributed.gather_objects(why)[0]
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
