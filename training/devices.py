"""Devices and precision: the device (and whether this torch build has kernels for it), the
algorithms' determinism, seeding and the training device's random-number state, the GPU fast
paths (channels-last, fused Adam), and the precision: autocast in bf16 or fp16 (with a gradient
scaler), chosen by a rule on the hardware."""
import contextlib
import os
import random
import re

import numpy as np
import torch

from training import distributed
from training.errors import UserError


def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return get_device("cuda")
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
    device = torch.device(name)
    if device.type == "cuda":
        check_cuda_arch(device)
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_cuda_arch(device):
    """Stop with one line when this torch build has no kernels for the GPU (a CUDA 13 wheel,
    built for compute capability 7.5 and newer, on a V100 or P100 fails at its first kernel
    with "no kernel image is available"). A build runs a GPU with a cubin of the same major
    version and a minor version at most the GPU's (sm_XY), or with PTX it compiles for it
    (compute_XY, XY at most the GPU's capability)."""
    arches = torch.cuda.get_arch_list()
    if not arches:                               # a build that does not say: let it try
        return
    major, minor = torch.cuda.get_device_capability(device)
    for arch in arches:
        match = re.fullmatch(r"(sm|compute)_(\d+)\w*", arch)
        if match is None:
            continue
        kind, built = match[1], divmod(int(match[2]), 10)   # "sm_86" -> (8, 6); "sm_100" -> (10, 0)
        if built[0] == major and built[1] <= minor or kind == "compute" and \
                built <= (major, minor):
            return
    raise UserError(
        f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) is not "
        f"supported by this PyTorch build (torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, kernels for {' '.join(arches)}): install a PyTorch build for "
        f"sm_{major}{minor}, such as a CUDA 12.6 wheel (pip install torch torchvision "
        "--index-url https://download.pytorch.org/whl/cu126), or run with --device cpu")


def set_algorithms(device, deterministic):
    """cuDNN's autotuner (benchmark mode) on CUDA, the fast default; with `deterministic`,
    benchmark off and deterministic algorithms on, so that a run and its resumption repeat the
    same arithmetic on the same GPU. CUDA's matrix products then need a fixed cuBLAS workspace
    (CUBLAS_WORKSPACE_CONFIG, read when CUDA creates its first cuBLAS handle: call this before
    any work on the GPU). Ops that have no deterministic CUDA kernel warn (warn_only): torch
    names them, and such a run is not bit-exact."""
    if deterministic and torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = torch.device(device).type == "cuda" and not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)


def _generator(device):
    """(get_rng_state, set_rng_state) of the training device's own generator: the CUDA GPU it
    trains on, or MPS; None on the CPU, whose generator is torch's global one."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (lambda: torch.cuda.get_rng_state(index),
                lambda state: torch.cuda.set_rng_state(state, index))
    mps = getattr(torch, "mps", None)
    if device.type == "mps" and hasattr(mps, "get_rng_state"):
        return mps.get_rng_state, mps.set_rng_state
    return None


def rng_state(device="cpu"):
    """The random-number state a resumed run needs: torch's CPU generator, the training
    device's generator (only that one: a node's other GPUs play no part), numpy's and
    Python's."""
    np_state = np.random.get_state()
    generator = _generator(device)
    return {"torch": torch.get_rng_state(),
            "device": generator[0]() if generator else None,
            "device_type": torch.device(device).type,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state, device="cpu"):
    """Restore `rng_state`'s. A checkpoint written before it held every visible GPU's state
    ("cuda", a list): the training GPU's entry is taken, or the first where this job sees fewer
    GPUs than the one that saved it (one visible GPU per process, as under SLURM). A run
    resumed on another kind of device starts that device's generator afresh."""
    torch.set_rng_state(state["torch"])
    generator = _generator(device)
    same = state.get("device_type") == torch.device(device).type
    saved = state.get("device") if same else None
    if saved is None and state.get("cuda") and torch.device(device).type == "cuda":
        index = torch.device(device).index or 0
        saved = state["cuda"][index if index < len(state["cuda"]) else 0]
    if generator is not None and saved is not None:
        generator[1](saved)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


# Device types that take the GPU fast paths: channels-last tensors and fused Adam. The CPU
# test suite adds "cpu" to run those paths on a machine without a GPU.
FAST_PATHS = {"cuda"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")      # /proc/cpuinfo: bf16 in hardware
BF16_CAPABILITY = (8, 0)                          # CUDA: Ampere (A100) and newer
# CUDA capabilities without fast fp16 arithmetic: 5.0 and 5.2 have none, 6.1 runs it at 1/64
# of fp32's rate (GeForce GTX 9xx and 10xx, Tesla M40, P4, P40; NVIDIA's CUDA C Programming
# Guide, throughput of arithmetic instructions)
SLOW_FP16 = {(5, 0), (5, 2), (6, 1)}


def fast_paths(device):
    return torch.device(device).type in FAST_PATHS


def autocast(device, precision):
    """Autocast of the forward pass on `device` (CUDA or CPU) in `precision`, "bf16" or "fp16";
    for "fp32", and on any other device (MPS), a no-op (an enclosing autocast region stays in
    force). Losses and sums are computed in fp32 outside it, or from outputs cast to fp32
    first."""
    kind = torch.device(device).type
    if precision not in ("fp32", *AUTOCAST_DTYPES):
        raise ValueError(f"unknown precision {precision!r}: fp32, bf16 or fp16")
    if precision == "fp32" or kind not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=AUTOCAST_DTYPES[precision])


def autocast_off(device):
    """A region in fp32 inside an autocast one, on CUDA or CPU; elsewhere a no-op: autocast
    never runs there (`autocast`), and torch 2.3 and 2.4 raise on torch.autocast("mps",
    enabled=False)."""
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def grad_scaler(device, precision):
    """The gradient scaler of a run: enabled for fp16, whose small gradients would underflow
    to zero without it (the loss is multiplied by a scale before backward, the gradients
    divided by it before the step, and a step with inf or NaN gradients is skipped while the
    scale backs off); a pass-through otherwise."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)   # a pass-through: fp32 and bf16


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
    """(runs bf16 in hardware, why): CUDA with compute capability 8.0 or higher, or a CPU with
    AMX or AVX-512 BF16. (torch.cuda.is_bf16_supported() also answers True where bf16 is
    emulated, on a T4 or V100.)"""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
        if (major, minor) >= BF16_CAPABILITY:
            return True, f"{gpu}: bf16 in hardware"
        return False, f"{gpu}, below 8.0: no bf16 in hardware"
    if device.type != "cpu":
        return False, f"no autocast on {device.type}"
    have = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    if have:
        return True, "CPU has " + " and ".join(f.upper().replace("_BF16", " BF16") if
                                               f.startswith("amx") else "AVX-512 BF16"
                                               for f in have)
    return False, "CPU has no native bf16 (no AMX or AVX-512 BF16): bf16 would be emulated"


def auto_precision(device):
    """The rule for --precision auto, from the hardware alone (the same command on the same
    machine always picks the same): (precision, why).

    bf16 where the hardware has it (CUDA with compute capability 8.0 or higher, a CPU with AMX
    or AVX-512 BF16); fp16 with the gradient scaler on older GPUs (a T4, a V100: fp16 tensor
    cores, no bf16; a P100), except those whose fp16 is slow (SLOW_FP16); fp32 otherwise (a
    CPU without bf16, MPS)."""
    native, why = native_bf16(device)
    if native:
        return "bf16", why
    if torch.device(device).type == "cuda":
        if torch.cuda.get_device_capability(device) in SLOW_FP16:
            return "fp32", f"{why}, and no fast fp16"
        return "fp16", f"{why}, but fast fp16"
    return "fp32", why


def choose_precision(requested, device, resumed=False):
    """Resolve --precision to (precision, the line that says why), the same on every rank
    (rank 0's). auto: `auto_precision`. A typed precision is obeyed where autocast runs (CUDA,
    CPU), with a warning where the hardware only emulates it; elsewhere fp32. `resumed`: the
    precision is the one saved in the checkpoint, not typed."""
    chosen = _choose_precision(requested, torch.device(device), resumed)
    if distributed.DIST.active:
        chosen = distributed.gather_objects(chosen)[0]
    return chosen


def _choose_precision(requested, device, resumed):
    if requested == "auto":
        precision, why = auto_precision(device)
        scaled = " with loss scaling" if precision == "fp16" else ""
        return precision, f"precision: {precision}{scaled} (auto: {why})"
    how = "the run's precision, from its checkpoint" if resumed else f"--precision {requested}"
    if requested == "fp32":
        return "fp32", f"precision: fp32 ({how})"
    if device.type not in ("cuda", "cpu"):
        return "fp32", f"warning: precision fp32, not {requested} ({how}): no autocast on " \
                       f"{device.type}"
    auto = auto_precision(device)[0]
    native, why = native_bf16(device)
    slow = f"the hardware only emulates it ({why}), which is slow"
    if requested == "fp16" and device.type == "cuda":
        native = torch.cuda.get_device_capability(device) not in SLOW_FP16
        why, slow = "CUDA", "this GPU has no fast fp16 arithmetic"
    elif requested == "fp16":    # on CPUs, for tests: its convolutions are slow even with
        native = False           # AVX-512 FP16 (60x fp32's time on the AMX Xeon here)
        slow = "fp16 convolutions are slow on CPUs"
    if not native:
        return requested, (f"warning: precision {requested} ({how}), but {slow}; --precision "
                           f"auto picks {auto}")
    scaled = " with loss scaling" if requested == "fp16" else ""
    return requested, f"precision: {requested}{scaled} ({how}; {why})"


def adam(params, lr, device):
    """Adam with the fused kernel on CUDA (FAST_PATHS) and the foreach path elsewhere."""
    return torch.optim.Adam(params, lr=lr, **adam_paths(device))


def adam_paths(device):
    """Adam's implementation flags for `device`: fused on FAST_PATHS, foreach elsewhere."""
    fast = fast_paths(device)
    return {"fused": fast or None, "foreach": None if fast else True}


def use_adam_paths(opt, device):
    """Set a loaded optimiser's implementation flags for `device`: a checkpoint saved on a GPU
    (fused) and resumed on a CPU, or the other way round, takes this device's path."""
    for group in opt.param_groups:
        group.update(adam_paths(device))
