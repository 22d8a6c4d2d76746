"""Training throughput of each model, side by side: the common pipeline, ours, and our limit.

- baseline: the common pipeline: a folder of JPEGs read through PIL transforms (centre crop,
  resize, ToTensor) in a DataLoader, fp32, and loss.item() three times per step (the CelebA
  models only);
- ours:     the scripts' path: the decoded uint8 images resident on the device, batches sliced
  with a seeded permutation, the loss terms summed on the device and read every 100 steps, in
  the scripts' memory format (channels-last on FAST_PATHS devices), in fp32 and in the
  precision --precision auto picks, if not fp32 (bf16, or fp16 with loss scaling);
- limit:    our exact step (the same model, loss, train_step, precision and memory format as
  ours) on one real batch of the same images, already in memory: ours without the data
  handling and the logging, so ours/limit should not exceed 1 beyond noise.

Every pipeline of a model is timed in --repeats rounds, interleaved (each round runs every
pipeline for the same number of steps, in a rotating order), so that a drift of the machine hits
them all alike; a pipeline's speed is its median round, its noise the spread of its rounds.
Each round also records the process's CPU time (below 1 per thread: the machine was busy) and
its minor page faults per step: memory that glibc's allocator handed back to the OS and takes
again, zeroed, page by page. How many depends on the process's history of allocations, which
is why pipelines timed one after the other (the limit first, on torch.rand data) could differ
by 25% on a CPU; interleaved, they share that history.

`--precision auto` is resolved by devices.choose_precision, the scripts' rule on the hardware
(its line is kept); this is where a measured slowdown of that precision would show. FLOPs per
image are counted from the layers (`count_flops`) and set against a measured peak: the best
GFLOP/s of a large matmul or convolution in fp32, bf16 and, on CUDA, fp16 (`measured_peak`).
On a CPU, ours is also timed with channels-last batches and model (the scripts use it on CUDA
only); the beta-TCVAE MLP's step is split into the TC estimator's share and the rest; and the
limit step of each row is profiled (torch.profiler, top ops by self CPU time).

    python bench.py --extras --out runs/bench.json
"""
import argparse
import copy
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import beta_vae as bv
import standard_vae as sv
import utils
import vq_vae as vq
from tests.faces import write_faces
from training import arguments, console, devices, files, loop
from training.errors import UserError


# ----------------------------------------------------------------------------------------------
# Data: a CelebA-format fixture (official layout), written once into a folder bench.py owns,
# and dSprites images rendered in memory
# ----------------------------------------------------------------------------------------------
OWNED = ".vae_bench_fixture"          # marks a folder that bench.py created


def fixture_root(path):
    """The folder for the fixture and its cache: a new temporary one, or `path` when bench.py
    created it (it holds the OWNED mark) or it does not exist yet. A benchmark never writes into
    a data folder it did not create, so any other folder is refused."""
    if path is None:
        root = Path(tempfile.mkdtemp(prefix="vae_bench_"))
    else:
        root = Path(path)
        if root.exists() and not (root / OWNED).is_file():
            raise UserError(f"--data-root {root} exists and was not created by bench.py, "
                                  "which never writes into a data folder it did not create; "
                                  "give a new folder (bench.py creates it and keeps the fixture "
                                  "there), or leave --data-root out for a temporary one")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --data-root {root}: {e.strerror}") from None
    (root / OWNED).touch()
    return root


def write_jpeg_fixture(root, n, seed=0):
    """n 178x218 synthetic faces in CelebA's official layout (the tests' writer), all in the
    training partition; written once per fixture folder."""
    folder = Path(root) / "celeba"
    if not (folder / "list_eval_partition.txt").exists():      # written last: a whole fixture
        write_faces(root, n, seed, split=(1.0, 0.0))
    return folder


def dsprites_images(n):
    """The first n images of the dSprites training split, (n, 1, 64, 64) uint8 in {0, 255},
    rendered in memory by the project's renderer (the images the dSprites runs train on when
    the official file is absent); nothing is written."""
    return utils.render_dsprites(utils.dsprites_classes(utils.dsprites_split("train")[:n]))


class JpegFolder(torch.utils.data.Dataset):
    """The common pipeline: one PIL decode and transform per item, every epoch."""

    def __init__(self, folder, size=64, crop=148):
        T = torchvision.transforms
        self.paths = sorted((Path(folder) / "img_align_celeba").glob("*.jpg"))
        self.transform = T.Compose([T.CenterCrop(crop), T.Resize(size), T.ToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), 0


# ----------------------------------------------------------------------------------------------
# Models: each script's configuration, with its own train_step and loss
# ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """A model as its script trains it: `step(model, opt, x, i, precision, scaler)` is the
    script's train_step with its loss at step i (for `model` or a copy of it); `logged` are
    the terms its loop sums for the log; `tc`, for objective TC, is (training images,
    estimator)."""
    model: nn.Module
    lr: float
    step: object
    logged: tuple
    tc: tuple = None


def setup_standard(images, device):
    """standard_vae.py's defaults: conv widths 32-32-64-64, FC 256, latent 10, Bernoulli."""
    args = sv.check_args(sv.parse_args(["--dataset", "celeba"]))
    model = sv.build_model(args, images.shape[1], images.shape[-1]).to(device)

    def step(model, opt, x, i, precision, scaler):
        return sv.train_step(model, opt, x, lambda *out: sv.vae_loss(
            *out, args.recon, model.log_sigma, sv.kl_weight(i, args.kl_warmup), args.free_bits),
            precision, scaler)
    return Setup(model, args.lr, step, ("loss", "recon", "kl"))


def beta_setup(argv, images, device, data_size, logged):
    """beta_vae.py with the flags `argv`; `data_size` (training images) serves objective TC's
    estimator."""
    args = bv.check_args(bv.parse_args(argv))
    model = bv.build_model(args, images.shape[1], images.shape[-1]).to(device)
    flags = {k: getattr(args, k) for k in bv.LOSS_FLAGS}

    def step(model, opt, x, i, precision, scaler):
        return sv.train_step(model, opt, x, lambda *out: bv.beta_vae_loss(
            *out, i, **flags, log_sigma=model.log_sigma, data_size=data_size), precision,
            scaler)
    tc = (data_size, args.tc_estimator) if args.objective == "TC" else None
    return Setup(model, args.lr, step, logged, tc)


def setup_beta(images, device):
    """beta_vae.py's conv network (Burgess et al.: four 32-channel convs, FC 256), objective B
    with the published 100,000-step capacity schedule."""
    return beta_setup(["--dataset", "celeba", "--objective", "B", "--c-steps", "100000"],
                      images, device, len(images), ("loss", "recon", "kl", "kl_dims"))


def setup_beta_mlp(images, device):
    """The beta-VAE paper's dSprites MLP (4096-1200-1200-20, 10-1200-1200-1200-4096) with
    objective TC, the mss estimator, beta 6 and lr 1e-3: the recipe of our disentanglement runs
    (their batch is --mlp-batch-size). The estimator weighs the batch against the 663,552
    images of the dSprites training split, as those runs do; beta is full from step 0 (a
    warm-up changes a weight, not the work)."""
    return beta_setup(["--dataset", "dsprites", "--arch", "mlp", "--objective", "TC",
                       "--tc-estimator", "mss", "--beta", "6", "--lr", "1e-3",
                       "--beta-warmup", "0", "--mig-points", "0"],
                      images, device, len(utils.dsprites_split("train")),
                      ("loss", "recon", "kl", "kl_dims", "mi", "tc", "dim_kl"))


def setup_vq(images, device):
    """vq_vae.py's default model (the reference CIFAR-10 configuration), with the pixel
    variance of the images it trains on, as vq_vae.fit computes it."""
    args = vq.check_args(vq.parse_args(["--dataset", "celeba"]))
    model = vq.build_model(args, images.shape[1]).to(device)
    variance = vq.data_variance(images, device)

    def step(model, opt, x, i, precision, scaler):
        return vq.train_step(model, opt, x, variance, args.beta, precision, scaler)
    return Setup(model, args.lr, step, vq.TRAIN_TERMS)


@dataclass
class ModelSpec:
    setup: object              # (uint8 images, device) -> Setup
    data: str                  # "celeba": the JPEG fixture; "dsprites": rendered in memory
    fit_channels_last: bool    # the script makes model and batches channels-last on FAST_PATHS
    conv: bool                 # has convolutions: channels-last is worth timing


MODELS = {"standard_vae": ModelSpec(setup_standard, "celeba", True, True),
          "beta_vae": ModelSpec(setup_beta, "celeba", True, True),
          "vq_vae": ModelSpec(setup_vq, "celeba", False, True),
          "beta_vae_mlp": ModelSpec(setup_beta_mlp, "dsprites", True, False)}


# ----------------------------------------------------------------------------------------------
# The machine: CPU, flags and a measured peak
# ----------------------------------------------------------------------------------------------
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# settings that change the speed of a CPU run: threads, and how freed tensor memory is kept
# (glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, PyTorch's huge pages, an allocator
# preloaded in place of glibc's)
ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


def cpu_model():
    """/proc/cpuinfo's "model name" (Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device):
    """What the numbers were measured on: the CPU's model, its flags that matter for the
    arithmetic, torch's kernel level, the threads, the GPU if one is used, and the
    environment variables that change the speed (ENV, MALLOC_*)."""
    flags = devices.cpu_flags()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_flags": {f: f in flags for f in CPU_FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": devices.native_bf16(device)[1],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "env": {k: v for k, v in os.environ.items() if k in ENV or k.startswith("MALLOC_")}}


def best_seconds(fn, device, repeats):
    """The fastest of `repeats` timed calls of fn(), after one untimed call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def measured_peak(device, n, repeats=5):
    """The measured peak in fp32, bf16 and (on CUDA) fp16: the best GFLOP/s of two large
    kernels on this process's threads, each the best of `repeats` calls after a warm-up. An
    (n, n) @ (n, n) matmul, 2 n^3 FLOPs (on x86 CPUs fp32 goes to MKL's GEMM, bf16 to
    oneDNN's, as autocast runs a Linear), and a 3x3 convolution of n/8 channels to n/8 on a
    (8, n/8, 32, 32) channels-last batch, 2 x outputs x in-channels x 9 FLOPs (oneDNN on
    CPUs). Both count: on an AMD EPYC with AVX-512, MKL's fp32 GEMM ran at under half the
    fp32 rate of oneDNN's convolutions. A theoretical peak (cores x clock x FLOPs per cycle) is not derived: a
    virtual machine hides the clock."""
    c = max(1, n // 8)
    result = {}
    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    for name, dtype in dtypes + ([("fp16", torch.float16)] if device.type == "cuda" else []):
        g = torch.Generator(device).manual_seed(0)
        a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
        x = torch.randn(8, c, 32, 32, device=device, dtype=dtype, generator=g)
        w = torch.randn(c, c, 3, 3, device=device, dtype=dtype, generator=g)
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
        out = torch.empty(n, n, device=device, dtype=dtype)
        parts = {"matmul": 2 * n ** 3 / best_seconds(lambda: torch.mm(a, b, out=out), device,
                                                     repeats) / 1e9,
                 "conv": 2 * 8 * c * 32 * 32 * c * 9 / best_seconds(
                     lambda: nn.functional.conv2d(x, w, padding=1), device, repeats) / 1e9}
        result[name] = max(parts.values())
        result[name + "_parts"] = parts
    result["how"] = (f"measured: the faster of a ({n}, {n}) @ ({n}, {n}) matmul and a 3x3 "
                     f"convolution {c} -> {c} channels on (8, {c}, 32, 32) channels-last, best "
                     f"of {repeats} calls each, per dtype, on {torch.get_num_threads()} threads")
    return result


# ----------------------------------------------------------------------------------------------
# FLOPs, counted from the layers
# ----------------------------------------------------------------------------------------------
COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
FLOPS_HOW = ("2 FLOPs per multiply-add of every Conv2d, ConvTranspose2d and Linear call in one "
             "training-mode forward pass (Conv2d: output elements x in_channels/groups x "
             "kernel area; ConvTranspose2d: input elements x out_channels/groups x kernel "
             "area, border outputs cropped by padding included; Linear: input rows x in x out "
             "features), divided by the batch; a training step adds the backward pass, per "
             "layer one more forward's worth for the weight gradient and one for the input "
             "gradient unless the layer's input needs none (the first layer); biases, "
             "activations, losses, the VQ quantiser's distances, the TC estimator and Adam "
             "are not counted")


def layer_macs(module, x, y):
    """Multiply-adds of one call of a counted layer on input x and output y, whole batch."""
    if isinstance(module, nn.Linear):
        return x.numel() * module.out_features                  # rows x in x out
    kernel = math.prod(module.kernel_size)
    if isinstance(module, nn.ConvTranspose2d):                   # each input scatters a kernel
        return x.numel() * module.out_channels // module.groups * kernel
    return y.numel() * module.in_channels // module.groups * kernel     # Conv2d


def count_flops(model, x):
    """{"forward", "step"}: FLOPs per image of model(x) and of a training step on x, counted
    from the layers as FLOPS_HOW says, on a copy of `model` in training mode (a forward may
    change state: the VQ-VAE's EMA codebook)."""
    model = copy.deepcopy(model).train()
    forward = step = 0

    def hook(module, inputs, output):
        nonlocal forward, step
        macs = layer_macs(module, inputs[0], output)
        forward += 2 * macs
        step += 2 * macs * (1 + module.weight.requires_grad + inputs[0].requires_grad)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COUNTED)]
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {"forward": forward / len(x), "step": step / len(x)}


# ----------------------------------------------------------------------------------------------
# The pipelines: each a function run(n) that takes n training steps
# ----------------------------------------------------------------------------------------------
def in_format(model, channels_last):
    """A copy of `model` in the memory format (all copies start from the same weights)."""
    model = copy.deepcopy(model)
    return model.to(memory_format=torch.channels_last if channels_last
                    else torch.contiguous_format)


def ours_pipeline(setup, model, batches, device, precision, log_every=100):
    """The body of loop.train with the script's step: the next device batch of the epoch's
    permutation, the step, the terms summed on the device, read every `log_every` steps."""
    opt = devices.adam(model.parameters(), setup.lr, device)
    scaler = devices.grad_scaler(device, precision)
    running = loop.RunningMean()
    state = {"i": 0, "it": iter(())}

    def run(n):
        for _ in range(n):
            x = next(state["it"], None)
            if x is None:
                state["it"] = batches.epoch(state["i"] // len(batches))
                x = next(state["it"])
            terms = setup.step(model, opt, x, state["i"], precision, scaler)
            running.add({k: terms[k] for k in setup.logged})
            state["i"] += 1
            if state["i"] % log_every == 0:
                running.read(state["i"], ".")
    return run


def limit_pipeline(setup, model, x, device, precision):
    """The script's step alone, on the one batch x, over and over."""
    opt = devices.adam(model.parameters(), setup.lr, device)
    scaler = devices.grad_scaler(device, precision)
    state = {"i": 0}

    def run(n):
        for _ in range(n):
            setup.step(model, opt, x, state["i"], precision, scaler)
            state["i"] += 1
    return run


def baseline_pipeline(setup, model, folder, batch, device, workers):
    """The common pipeline: JPEGs through PIL in a shuffling DataLoader, fp32, and three
    host-device syncs per step for the log."""
    opt = devices.adam(model.parameters(), setup.lr, device)
    loader = torch.utils.data.DataLoader(JpegFolder(folder), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    state = {"i": 0, "it": iter(loader)}

    def run(n):
        for _ in range(n):
            x = next(state["it"], None)
            if x is None:
                state["it"] = iter(loader)
                x = next(state["it"])
            terms = setup.step(model, opt, x[0].to(device), state["i"], "fp32",
                               devices.NO_SCALER)
            _ = [terms[k].item() for k in setup.logged[:3]]
            state["i"] += 1
    return run


def tc_pipeline(model, x, data_size, estimator):
    """beta_vae.tc_decomposition forward and backward on the (z, mu, logvar) of batch x, as
    objective TC computes it inside each step (fp32, outside autocast)."""
    with torch.no_grad():
        mu, logvar = model.encoder(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    leaves = [t.detach().requires_grad_() for t in (z, mu, logvar)]

    def run(n):
        for _ in range(n):
            terms = bv.tc_decomposition(*leaves, data_size, estimator)
            (terms["mi"] + terms["tc"] + terms["dim_kl"]).backward()
            for t in leaves:
                t.grad = None
    return run


# ----------------------------------------------------------------------------------------------
# Timing: interleaved rounds
# ----------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def minor_faults():
    """This process's minor page faults so far (Unix), or None."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(run, steps, device):
    """Wall and CPU seconds and minor page faults of run(steps)."""
    sync(device)
    faults, cpu, wall = minor_faults(), time.process_time(), time.perf_counter()
    run(steps)
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu,
            "faults": None if faults is None else minor_faults() - faults}


def time_rounds(pipelines, steps, repeats, device):
    """`repeats` rounds; in each every pipeline runs `steps` steps, in an order rotated by one
    each round (no pipeline always follows the same one). Returns each one's rounds."""
    names = list(pipelines)
    rounds = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            rounds[k].append(timed(pipelines[k], steps, device))
    return rounds


def speed(rounds, steps, batch, threads):
    """A pipeline's images/s: the median round, the best and worst, the spread (max - min) /
    median, the median share of the threads' time the process got on the CPU, and the median
    minor page faults per step."""
    ips = [steps * batch / r["wall_s"] for r in rounds]
    med = statistics.median(ips)
    faults = [r["faults"] for r in rounds]
    return {"images_per_s": med, "best": max(ips), "worst": min(ips),
            "spread": (max(ips) - min(ips)) / med, "rounds": ips,
            "cpu_share": statistics.median(r["cpu_s"] / (r["wall_s"] * threads)
                                           for r in rounds),
            "faults_per_step": None if None in faults else statistics.median(faults) / steps}


def ratio(a, b):
    """a / b of two speeds: of the medians, and the lowest and highest of the per-round
    ratios (the rounds are interleaved, so round r of each ran side by side)."""
    per_round = [x / y for x, y in zip(a["rounds"], b["rounds"])]
    return {"ratio": a["images_per_s"] / b["images_per_s"], "rounds_min": min(per_round),
            "rounds_max": max(per_round)}


def key(kind, precision, other_format=False):
    """A pipeline's name: "ours fp32", "limit bf16", "ours bf16 other format" (the memory
    format the script does not use on this device)."""
    return f"{kind} {precision}{' other format' if other_format else ''}"


def bench_model(spec, images, batch, device, steps, round_seconds, repeats, warmup):
    """Every pipeline but the baseline for one model, timed in interleaved rounds: ours and the
    limit in fp32 and in the precision auto picks (if not fp32); on a CPU, ours of a conv
    model also in the memory format the script does not use there; objective TC's estimator
    alone. `steps` per round (None: as many as take `round_seconds` at the fp32 limit's speed,
    at least 2). Returns the results and the parts (setup, model, the batch x0) for more."""
    torch.manual_seed(0)
    setup = spec.setup(images, device)
    fit_cl = spec.fit_channels_last and devices.fast_paths(device)
    model = in_format(setup.model, fit_cl)
    formats = [fit_cl] + ([not fit_cl] if device.type == "cpu" and spec.conv else [])
    batches = {cl: utils.DeviceBatches(images, batch, device, seed=0, channels_last=cl)
               for cl in formats}
    x0 = batches[fit_cl].to_float(batches[fit_cl].images[:batch])     # the limit's batch
    auto, line = devices.choose_precision("auto", device)
    precisions = ["fp32"] + ([auto] if auto != "fp32" else [])
    pipelines = {}
    for precision in precisions:
        for cl in formats:          # the script's format first: "ours fp32" is the script
            pipelines[key("ours", precision, cl != fit_cl)] = ours_pipeline(
                setup, in_format(model, cl), batches[cl], device, precision)
        pipelines[key("limit", precision)] = limit_pipeline(setup, in_format(model, fit_cl),
                                                            x0, device, precision)
    if setup.tc is not None:
        pipelines["tc estimator"] = tc_pipeline(model, x0, *setup.tc)
    for run in pipelines.values():
        run(warmup)
    if steps is None:
        once = timed(pipelines[key("limit", "fp32")], 1, device)["wall_s"]
        steps = max(2, math.ceil(round_seconds / once))
    threads = torch.get_num_threads()
    rounds = time_rounds(pipelines, steps, repeats, device)
    speeds = {k: speed(r, steps, batch, threads) for k, r in rounds.items()}
    flops = count_flops(model, x0)
    result = {"batch": batch, "steps_per_round": steps, "repeats": repeats,
              "memory_format": "channels-last" if fit_cl else "contiguous",
              "auto": auto, "auto_line": line,
              "flops_per_image": {**flops, "how": FLOPS_HOW}, "rows": {}}
    for precision in precisions:
        ours, limit = speeds[key("ours", precision)], speeds[key("limit", precision)]
        row = {"ours": ours, "limit": limit, "ours_over_limit": ratio(ours, limit),
               "ours_gflops": flops["step"] * ours["images_per_s"] / 1e9,
               "limit_gflops": flops["step"] * limit["images_per_s"] / 1e9}
        if len(formats) > 1:
            other = speeds[key("ours", precision, True)]
            cl, contiguous = (ours, other) if fit_cl else (other, ours)
            row["memory_formats"] = {"ours_contiguous": contiguous, "ours_channels_last": cl,
                                     "channels_last_over_contiguous": ratio(cl, contiguous)}
        if setup.tc is not None:
            per_call = statistics.median(r["wall_s"] for r in rounds["tc estimator"]) / steps
            row["tc_estimator_s"] = per_call
            row["tc_share_of_step"] = per_call * ours["images_per_s"] / batch
        result["rows"][precision] = row
    rows = result["rows"]
    result["auto_over_fp32"] = ratio(rows[result["auto"]]["ours"], rows["fp32"]["ours"])
    if "bf16" in rows:
        result["bf16_over_fp32"] = ratio(rows["bf16"]["ours"], rows["fp32"]["ours"])
    return result, argparse.Namespace(setup=setup, model=model, x0=x0)


def bench_baseline(setup, model, folder, batch, device, workers, steps, repeats, warmup):
    """The baseline pipeline, in fp32, in rounds of its own (its DataLoader workers would take
    the CPU from the others' rounds), on a copy of `model`."""
    torch.manual_seed(0)
    run = baseline_pipeline(setup, copy.deepcopy(model).to(memory_format=torch.contiguous_format),
                            folder, batch, device, workers)
    run(warmup)
    rounds = time_rounds({"baseline": run}, steps, repeats, device)["baseline"]
    return speed(rounds, steps, batch, torch.get_num_threads())


def profile_step(setup, model, x, device, precision, top, steps):
    """The `top` ops by self CPU time over `steps` steps of the limit (after one untimed
    step), from torch.profiler: [(op, self CPU ms per step, share of the steps' self time)].
    Self time includes what the kernel waits for, such as page faults on fresh memory. On
    CUDA the profiler records the GPU's kernels too (the JSON keeps the CPU side only)."""
    run = limit_pipeline(setup, copy.deepcopy(model), x, device, precision)
    run(1)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        run(steps)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 1e3 / steps, e.self_cpu_time_total / total)
            for e in events[:top]]


# ----------------------------------------------------------------------------------------------
# Extras: threads, epoch-time scaling, data alone
# ----------------------------------------------------------------------------------------------
def epoch_seconds(spec, images, batch, device, precision):
    """One epoch of the ours path over `images`, timed whole."""
    torch.manual_seed(0)
    setup = spec.setup(images, device)
    cl = spec.fit_channels_last and devices.fast_paths(device)
    run = ours_pipeline(setup, in_format(setup.model, cl),
                        utils.DeviceBatches(images, batch, device, seed=0, channels_last=cl),
                        device, precision)
    return timed(run, len(images) // batch, device)["wall_s"]


def data_epoch_seconds(device, images, folder, batch, workers):
    """One epoch of data alone, no model: the decoded cache on the device vs JPEGs via PIL."""
    batches = utils.DeviceBatches(images, batch, device, seed=0)
    sync(device)
    t = time.perf_counter()
    for x in batches.epoch(0):
        pass
    sync(device)
    cache_s = time.perf_counter() - t
    loader = torch.utils.data.DataLoader(JpegFolder(folder), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    t = time.perf_counter()
    for x, _ in loader:
        x.to(device)
    sync(device)
    return {"cache": cache_s, "imagefolder_pil": time.perf_counter() - t}


def extras(name, r, parts, images, root, folder, batch, device, repeats, workers):
    """For model `name` (a CelebA one; `r` its results, `parts` its setup, model and batch):
    the fp32 limit on 1 thread and on all; one epoch of ours over a quarter, half and all of
    the images at 64 px and all at 32 px, in auto's precision; one epoch of data alone."""
    spec, setup, model, x0 = MODELS[name], parts.setup, parts.model, parts.x0
    threads = torch.get_num_threads()
    out = {"model": name}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        run = limit_pipeline(setup, copy.deepcopy(model), x0, device, "fp32")
        run(2)
        rounds = time_rounds({"limit": run}, r["steps_per_round"], repeats, device)["limit"]
        out[f"limit_fp32_threads_{n}"] = speed(rounds, r["steps_per_round"], batch, n)
    torch.set_num_threads(threads)
    sizes = sorted({max(batch, len(images) // 4), max(batch, len(images) // 2), len(images)})
    out["precision"] = r["auto"]
    out["epoch_s_by_images_64px"] = {n: epoch_seconds(spec, images[:n], batch, device, r["auto"])
                                     for n in sizes}
    small = utils.load_celeba(root, "train", image_size=32).images
    out["epoch_s_32px"] = {len(small): epoch_seconds(spec, small, batch, device, r["auto"])}
    out["data_only_epoch_s"] = data_epoch_seconds(device, images, folder, batch, workers)
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def main(args):
    device = devices.get_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    root = fixture_root(args.data_root)        # first: a data folder it did not create is refused
    try:
        needs = {MODELS[n].data for n in args.models}
        for data, batch, flag in (("celeba", args.batch_size, "--batch-size"),
                                  ("dsprites", args.mlp_batch_size, "--mlp-batch-size")):
            if data in needs and args.images < batch:
                raise UserError(f"--images {args.images} is fewer than one batch of "
                                      f"{flag} {batch}")
        return run_benchmarks(args, device, root)
    finally:
        if args.data_root is None:             # the temporary fixture goes with the run
            shutil.rmtree(root, ignore_errors=True)


def pct(x):
    return f"{100 * x:.0f}%"


HEADER = ("model         prec   baseline     ours noise    limit noise  ours/limit (rounds)  "
          "GFLOP/s  peak   cpu  faults/step ours, limit")


def describe_row(name, prec, auto, row):
    """One line of the table: images/s (median of rounds) with noise (half the spread), the
    ratio with its range over rounds, ours' GFLOP/s and share of the peak, the CPU share and
    the page faults."""
    o, lim, rl = row["ours"], row["limit"], row["ours_over_limit"]
    base = f"{row['baseline']['images_per_s']:8.0f}" if "baseline" in row else "       -"
    faults = "/".join("-" if s["faults_per_step"] is None else f"{s['faults_per_step']:.0f}"
                      for s in (o, lim))
    return (f"{name:13s} {prec}{'*' if prec == auto else ' '} {base} "
            f"{o['images_per_s']:8.0f} {pct(o['spread'] / 2):>5s} "
            f"{lim['images_per_s']:8.0f} {pct(lim['spread'] / 2):>5s}  "
            f"{rl['ratio']:4.2f} ({rl['rounds_min']:.2f}-{rl['rounds_max']:.2f})  "
            f"{row['ours_gflops']:8.1f} {pct(row['ours_fraction_of_peak']):>5s} "
            f"{pct(o['cpu_share']):>5s}  {faults}")


def describe_machine(m, peak):
    """One line: the device, threads, torch, the CPU flags of interest and the peak."""
    flags = " ".join(f for f, on in m["cpu_flags"].items() if on) or "none of interest"
    peaks = ", ".join(f"{d} {peak[d]:.0f} (matmul {peak[d + '_parts']['matmul']:.0f}, conv "
                      f"{peak[d + '_parts']['conv']:.0f})" for d in ("fp32", "bf16"))
    return (f"{m['gpu'] or m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch "
            f"{m['torch']} ({m['torch_cpu_capability']}); flags: {flags}; peak GFLOP/s "
            f"{peaks}; {peak['how']}")


def print_details(models):
    """Below the table: FLOPs per image and auto's line for each model, then for each row
    channels-last against contiguous, the TC estimator's share and the top profiled ops."""
    print("FLOPs per image (a step is forward + backward, counted from the layers; 'how' in "
          "the JSON says how), and the precision auto picks:")
    for name, r in models.items():
        f = r["flops_per_image"]
        print(f"  {name:13s} forward {f['forward'] / 1e6:8.1f} MFLOP, step "
              f"{f['step'] / 1e6:8.1f} MFLOP; batch {r['batch']}, {r['steps_per_round']} steps "
              f"per round; {r['auto_line']}")
    for name, r in models.items():
        for prec, row in r["rows"].items():
            if "memory_formats" in row:
                c = row["memory_formats"]["channels_last_over_contiguous"]
                print(f"  channels-last on CPU, {name} {prec}: ours {c['ratio']:.2f}x "
                      f"contiguous (rounds {c['rounds_min']:.2f}-{c['rounds_max']:.2f})")
            if "tc_share_of_step" in row:
                print(f"  TC estimator, {name} {prec}: {1e3 * row['tc_estimator_s']:.1f} ms "
                      f"forward+backward, {pct(row['tc_share_of_step'])} of ours' step")
            for op, ms, share in row.get("profile_limit_top_ops", [])[:5]:
                print(f"  profile {name} {prec}: {op} {ms:.1f} ms/step ({pct(share)})")


def run_benchmarks(args, device, root):
    torch.backends.cudnn.benchmark = device.type == "cuda"       # as the scripts set it
    result = {"machine": machine_info(device), "models": {}}
    names = args.models
    images = {}
    if any(MODELS[n].data == "celeba" for n in names):
        t = time.perf_counter()
        with files.building(root, f"the bench fixture in {root}"):
            folder = write_jpeg_fixture(root, args.images)
        fixture_s = time.perf_counter() - t
        fresh = not (folder / "celeba_cache_crop148_64px.npy").exists()
        t = time.perf_counter()
        images["celeba"] = utils.load_celeba(root, "train", image_size=64).images
        decode_s = time.perf_counter() - t if fresh else None
        result.update(fixture_write_s=fixture_s, decode_and_cache_s=decode_s,
                      decode_per_10k_images_s=decode_s * 10_000 / args.images if decode_s
                      else None)
    if any(MODELS[n].data == "dsprites" for n in names):
        images["dsprites"] = dsprites_images(args.images)
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    result["peak_gflops"] = peak = measured_peak(device, peak_size)
    print(describe_machine(result["machine"], peak), flush=True)
    result.update(batch=args.batch_size, mlp_batch=args.mlp_batch_size, images=args.images,
                  repeats=args.repeats, warmup=args.warmup)
    print("images/s, the median of interleaved rounds; * = the precision auto picks; noise = "
          "half the spread of the rounds; cpu = CPU time / (wall x threads), under 100%: the "
          "machine was busy; faults = minor page faults per step")
    print(HEADER)
    parts = {}
    for name in names:
        spec = MODELS[name]
        batch = args.mlp_batch_size if spec.data == "dsprites" else args.batch_size
        r, parts[name] = bench_model(spec, images[spec.data], batch, device, args.steps,
                                     args.round_seconds, args.repeats, args.warmup)
        fp32 = r["rows"]["fp32"]
        if spec.data == "celeba":
            fp32["baseline"] = bench_baseline(parts[name].setup, parts[name].model, folder,
                                              batch, device, args.workers, r["steps_per_round"],
                                              args.repeats, args.warmup)
            fp32["ours_over_baseline"] = (fp32["ours"]["images_per_s"]
                                          / fp32["baseline"]["images_per_s"])
        for prec, row in r["rows"].items():
            if args.profile_ops:
                row["profile_limit_top_ops"] = profile_step(
                    parts[name].setup, parts[name].model, parts[name].x0, device,
                    prec, args.profile_ops, r["steps_per_round"])
            row["ours_fraction_of_peak"] = row["ours_gflops"] / peak[prec]
            print(describe_row(name, prec, r["auto"], row), flush=True)
        result["models"][name] = r
    print_details(result["models"])
    result["targets"] = targets(result["models"], devices.native_bf16(device)[0])
    for line in result["targets"]:
        print("  target: " + line)
    if args.extras:
        first = next((n for n in names if MODELS[n].data == "celeba"), None)
        if first is None:
            result["extras"] = None
            print("extras: none (they use the CelebA fixture; --models has no CelebA model)")
        else:
            result["extras"] = extras(first, result["models"][first], parts[first],
                                      images["celeba"], root, folder, args.batch_size, device,
                                      args.repeats, args.workers)
            print(json.dumps(result["extras"], indent=1))
    if args.out:
        files.write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


def targets(models, native):
    """The targets against this run, one line each: ours/limit <= 1 within noise (half the
    range of the per-round ratios) in every row; auto not slower than fp32 by more than 5%;
    with native bf16, the beta-VAE pipelines (auto) at >= 1.6x their fp32."""
    lines = []
    for name, r in models.items():
        for prec, row in r["rows"].items():
            rl = row["ours_over_limit"]
            noise = (rl["rounds_max"] - rl["rounds_min"]) / 2
            lines.append(f"{name} {prec}: ours/limit {rl['ratio']:.2f} "
                         f"{'met' if rl['ratio'] <= 1 + noise else 'MISSED'} (<= 1 + the "
                         f"noise of its rounds, {noise:.2f})")
        a = r["auto_over_fp32"]
        lines.append(f"{name}: auto ({r['auto']}) / fp32 {a['ratio']:.2f} "
                     f"{'met' if a['ratio'] >= 0.95 else 'MISSED'} (>= 0.95)")
        if native and name.startswith("beta_vae"):
            lines.append(f"{name}: auto / fp32 {a['ratio']:.2f} "
                         f"{'met' if a['ratio'] >= 1.6 else 'MISSED'} (>= 1.6 with native bf16)")
    return lines


def model_list(text):
    """--models: a comma list of known model names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown) or repr(text)}; "
                                         f"choose from {', '.join(MODELS)}")
    return names


def parse_args(argv=None):
    p = arguments.ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("--models", type=model_list, default=list(MODELS),
                   help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--threads", type=arguments.positive_int, default=None,
                   help="CPU threads (default: PyTorch's, one per core or OMP_NUM_THREADS)")
    p.add_argument("--batch-size", type=arguments.positive_int, default=64,
                   help="batch of the CelebA models")
    p.add_argument("--mlp-batch-size", type=arguments.positive_int, default=512,
                   help="batch of beta_vae_mlp (the recipe of our dSprites runs)")
    p.add_argument("--images", type=arguments.positive_int, default=2048,
                   help="JPEGs in the fixture, and dSprites images rendered")
    p.add_argument("--repeats", type=arguments.positive_int, default=7,
                   help="timed rounds of every pipeline, interleaved")
    p.add_argument("--steps", type=arguments.positive_int, default=None,
                   help="timed steps per pipeline per round (default: as many as take "
                        "--round-seconds at the model's fp32 limit, at least 2)")
    p.add_argument("--round-seconds", type=arguments.positive_float, default=1.0,
                   help="sizes the rounds when --steps is not given")
    p.add_argument("--warmup", type=arguments.nonneg_int, default=3,
                   help="untimed steps of every pipeline first")
    p.add_argument("--workers", type=arguments.nonneg_int, default=2,
                   help="DataLoader workers of the baseline")
    p.add_argument("--peak-size", type=arguments.positive_int, default=None,
                   help="n of the n x n matmuls (and n/8 of the convolutions' channels) "
                        "that measure the peak (default: 2048 on a CPU, 8192 on a GPU)")
    p.add_argument("--profile-ops", type=arguments.nonneg_int, default=10,
                   help="for each model and precision, keep the ops with the most self CPU "
                        "time in one round of limit steps under torch.profiler (0 = skip)")
    p.add_argument("--data-root", default=None,
                   help="a new folder that bench.py creates to keep the JPEG fixture and cache "
                        "for later runs; never an existing data folder (default: a temporary "
                        "folder, removed at the end)")
    p.add_argument("--extras", action="store_true",
                   help="also threads, epoch-time scaling and data alone (first CelebA model)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


if __name__ == "__main__":
    console.run_command(main, parse_args)
